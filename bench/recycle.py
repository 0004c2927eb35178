"""Open latency with recycled containers, against a cold start and the warm pool.

    python bench/recycle.py            # ~4 min on 2 cores
    python bench/recycle.py --quick    # ~1 min smoke run

Three worker processes (Docker backend, the test image, 4 slots), each in its
own namespace of one Redis:

- ``cold``: no warm pool, no recycling: every open starts a container;
- ``warm``: ``warm_pool=2``: opens take a container started ahead;
- ``recycle``: ``recycle_containers`` on, no warm pool: an ended trajectory's
  container, reset and verified, serves the next open.

Each trajectory opens, calls ``true`` (open -> this first result is the
latency measured), writes a small program into its workspace and runs it,
and closes.

1. **One at a time**, rounds interleaved over the three modes after one
   trajectory each that is not measured: before every open all three workers
   are idle (the last container removed, the warm pool refilled, the last
   reset done), so each mode shows its best case.
2. **Back to back**: 4 loops per mode, each opening its next trajectory as
   soon as the last one closed (an RL trainer's steady state): a reset that
   has not finished yet cannot serve the next open.

The worker's metrics (``/metrics``) say when containers were started, removed,
recycled or rejected. Writes ``bench/out/<time>/recycle.json`` and ``recycle.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from common import IMAGE, OUT_DIR, host_info, pct
from harness import WorkerProc
from prometheus_client.parser import text_string_to_metric_families

from toolq.producer import AsyncClient
from toolq.worker.embedded import EmbeddedRedis

WAIT_S = 300.0
QUIET_TIMEOUT_S = 180.0
WARM_POOL = 2
SLOTS = 4
PROGRAM = "import sys\nprint(sum(range(1000)), sys.version_info[0])\n"
WORK = [
    ("write_file", {"path": "main.py", "content": PROGRAM}),
    ("bash", {"command": "python3 main.py"}),
]
MODES: dict[str, dict[str, Any]] = {
    "cold": {},
    "warm": {"warm_pool": WARM_POOL},
    "recycle": {"recycle_containers": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mode:
    """One worker and what its trajectories measured."""

    name: str
    url: str
    settings: dict[str, Any]
    ns: str = field(default_factory=lambda: f"recy{uuid.uuid4().hex[:6]}")
    opened: int = 0
    seen: set[str] = field(default_factory=set)  # containers that served a trajectory
    worker: WorkerProc | None = None
    port: int = 0

    def start(self) -> None:
        self.port = free_port()
        self.worker = WorkerProc(
            self.url, self.ns, backend="docker", default_image=IMAGE, slots=SLOTS,
            metrics_port=self.port, metrics_host="127.0.0.1", **self.settings,
        )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("toolq_container"):
                    found[s.name] = found.get(s.name, 0.0) + s.value
        return found

    def quiet(self) -> bool:
        """Nothing left in flight: ended trajectories' containers removed or reset,
        the warm pool full again."""
        m = self.metrics()
        removed = m.get("toolq_containers_removed_total", 0)
        if self.name == "recycle":  # each ended trajectory's container: reused or removed
            return m.get("toolq_containers_recycled_total", 0) + removed >= self.opened
        if self.name == "warm":
            started = m.get("toolq_containers_started_total", 0)
            return started >= WARM_POOL + self.opened and removed >= self.opened
        return removed >= self.opened


async def wait_quiet(modes: list[Mode]) -> None:
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while not all(quiet := await asyncio.gather(*(asyncio.to_thread(m.quiet) for m in modes))):
        if time.monotonic() > deadline:
            busy = [m.name for m, q in zip(modes, quiet, strict=True) if not q]
            raise RuntimeError(f"the workers did not settle: {busy}")
        await asyncio.sleep(0.05)


async def trajectory(client: AsyncClient, mode: Mode) -> tuple[float, bool]:
    """Open, first call, some work, close; (seconds to the first result, reused?)."""
    mode.opened += 1
    traj = f"{mode.name}-{mode.opened}"
    started = time.perf_counter()
    await client.open(traj)
    first = await client.call(traj, "bash", {"command": "true"}, wait_s=WAIT_S)
    took = time.perf_counter() - started
    work = await client.call_many(traj, WORK)
    await client.close(traj)
    if not first.ok or not all(w.ok for w in work):
        raise RuntimeError(f"{traj}: {first.error or [w.error for w in work]}")
    box = first.slot.split(":", 1)[0]
    reused = box in mode.seen
    mode.seen.add(box)
    return took, reused


async def one_at_a_time(modes: list[Mode], rounds: int, per_round: int) -> dict[str, Any]:
    found: dict[str, dict[str, list[Any]]] = {m.name: {"s": [], "reused": []} for m in modes}
    clients = {m.name: AsyncClient(m.url, m.ns) for m in modes}
    try:
        for mode in modes:  # not measured: the recycle pool's first container is a cold start
            await wait_quiet(modes)
            await trajectory(clients[mode.name], mode)
        for _ in range(rounds):
            for mode in modes:
                for _ in range(per_round):
                    await wait_quiet(modes)
                    took, reused = await trajectory(clients[mode.name], mode)
                    found[mode.name]["s"].append(took)
                    found[mode.name]["reused"].append(reused)
        await wait_quiet(modes)
    finally:
        for c in clients.values():
            await c.aclose()
    return found


async def back_to_back(mode: Mode, loops: int, each: int) -> dict[str, Any]:
    started0 = mode.metrics().get("toolq_containers_started_total", 0)
    took: list[float] = []
    reused: list[bool] = []
    async with AsyncClient(mode.url, mode.ns) as client:

        async def loop() -> None:
            for _ in range(each):
                s, r = await trajectory(client, mode)
                took.append(s)
                reused.append(r)

        await asyncio.gather(*(loop() for _ in range(loops)))
    started = mode.metrics().get("toolq_containers_started_total", 0) - started0
    return {"s": took, "reused": reused, "containers_started": started}


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_s": round(pct(ordered, 50), 3),
        "p95_s": round(pct(ordered, 95), 3),
        "max_s": round(ordered[-1], 3),
    }


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "flags": " --quick" if opts.quick else "",
        "host": host_info(),
    }
    with EmbeddedRedis() as server:
        modes = [Mode(name, server.url, settings) for name, settings in MODES.items()]
        try:
            for mode in modes:
                await asyncio.to_thread(mode.start)
            await wait_quiet(modes)
            seq = await one_at_a_time(modes, opts.rounds, opts.per_round)
            b2b = {}
            for mode in modes:
                await wait_quiet(modes)
                b2b[mode.name] = await back_to_back(mode, opts.loops, opts.each)
            await wait_quiet(modes)
            recycle_m = modes[-1].metrics()
        finally:
            for mode in modes:
                if mode.worker is not None:
                    await asyncio.to_thread(mode.worker.stop)
    result["one_at_a_time"] = {
        name: {**summary(v["s"]), "reused": sum(v["reused"])} for name, v in seq.items()
    }
    result["back_to_back"] = {
        name: {
            **summary(v["s"]),
            "reused": sum(v["reused"]),
            "containers_started": int(v["containers_started"]),
        }
        for name, v in b2b.items()
    }
    count = recycle_m.get("toolq_container_recycle_seconds_count", 0)
    result["recycle"] = {
        "recycled": int(recycle_m.get("toolq_containers_recycled_total", 0)),
        "rejected": int(recycle_m.get("toolq_containers_recycle_rejected_total", 0)),
        "reset_mean_s": round(recycle_m.get("toolq_container_recycle_seconds_sum", 0) / count, 3)
        if count
        else None,
    }
    result["settings"] = vars(opts)
    return result


def report(result: dict[str, Any]) -> str:
    seq, b2b, rec = result["one_at_a_time"], result["back_to_back"], result["recycle"]
    cold = seq["cold"]["p50_s"]
    lines = [
        "## Recycled containers: open latency",
        "",
        f"Measured {result['when']} with `python bench/recycle.py{result['flags']}` "
        f"({result['host'].get('cpus')} cpus, Docker {result['host'].get('docker_engine')}). "
        "Open → the first call's result (`true`), as a client sees it; each trajectory then "
        "writes and runs a small program in its workspace and closes.",
        "",
        "**One at a time** (rounds interleaved after one trajectory per mode not measured; "
        "before every open all workers are idle):",
        "",
        "| mode | opens | served by a reused container | p50 s | p95 s | max s | p50 ÷ cold p50 |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in seq.items():
        lines.append(
            f"| {name} | {s['n']} | {s['reused']} | {s['p50_s']} | {s['p95_s']} | {s['max_s']} "
            f"| {s['p50_s'] / cold:.2f} |"
        )
    lines += [
        "",
        f"**Back to back** ({result['settings']['loops']} loops per mode, each opening its next "
        "trajectory as soon as the last one closed):",
        "",
        "| mode | opens | served by a reused container | containers started | p50 s | p95 s "
        "| p50 ÷ cold p50 |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in b2b.items():
        lines.append(
            f"| {name} | {s['n']} | {s['reused']} | {s['containers_started']} | {s['p50_s']} "
            f"| {s['p95_s']} | {s['p50_s'] / b2b['cold']['p50_s']:.2f} |"
        )
    lines += [
        "",
        f"Resets: {rec['recycled']} recycled, {rec['rejected']} rejected; a reset (last slot "
        f"ended → back in the pool, in the background) took {rec['reset_mean_s']} s on average.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny counts)")
    parser.add_argument("--out", help="output directory [bench/out/<time>]")
    opts = parser.parse_args()
    opts.rounds, opts.per_round = (1, 2) if opts.quick else (3, 8)
    opts.loops, opts.each = (2, 2) if opts.quick else (4, 6)
    result = asyncio.run(run(opts))
    out = opts.out or os.path.join(OUT_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recycle.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    text = report(result)
    with open(os.path.join(out, "recycle.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"[recycle] wrote {out}/recycle.{{json,md}}")


if __name__ == "__main__":
    main()
