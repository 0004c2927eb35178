"""The floor of toolq's whole job: Redis hops *and* the agent, nothing else.

A relay process holds ``size`` Docker sandboxes (the same backend, agent and
channel the worker uses: what the ``limit`` path drives directly) and loops:
``XREADGROUP`` the calls stream, send each call to its sandbox's agent, and
for each reply ``XADD`` it to the caller's reply stream and acknowledge and
delete the entry in one pipeline. The client side ``XADD``s a call and waits
for its reply with ``XREAD`` on a stream of its own (one per trajectory, each
on its own connection, so a trajectory's wait is one blocking read). No
fencing, no records, no retries, no ordering across restarts: the simplest
program doing the same hops as toolq. ``bench/run.py --paths relay_agent``
measures it beside ``limit`` and ``toolq`` in the same run, so toolq's cost
over ``limit`` can be set beside this program's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import uuid

import redis.asyncio as aioredis
from calls import Call
from harness import CallFn, acquire_all, release_all

GROUP = "g"


def relay_agent(
    url: str,
    prefix: str,
    size: int,
    ready: multiprocessing.Event,  # type: ignore[valid-type]
    runtime: str = "",
) -> None:
    """The relay process: ``size`` sandboxes, then the loop, until terminated."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.run(_serve(url, prefix, size, ready, runtime))


async def _serve(
    url: str,
    prefix: str,
    size: int,
    ready: multiprocessing.Event,  # type: ignore[valid-type]
    runtime: str,
) -> None:
    from common import IMAGE

    from toolq.worker.backends.docker import DockerBackend
    from toolq.worker.settings import WorkerSettings

    task = asyncio.current_task()
    assert task is not None
    # terminate(): stop serving and remove the sandboxes (the finally below).
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    settings = WorkerSettings(
        backend="docker", default_image=IMAGE, namespace=prefix, runtime=runtime or "runc"
    )
    backend = DockerBackend(settings)
    await asyncio.to_thread(backend.engine.load_runtimes)  # as a worker's start
    slots, _ = await acquire_all(backend, size)
    r = aioredis.Redis.from_url(url)
    calls = f"{prefix}:calls"
    await r.xgroup_create(calls, GROUP, id="0", mkstream=True)
    ready.set()  # type: ignore[attr-defined]

    async def answer(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        index = int(fields[b"i"])
        slot = slots[index]
        try:
            reply = await slot.channel.request(
                "call", slot=slot.name, tool=fields[b"tool"].decode(),
                args=json.loads(fields[b"args"]), timeout_s=60.0, max_output_bytes=4 << 20,
            )  # fmt: skip
        except Exception as exc:  # a sandbox gone: the caller gets an error, not a hang
            reply = {"ok": False, "output": f"relay_agent: {exc!r}"}
        pipe = r.pipeline(transaction=False)
        ok = b"1" if reply.get("ok") else b"0"
        pipe.xadd(f"{prefix}:reply:{index}", {"ok": ok, "output": str(reply.get("output", ""))},
                  maxlen=10)  # fmt: skip
        pipe.xack(calls, GROUP, entry_id)
        pipe.xdel(calls, entry_id)
        await pipe.execute()

    try:
        while True:
            # Short blocks: the URL's socket timeout must not end a quiet wait.
            got = await r.xreadgroup(GROUP, "relay", {calls: ">"}, count=100, block=1000)
            for _stream, entries in got:
                for entry_id, fields in entries:  # concurrently across sandboxes
                    asyncio.get_running_loop().create_task(answer(entry_id, fields))
    finally:
        await release_all(backend, slots)
        await backend.shutdown()


class RelayAgent:
    """The client side: start the relay process, then one ``CallFn`` per call kind."""

    def __init__(self, url: str, size: int, runtime: str = "") -> None:
        self.url, self.size, self.runtime = url, size, runtime
        self.prefix = f"relayagent{uuid.uuid4().hex[:6]}"
        self.proc: multiprocessing.Process | None = None
        self.conns: list[aioredis.Redis] = []
        self.cursors = ["0-0"] * size

    async def start(self) -> None:
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(
            target=relay_agent,
            args=(self.url, self.prefix, self.size, ready, self.runtime),
            daemon=True,
        )
        self.proc.start()
        if not await asyncio.to_thread(ready.wait, 600):
            raise RuntimeError("relay_agent: its sandboxes did not start")
        self.conns = [aioredis.Redis.from_url(self.url) for _ in range(self.size)]

    def fn(self, call: Call) -> CallFn:
        fields = {"tool": call.tool, "args": json.dumps(call.args)}

        async def one(index: int) -> tuple[bool, str]:
            r = self.conns[index]
            await r.xadd(f"{self.prefix}:calls", {"i": index, **fields})
            stream = f"{self.prefix}:reply:{index}"
            while True:
                if self.proc is None or not self.proc.is_alive():
                    raise RuntimeError("relay_agent: the relay process is gone")
                got = await r.xread({stream: self.cursors[index]}, block=1000, count=1)
                if got:
                    entry_id, reply = got[0][1][0]
                    self.cursors[index] = entry_id
                    return reply[b"ok"] == b"1", reply[b"output"].decode()

        return one

    async def stop(self) -> None:
        for r in self.conns:
            await r.aclose()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.join(120)
