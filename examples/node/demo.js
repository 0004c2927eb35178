'use strict';
/**
 * Drive one trajectory end to end from Node.js and print one JSON line per
 * step: open, a few tool calls, a background task, close; then cancel a
 * second trajectory in the middle of a long call.
 *
 *   TOOLQ_REDIS_URL=redis://127.0.0.1:6379 TOOLQ_NAMESPACE=toolq node demo.js
 *
 * Exits non-zero if a step does not do what it should.
 */

const { ToolqClient } = require('./toolq');

function show(step, value) {
  console.log(JSON.stringify({ step, ...value }));
}

function check(condition, what) {
  if (!condition) throw new Error(`demo check failed: ${what}`);
}

/** Start a background task with a normal call, then read its hash until it ends. */
async function backgroundTask(tq, traj) {
  const started = await tq.call(traj, 'bg_start', { command: 'echo bg-hello; sleep 0.2' });
  if (!started.ok && started.error_code === 'unknown_tool') {
    show('bg', { supported: false, error: started.error }); // this worker has no bg tools
    return;
  }
  check(started.ok, `bg_start failed: ${started.error}`);
  const taskId = started.data && started.data.task_id;
  check(taskId, 'bg_start returned no data.task_id');
  const task = await tq.waitBg(traj, taskId, { waitMs: 30000 });
  check(task, `background task ${taskId} did not finish`);
  show('bg', { supported: true, task });
}

/** Cancel a trajectory while a long call runs: the call is answered `cancelled`. */
async function cancelled(tq, traj) {
  await tq.open(traj);
  const callId = await tq.submit(traj, 'bash', { command: 'sleep 30' });
  const outcome = await tq.cancel(traj);
  const result = await tq.result(traj, callId, { waitMs: 30000 });
  check(result.error_code === 'cancelled', `cancelled call: ${result.error_code}`);
  const record = await tq.waitEnded(traj, { waitMs: 30000 });
  check(record && record.status === 'cancelled', 'trajectory cancelled');
  show('cancel', { outcome, result, status: record.status });
}

async function main() {
  const traj = process.env.TOOLQ_TRAJ || `node-demo-${process.pid}-${Date.now()}`;
  const tq = await ToolqClient.connect();
  try {
    show('open', { traj, status: await tq.open(traj, { labels: { example: 'node' } }) });

    const hi = await tq.call(traj, 'bash', { command: 'echo hi' });
    check(hi.ok && hi.output === 'hi\n', 'echo hi');
    show('call', { result: hi });

    // The slot is sticky: a file written by one call is there for the next.
    await tq.call(traj, 'write_file', { path: 'notes.txt', content: 'from node' });
    const cat = await tq.call(traj, 'bash', { command: 'cat notes.txt' });
    check(cat.output === 'from node', 'file persisted between calls');
    show('state', { result: cat });

    const failed = await tq.call(traj, 'bash', { command: 'exit 3' });
    check(!failed.ok && failed.error_code === 'exit_status', 'failed command');
    show('error', { result: failed });

    await backgroundTask(tq, traj);

    await tq.close(traj);
    const record = await tq.waitEnded(traj, { waitMs: 30000 });
    check(record && record.status === 'completed', 'trajectory completed');
    show('close', { record });

    await cancelled(tq, `${traj}-cancel`);
  } finally {
    await tq.quit();
  }
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
