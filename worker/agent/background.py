"""Background tasks: state and output go to the worker as ``bg`` events."""

from __future__ import annotations

import binascii
import os
import select
import signal
import subprocess
import threading
import time

from .procs import (
    KILL_GRACE_S,
    POLL_S,
    SHELL,
    Capture,
    base_env,
    descendants,
    group_exists,
    kill_group,
    now_ms,
    proc_table,
    signal_pids,
)
from .protocol import ToolError, call_timeout, max_output_of, safe_emit

BG_EVENT_INTERVAL_S = 0.5  # at most this often while a task's output grows
BG_TAIL_BYTES = 8192  # per stream, in each event (the Redis hash's tails)
BG_POLL_S = 0.2
BG_DRAIN_S = 0.2  # after the task's shell exits, leftovers may hold its pipes
DROP_GRACE_S = 0.5  # SIGTERM -> SIGKILL when a trajectory ends (blocks the agent)
MAX_BG_RUNNING = 32
MAX_BG_KEPT = 100  # ended tasks beyond this are forgotten (their hash stays in Redis)
BG_FINAL = ("completed", "failed", "stopped")


def capture_tail(capture, limit):
    """The last ``limit`` bytes a Capture saw (as far as it kept them)."""
    kept = bytes(capture.tail) if capture.truncated else bytes(capture.head + capture.tail)
    return kept[-limit:]


class BgTask:
    """A command running in its own process group, reporting as it goes."""

    def __init__(self, slot, task_id, command, name, max_output):
        self.slot_name = slot.name
        self.id = task_id
        self.command = command
        self.name = name or ""
        self.out = Capture(max_output)
        self.err = Capture(max_output)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.status = "running"
        self.exit_code = None
        self.stop_requested = False
        self.started_ms = now_ms()
        self.started = time.monotonic()
        self.ended_ms = None
        self.ended = None
        self.proc = subprocess.Popen(
            [SHELL, "-c", command],
            cwd=slot.cwd,
            env=base_env(slot),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.report()  # before bg_start's reply: the hash exists once the id is known
        threading.Thread(target=self._pump, name="bg-" + task_id, daemon=True).start()

    def duration_s(self):
        return round((self.ended or time.monotonic()) - self.started, 3)

    def state(self):
        """The task as the worker writes it to Redis (schemas.BgTask fields)."""
        out_tail = capture_tail(self.out, BG_TAIL_BYTES)
        err_tail = capture_tail(self.err, BG_TAIL_BYTES)
        return {
            "task_id": self.id,
            "name": self.name,
            "command": self.command,
            "status": self.status,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
            "stdout_tail": out_tail.decode("utf-8", "replace"),
            "stderr_tail": err_tail.decode("utf-8", "replace"),
            "stdout_bytes": self.out.total,
            "stderr_bytes": self.err.total,
            "truncated": self.out.total > len(out_tail) or self.err.total > len(err_tail),
        }

    def report(self):
        with self.lock:
            safe_emit({"event": "bg", "slot": self.slot_name, "task": self.state()})

    def _pump(self):
        streams = {self.proc.stdout.fileno(): self.out, self.proc.stderr.fileno(): self.err}
        poller = select.poll()
        for fd in streams:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        last_report, dirty, exited_at = time.monotonic(), False, None
        while streams:
            now = time.monotonic()
            if exited_at is None and self.proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > BG_DRAIN_S:
                break
            if dirty and now - last_report >= BG_EVENT_INTERVAL_S:
                self.report()
                last_report, dirty = now, False
            for fd, _mask in poller.poll(BG_POLL_S * 1000.0):
                data = os.read(fd, 262144)
                if not data:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                with self.lock:
                    streams[fd].add(data)
                dirty = True
        self._finish(self.proc.wait())

    def _finish(self, code):
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        with self.lock:
            self.exit_code = code
            if self.stop_requested:  # a stopped task never reports completed
                self.status = "stopped"
            else:
                self.status = "completed" if code == 0 else "failed"
            self.ended_ms = now_ms()
            self.ended = time.monotonic()
        self.report()
        self.done.set()

    def request_stop(self):
        """Mark the task as being stopped; False if it has already ended."""
        with self.lock:
            if self.status != "running":
                return False
            self.stop_requested = True
            return True

    def processes(self, known):
        """Live processes of the task: its group, its descendants, and ``known`` ones
        (pid -> start ticks) still alive. ``None`` without /proc."""
        table = proc_table()
        if not table:
            return None
        found = {}
        for pid, (_ppid, pgid, state, start) in table.items():
            if state != "Z" and (pgid == self.pid or known.get(pid) == start):
                found[pid] = start
        for pid in descendants(table, self.pid):
            if table[pid][2] != "Z":
                found[pid] = table[pid][3]
        return found

    def signal_all(self, known, sig):
        """Signal the group and every known process; returns the processes still alive."""
        found = self.processes(known)
        kill_group(self.pid, sig)
        if found is None:  # no /proc: the process group is all we can reach
            return {self.pid: 0} if group_exists(self.pid) else {}
        signal_pids(found, sig)
        return found


def task_alive(task, known):
    found = task.processes(known)
    return bool(found) if found is not None else not task.done.is_set()


def stop_tasks(tasks, force, grace_s):
    """Stop tasks together: SIGTERM (SIGKILL if ``force``), SIGKILL after ``grace_s``.

    Returns ``{task_id: "SIGTERM" | "SIGKILL" | None}`` (None: it had ended already).
    Waits for each stopped task to report its final state.
    """
    sent, known = {}, {}
    first = signal.SIGKILL if force else signal.SIGTERM
    for task in tasks:
        if task.request_stop():
            known[task.id] = task.signal_all({}, first)
            sent[task.id] = signal.Signals(first).name
        else:
            sent[task.id] = None
    deadline = time.monotonic() + (0 if force else grace_s)
    alive = [t for t in tasks if sent[t.id] and task_alive(t, known[t.id])]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        alive = [t for t in alive if task_alive(t, known[t.id])]
    for task in alive:
        known[task.id] = task.signal_all(known[task.id], signal.SIGKILL)
        sent[task.id] = "SIGKILL"
    for task in tasks:
        if sent[task.id]:
            task.done.wait(KILL_GRACE_S + BG_DRAIN_S)
    return sent


def new_task_id(slot):
    slot.bg_seq += 1
    return "bg%d-%s" % (slot.bg_seq, binascii.hexlify(os.urandom(2)).decode("ascii"))


def start_bg(slot, command, name, req):
    """Start a background task; the reply carries its id at once."""
    if not isinstance(command, str) or not command:
        raise ValueError("command must be a non-empty string")
    if name is not None and not isinstance(name, str):
        raise TypeError("name must be a string")
    running = [t for t in slot.bg.values() if t.status == "running"]
    if len(running) >= MAX_BG_RUNNING:
        raise ToolError(
            "limit_exceeded", "at most %d background tasks may run at once" % MAX_BG_RUNNING
        )
    forget_old_tasks(slot)
    task = BgTask(slot, new_task_id(slot), command, name, max_output_of(req))
    slot.bg[task.id] = task
    label = " (%s)" % task.name if task.name else ""
    return {
        "output": "started background task %s%s, pid %d" % (task.id, label, task.pid),
        "data": {"task_id": task.id, "pid": task.pid, "name": task.name},
    }


def forget_old_tasks(slot):
    ended = [t for t in slot.bg.values() if t.status != "running"]
    for task in ended[: max(0, len(slot.bg) - MAX_BG_KEPT + 1)]:
        del slot.bg[task.id]


def find_task(slot, args):
    task_id = args["task_id"]
    task = slot.bg.get(task_id)
    if task is None:
        raise ToolError("not_found", "no background task %r in this slot" % task_id)
    return task


def task_summary(task):
    return {
        "task_id": task.id,
        "name": task.name,
        "command": task.command,
        "status": task.status,
        "pid": task.pid,
        "exit_code": task.exit_code,
        "duration_s": task.duration_s(),
        "stdout_bytes": task.out.total,
        "stderr_bytes": task.err.total,
    }


def describe_task(task):
    if task.status == "running":
        return "%s is running (%.1fs)" % (task.id, task.duration_s())
    return "%s %s after %.1fs (exit code %s)" % (
        task.id,
        task.status,
        task.duration_s(),
        task.exit_code,
    )


def tool_bg_start(slot, args, req):
    """Start ``command`` in the background; returns ``data.task_id`` at once."""
    return start_bg(slot, args["command"], args.get("name"), req)


def tool_bg_list(slot, args, req):
    """The slot's background tasks with status and duration."""
    tasks = [task_summary(t) for t in slot.bg.values()]
    lines = [
        "%-12s %-9s %8.1fs  %s%s"
        % (
            t["task_id"],
            t["status"],
            t["duration_s"],
            "[%s] " % t["name"] if t["name"] else "",
            t["command"][:80],
        )
        for t in tasks
    ]
    return {"output": "\n".join(lines) or "no background tasks", "data": {"tasks": tasks}}


def tool_bg_output(slot, args, req):
    """A task's output so far; with ``block``, wait up to ``timeout_s`` for its end."""
    task = find_task(slot, args)
    if args.get("block"):
        task.done.wait(call_timeout(req, args))
    with task.lock:
        out, err = task.out.text(), task.err.text()
        summary = task_summary(task)
        truncated = task.out.truncated or task.err.truncated
    text = out
    if err:
        text += ("" if not out or out.endswith("\n") else "\n") + "--- stderr ---\n" + err
    if text and not text.endswith("\n"):
        text += "\n"
    text += "[%s]" % describe_task(task)
    summary["running"] = summary["status"] == "running"
    reply = {
        "output": text,
        "truncated": truncated,
        "output_bytes": summary["stdout_bytes"] + summary["stderr_bytes"],
        "data": summary,
    }
    if summary["exit_code"] is not None:
        reply["exit_code"] = summary["exit_code"]
    return reply


def tool_bg_stop(slot, args, req):
    """SIGTERM the task's process group (SIGKILL with ``force``), SIGKILL after a grace."""
    task = find_task(slot, args)
    sent = stop_tasks([task], bool(args.get("force")), KILL_GRACE_S)[task.id]
    summary = task_summary(task)
    summary["signal"] = sent
    summary["was_running"] = sent is not None
    if sent is None:
        text = "%s had already ended: %s" % (task.id, describe_task(task))
    else:
        text = "stopped %s with %s: %s" % (task.id, sent, describe_task(task))
    return {"output": text, "data": summary}
