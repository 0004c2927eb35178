"""Every way of running a tool call that the benchmark compares, behind one interface.

A path is started once for the most trajectories it will serve, measured at
several concurrency levels (interleaved with the other paths, so that host
load drifts the same for all), then stopped.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from calls import CALLS, Call
from common import IMAGE, Budget, Run, container_memory_mib, tree_rss_kb
from harness import (
    Accounting,
    CallFn,
    WorkerProc,
    acquire_all,
    agent_call_fn,
    close_all,
    drive,
    open_all,
    release_all,
    toolq_call_fn,
)
from relay_agent import RelayAgent

from toolq.producer import AsyncClient
from toolq.worker.backends.base import Backend, Slot
from toolq.worker.settings import WorkerSettings


class Path:
    """Something that runs tool calls for up to ``size`` trajectories at once."""

    name = "?"
    slow = False  # a docker exec path: ~100 ms a call, smaller budgets
    max_level = 1 << 30

    def __init__(self, size: int) -> None:
        self.size = size
        self.lifecycle: dict[str, list[float]] = {}  # name -> seconds, for the report
        self.memory: dict[str, Any] = {}

    async def start(self) -> None:
        """Start sandboxes (and workers) for ``size`` trajectories."""

    async def stop(self) -> None:
        """Remove everything ``start`` made."""

    def fns(self, call: Call, n: int) -> list[CallFn]:
        raise NotImplementedError

    def supports(self, call: Call, n: int) -> bool:
        return n <= min(self.size, self.max_level)

    async def run(self, call: Call, n: int, budget: Budget) -> Run:
        return await drive(self.name, call, self.fns(call, n), budget)


class LimitPath(Path):
    """The agent over its stream, driven from this process: no Redis, no worker."""

    def __init__(
        self, size: int, per_container: int = 1, local: bool = False, runtime: str = ""
    ) -> None:
        super().__init__(size)
        self.name = "limit_local" if local else "limit"
        if runtime:  # the --runtimes rows: limit_runc, limit_runsc
            self.name = f"limit_{runtime}"
        self.per_container, self.local, self.runtime = per_container, local, runtime
        self.backend: Backend | None = None
        self.slots: list[Slot] = []

    async def start(self) -> None:
        if self.local:
            from toolq.worker.backends.local import LocalBackend

            self.backend = LocalBackend()
        else:
            from toolq.worker.backends.docker import DockerBackend

            settings = WorkerSettings(
                backend="docker",
                default_image=IMAGE,
                namespace=f"benchlim{uuid.uuid4().hex[:6]}",
                slots_per_container=self.per_container,
                runtime=self.runtime or "runc",
            )
            self.backend = DockerBackend(settings)
            await asyncio.to_thread(self.backend.engine.load_runtimes)  # as a worker's start
        self.slots, _ = await acquire_all(self.backend, self.size, self.per_container)

    def fns(self, call: Call, n: int) -> list[CallFn]:
        return [agent_call_fn(self.slots, call)] * n

    async def stop(self) -> None:
        if self.backend is not None:
            await release_all(self.backend, self.slots)
            await self.backend.shutdown()


class ToolqPath(Path):
    """toolq end to end: AsyncClient here, a worker process, Redis, the backend."""

    def __init__(
        self,
        size: int,
        url: str,
        per_container: int = 1,
        local: bool = False,
        cold: int = 0,
        slots: int | None = None,
        runtime: str = "",
    ) -> None:
        super().__init__(size)
        self.name = "toolq_local" if local else "toolq"
        self.runtime = runtime
        if runtime:  # the --runtimes rows: toolq_runc, toolq_runsc
            self.name = f"toolq_{runtime}"
        self.url, self.per_container, self.local, self.cold = url, per_container, local, cold
        self.slots = slots or size  # the worker's (more than size: room to open others)
        self.ns = f"bench{uuid.uuid4().hex[:6]}"
        self.trajs = [f"t{i}" for i in range(size)]
        self.worker: WorkerProc | None = None
        self.client: AsyncClient | None = None
        self.sync = redis.Redis.from_url(url)

    async def start(self) -> None:
        backend = "local" if self.local else "docker"
        self.worker = await asyncio.to_thread(
            WorkerProc, self.url, self.ns, backend=backend, default_image=IMAGE,
            slots=self.slots, slots_per_container=self.per_container,
            runtime=self.runtime or "runc",
        )  # fmt: skip
        self.client = AsyncClient(self.url, self.ns)
        if self.cold:
            await self._cold_opens()
        rss0 = tree_rss_kb(self.worker.pid)
        ready = await open_all(self.client, self.trajs, self.per_container)
        kind = f"{self.per_container} slots/container" if self.per_container > 1 else "unpacked"
        label = f"{backend}: open {self.size} at once ({kind})"
        if self.runtime:
            label = f"{backend} ({self.runtime}): open {self.size} at once ({kind})"
        self.lifecycle[label] = ready
        await asyncio.sleep(0.5)  # let the start storm settle before measuring memory
        self.memory = await asyncio.to_thread(self._memory, rss0)

    async def _cold_opens(self) -> None:
        """One trajectory at a time on an idle worker: a container start each."""
        assert self.client is not None
        took = []
        for i in range(self.cold):
            started = time.perf_counter()
            await self.client.open(f"cold{i}")
            r = await self.client.call(f"cold{i}", "bash", {"command": "true"}, wait_s=120)
            took.append(time.perf_counter() - started)
            if not r.ok:
                raise RuntimeError(f"cold open failed: {r.error}")
            await self.client.close(f"cold{i}")
            await asyncio.sleep(0.5)  # let its container go
        where = f"docker ({self.runtime})" if self.runtime else "docker"
        self.lifecycle[f"{where}: cold open (image present)"] = took

    def _memory(self, rss0: int) -> dict[str, Any]:
        assert self.worker is not None
        per = self.per_container
        found: dict[str, Any] = {
            "slots": self.size,
            "per_container": per,
            "worker_kib_per_slot": (tree_rss_kb(self.worker.pid) - rss0) / self.size,
            "worker_rss_mib": round(tree_rss_kb(self.worker.pid) / 1024, 1),
            "redis_used_mib": round(self.sync.info("memory")["used_memory"] / 2**20, 1),
        }
        if self.local:  # no containers: the agents are the worker's children
            found["per_container"] = "-"
            found["note"] = "worker RSS includes its agent subprocesses"
            return found
        import docker

        api = docker.from_env().api
        cids = [c["Id"] for c in api.containers(filters={"label": f"toolq.ns={self.ns}"})]
        mib = container_memory_mib(api, cids[:8])
        if mib:
            found["containers"] = len(cids)
            found["container_mib"] = statistics.fmean(mib)
            found["container_mib_per_slot"] = statistics.fmean(mib) / per
        return found

    def fns(
        self, call: Call, n: int, breakdown: list[dict[str, float]] | None = None
    ) -> list[CallFn]:
        assert self.client is not None
        return [toolq_call_fn(self.client, self.trajs, call, breakdown)] * n

    async def run(self, call: Call, n: int, budget: Budget) -> Run:
        assert self.worker is not None
        acct = Accounting(self.worker, self.sync)
        breakdown: list[dict[str, float]] = []  # one trajectory: where each call's time went
        with acct:
            run = await drive(
                self.name, call, self.fns(call, n, breakdown if n == 1 else None), budget
            )
        run.redis = acct.counts()
        run.breakdown = breakdown
        return run

    async def stop(self) -> None:
        if self.client is not None:
            await close_all(self.client, self.trajs)
            await self.client.aclose()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        self.sync.close()


class RelayAgentPath(Path):
    """Redis hops and the agent, nothing else (``bench/relay_agent.py``): toolq's floor."""

    name = "relay_agent"

    def __init__(self, size: int, url: str, runtime: str = "") -> None:
        super().__init__(size)
        if runtime:  # the --runtimes rows: relay_agent_runc, relay_agent_runsc
            self.name = f"relay_agent_{runtime}"
        self.relay = RelayAgent(url, size, runtime)

    async def start(self) -> None:
        await self.relay.start()

    def fns(self, call: Call, n: int) -> list[CallFn]:
        return [self.relay.fn(call)] * n

    async def stop(self) -> None:
        await self.relay.stop()


class RqPath(Path):
    """One RQ job per call doing docker exec in the trajectory's container."""

    name = "rq"
    slow = True

    def __init__(self, size: int, url: str, workers: int) -> None:
        super().__init__(size)
        self.url, self.workers_n = url, workers
        self.boxes: Any = None
        self.workers: Any = None
        self.pool = ThreadPoolExecutor(size + 4)

    async def start(self) -> None:
        from rq_baseline import Containers, RqWorkers

        self.boxes = await asyncio.to_thread(Containers, self.size)
        self.workers = RqWorkers(self.url, self.workers_n)
        warm = self.workers.fns(self.boxes.cids[:1], CALLS["true"], self.pool)  # imports
        await drive("rq", CALLS["true"], warm, Budget(0, self.workers_n * 2, self.workers_n * 2))

    def fns(self, call: Call, n: int) -> list[CallFn]:
        return list(self.workers.fns(self.boxes.cids[:n], call, self.pool))

    async def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()
        if self.boxes is not None:
            await asyncio.to_thread(self.boxes.remove)
        self.pool.shutdown(wait=False)


class ExecPath(Path):
    """docker exec from this process, no queue: the SDK (exec_run) or the CLI."""

    slow = True
    max_level = 1

    def __init__(self, cli: bool = False) -> None:
        super().__init__(1)
        self.name = "exec_cli" if cli else "exec"
        self.cli = cli
        self.boxes: Any = None
        self.pool = ThreadPoolExecutor(4)

    async def start(self) -> None:
        from rq_baseline import Containers

        self.boxes = await asyncio.to_thread(Containers, 1)

    def supports(self, call: Call, n: int) -> bool:
        return n == 1 and (not self.cli or call.name == "true")

    def fns(self, call: Call, n: int) -> list[CallFn]:
        from rq_baseline import exec_cli_fns, exec_fns

        if self.cli:
            return exec_cli_fns(self.boxes.cids, call)
        return exec_fns(self.boxes.cids, call, self.pool)

    async def stop(self) -> None:
        if self.boxes is not None:
            await asyncio.to_thread(self.boxes.remove)
        self.pool.shutdown(wait=False)
