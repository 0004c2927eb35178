"""Many task images, like RL: image-aware claims and prefetch against the same run
without them.

    python bench/images.py             # ~6 min on 2 cores
    python bench/images.py --quick     # ~1.5 min smoke run
    python bench/images.py --images 32 --waves 16 --per-wave 16   # closer to issue 35

- a local registry (``docker-registry``, Debian's package, on 127.0.0.1) holding
  ``--images`` task images: the sandbox image plus a distinct ``--layer-mb`` MiB
  layer each;
- 2 workers (``--slots`` each), each with its own Docker engine: this host's and a
  second ``dockerd`` with its own data root and socket (removed at the end);
- ``--waves`` training steps, each opening ``--per-wave`` trajectories at once over
  ``--per-wave / --group`` images drawn at random (``--group`` trajectories per
  image, like a GRPO group), each trajectory ``--calls`` calls; a step ends when
  its last trajectory closed;
- the same steps twice: ``aware`` (image-aware claims and prefetch, the defaults)
  and ``unaware`` (``image_aware=False, prefetch=False``); both engines hold no
  task image at the start of each run, and both hold them to the same image
  budget (``--budget-images`` task images above what the engine held before).

Reports pulls per image per engine (the engines' ``pull`` events), open -> first
result for images some engine held when the step began, trajectories/min, and
each engine's image bytes after the run against its budget. Writes
``bench/out/<time>/images.json`` and ``images.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from typing import Any

import docker
from common import IMAGE, OUT_DIR, host_info, pct
from engines import (
    Pulls,
    SecondEngine,
    build_task_images,
    held,
    layers_bytes,
    remove_containers,
    remove_images,
)
from harness import WorkerProc

from toolq.producer import AsyncClient
from toolq.worker.embedded import EmbeddedRedis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.registry import LocalRegistry  # the tests' registry: one copy

WAIT_S = 300.0
SLOW_STOP_S = 60.0  # a worker still stopping after this long dumps its tasks' stacks
MiB = 2**20
MODES = {"aware": True, "unaware": False}


def plan_waves(images: list[str], opts: argparse.Namespace) -> list[list[str]]:
    """Each wave: the image of each of its trajectories (``group`` per image drawn)."""
    rng = random.Random(opts.seed)
    per_image = max(1, opts.per_wave // opts.group)
    drawn = [rng.sample(images, min(per_image, len(images))) for _ in range(opts.waves)]
    return [[image for image in wave for _ in range(opts.group)] for wave in drawn]


async def trajectory(
    client: AsyncClient, traj: str, image: str, calls: int, blob_bytes: int
) -> tuple[float, dict[str, float]]:
    """Open, ``calls`` calls one after another, close; seconds from open to the first
    result, and that time's parts (``timeline``)."""
    started, opened_ms = time.perf_counter(), time.time() * 1000
    await client.open(traj, {"image": image})
    first = await client.call(traj, "bash", {"command": "true"}, wait_s=WAIT_S)
    took, woken_ms = time.perf_counter() - started, time.time() * 1000
    if not first.ok:
        raise RuntimeError(f"{traj} ({image}): {first.error}")
    record = await client.record(traj)
    parts = timeline(opened_ms, record.claimed_ms if record else None, first.stages, woken_ms)
    for i in range(1, calls):
        # The task's own layer is there: the trajectory runs in its image.
        result = await client.call(traj, "bash", {"command": f"wc -c < /opt/task_blob; echo {i}"})
        if not result.ok or str(blob_bytes) not in result.output:
            raise RuntimeError(f"{traj} ({image}) call {i}: {result.error or result.output}")
    await client.close(traj)
    return took, parts


#: The parts of open → first result, in order (seconds; one host's clock).
PARTS = {
    "open_to_claim": "open → claimed by a worker",
    "claim_to_sent": "claimed → first call sent to its sandbox (container start)",
    "sent_to_result": "first call sent → its result at the client",
}


def timeline(
    opened_ms: float, claimed_ms: int | None, stages: dict[str, float] | None, woken_ms: float
) -> dict[str, float]:
    """Open → first result in parts: the claim (the record's ``claimed_ms``), the
    container start (up to the first call's ``sent`` stage), the call itself."""
    sent = (stages or {}).get("sent")
    if claimed_ms is None or sent is None:
        return {}
    return {
        "open_to_claim": (claimed_ms - opened_ms) / 1000,
        "claim_to_sent": (sent - claimed_ms) / 1000,
        "sent_to_result": (woken_ms - sent) / 1000,
    }


async def run_mode(
    mode: str, url: str, engines: dict[str, Any], images: list[str], waves: list[list[str]],
    budgets: dict[str, int], opts: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """One run over every wave with two workers, image awareness ``MODES[mode]``."""
    aware = MODES[mode]
    names = set(images)
    for client in engines.values():  # every run starts with no task image anywhere
        await asyncio.to_thread(remove_images, client, images)
    ns = f"img{mode}{uuid.uuid4().hex[:6]}"
    counters = {host: Pulls(client, names) for host, client in engines.items()}
    workers = []
    try:
        for i, (host, budget) in enumerate(budgets.items()):
            settings = {
                "backend": "docker", "default_image": IMAGE, "slots": opts.slots,
                "docker_host": host or None, "worker_id": f"{mode}-{i}", "image_aware": aware,
                "prefetch": aware, "image_budget_bytes": budget, "image_warm_pool": opts.warm,
            }  # fmt: skip
            workers.append(await asyncio.to_thread(WorkerProc, url, ns, **settings))
        # (seconds, was the image on some engine when the wave began)
        first_s: list[tuple[float, bool]] = []
        first_parts: list[tuple[dict[str, float], bool]] = []
        wave_s: list[float] = []
        async with AsyncClient(url, ns) as client:
            for w, wave in enumerate(waves):
                on_some = set().union(
                    *[await asyncio.to_thread(held, c, names) for c in engines.values()]
                )
                began = time.perf_counter()
                took = await asyncio.gather(
                    *(
                        trajectory(client, f"w{w}-{k}", image, opts.calls, opts.layer_mb * MiB)
                        for k, image in enumerate(wave)
                    )
                )
                wave_s.append(time.perf_counter() - began)
                known = [image in on_some for image in wave]
                first_s += [(s, k) for (s, _), k in zip(took, known, strict=True)]
                first_parts += [(p, k) for (_, p), k in zip(took, known, strict=True)]
                print(f"[images] {mode} wave {w + 1}/{len(waves)}: {wave_s[-1]:.1f} s", flush=True)
    finally:
        for worker in workers:
            stopping = time.perf_counter()
            stop = asyncio.ensure_future(asyncio.to_thread(worker.stop))
            done, _ = await asyncio.wait([stop], timeout=SLOW_STOP_S)
            if not done:  # what it waits for, on its stderr, before it is killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGUSR2)
            await stop
            print(f"[images] {mode}: a worker stopped in {time.perf_counter() - stopping:.1f} s")
        for client in engines.values():  # a worker that had to be killed leaves its own
            await asyncio.to_thread(remove_containers, client, ns)
    per_engine = {host: await asyncio.to_thread(c.stop) for host, c in counters.items()}
    disk = {host: await asyncio.to_thread(layers_bytes, engines[host]) for host in engines}
    trajectories = sum(len(w) for w in waves)
    return {
        "trajectories": trajectories,
        "waves": waves,
        "wall_s": round(sum(wave_s), 2),
        "per_min": round(trajectories / sum(wave_s) * 60, 1),
        "wave_s": [round(s, 2) for s in wave_s],
        "first_s": first_s,
        "first_parts": first_parts,
        "pulls": {host: dict(c) for host, c in per_engine.items()},
        "disk_bytes": disk,
    }


def summarise(run: dict[str, Any], images: int) -> dict[str, Any]:
    """The issue's figures of one run."""
    counts = [n for c in run["pulls"].values() for n in c.values()]
    on_some = sorted(s for s, known in run["first_s"] if known)
    fresh = sorted(s for s, known in run["first_s"] if not known)
    return {
        "pulls_total": sum(counts),
        "pulls_max_per_image_engine": max(counts, default=0),
        "image_engine_pairs_pulled_twice": sum(1 for n in counts if n > 1),
        "images_pulled_by_both": len(
            set.intersection(*[set(c) for c in run["pulls"].values()]) if run["pulls"] else set()
        ),
        "first_p50_s_on_some_engine": round(pct(on_some, 50), 3) if on_some else None,
        "first_n_on_some_engine": len(on_some),
        "first_p50_s_new_image": round(pct(fresh, 50), 3) if fresh else None,
        "first_n_new_image": len(fresh),
        **{f"first_p50_s_{part}": _part_p50(run.get("first_parts", []), part) for part in PARTS},
        "per_min": run["per_min"],
        "wall_s": run["wall_s"],
        "images": images,
    }


def _part_p50(parts: list[tuple[dict[str, float], bool]], part: str) -> float | None:
    """The p50 of one part of open → first result, over opens whose image some engine held."""
    values = sorted(p[part] for p, known in parts if known and part in p)
    return round(pct(values, 50), 3) if values else None


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    dc = docker.from_env()
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/images.py" + " ".join(["", *opts.argv]),
        "host": host_info(),
        "settings": {k: v for k, v in vars(opts).items() if k != "argv"},
    }
    began = time.perf_counter()
    with LocalRegistry() as registry, SecondEngine(IMAGE, dc.info()["Driver"]) as second:
        prefix = f"toolq-bench-task-{uuid.uuid4().hex[:6]}-"
        images = await asyncio.to_thread(
            build_task_images, dc, registry, IMAGE, opts.images, opts.layer_mb, prefix
        )
        print(f"[images] {len(images)} task images in {registry.host}", flush=True)
        engines = {"": dc, second: docker.DockerClient(base_url=second)}
        budgets = {
            host: layers_bytes(c) + math.ceil(opts.budget_images * (opts.layer_mb + 1) * MiB)
            for host, c in engines.items()
        }
        waves = plan_waves(images, opts)
        try:
            for mode in opts.modes:
                with EmbeddedRedis() as server:
                    raw = await run_mode(mode, server.url, engines, images, waves, budgets, opts)
                result[mode] = {**summarise(raw, len(images)), "raw": raw}
        finally:
            for client in engines.values():
                remove_images(client, images)
            engines[second].close()
        result["budget_bytes"] = budgets
    result["total_s"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "## Many task images: image-aware claims and prefetch",
        "",
        f"Measured {result['when']} with `{result['command']}` ({result['host'].get('cpus')} "
        f"cpus, Docker {result['host'].get('docker_engine')}; {result['total_s']} s in all): "
        f"{s['images']} task images of {s['layer_mb']} MiB each above the sandbox image in a "
        f"local registry, 2 workers ({s['slots']} slots each) on 2 engines, {s['waves']} "
        f"waves of {s['per_wave']} trajectories ({s['group']} per image), {s['calls']} calls "
        f"each; `image_warm_pool={s['warm']}`; image budget: {s['budget_images']} task "
        "images above what each engine held before.",
        "",
        "| figure | goal | " + " | ".join(m for m in MODES if m in result) + " |",
        "|---|---|" + "--:|" * sum(m in result for m in MODES),
    ]
    rows = [
        ("pulls per image per engine, most", "≤ 1", "pulls_max_per_image_engine"),
        ("pulls in all", "", "pulls_total"),
        ("images pulled by both engines", "", "images_pulled_by_both"),
        ("open → first result p50 s, image on some engine", "≤ 0.1", "first_p50_s_on_some_engine"),
        ("(opens of that kind)", "", "first_n_on_some_engine"),
        *((f"… {label}, p50 s", "", f"first_p50_s_{part}") for part, label in PARTS.items()),
        ("open → first result p50 s, image on no engine", "", "first_p50_s_new_image"),
        ("trajectories/min", "", "per_min"),
    ]
    for label, goal, key in rows:
        cells = [str(result[m][key]) for m in MODES if m in result]
        lines.append(f"| {label} | {goal} | " + " | ".join(cells) + " |")
    if "aware" in result and "unaware" in result:
        ratio = result["aware"]["per_min"] / result["unaware"]["per_min"]
        lines.append(f"| trajectories/min aware ÷ unaware | ≥ 2 | {ratio:.2f} | |")
    for m in MODES:
        if m not in result:
            continue
        for host, used in result[m]["raw"]["disk_bytes"].items():
            budget = result["budget_bytes"][host]
            engine = "first engine" if not host else "second engine"
            lines.append(
                f"| image MB on the {engine} after the {m} run (budget {budget / 1e6:.0f}) "
                f"| ≤ budget | {used / 1e6:.0f} {'✓' if used <= budget else '✗'} | |"
            )
    lines.append("")
    return "\n".join(lines)


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny counts)")
    parser.add_argument("--images", type=int, default=12, help="task images [12]")
    parser.add_argument("--layer-mb", type=int, default=20, help="each task image's layer [20]")
    parser.add_argument("--waves", type=int, default=8, help="training steps [8]")
    parser.add_argument("--per-wave", type=int, default=12, help="trajectories per step [12]")
    parser.add_argument("--group", type=int, default=3, help="trajectories per image in a step [3]")
    parser.add_argument("--calls", type=int, default=10, help="calls per trajectory [10]")
    parser.add_argument("--slots", type=int, default=4, help="slots per worker [4]")
    parser.add_argument(
        "--warm", type=int, default=4, help="image_warm_pool of each worker, both runs [4]"
    )
    parser.add_argument(
        "--budget-images", type=float, default=None,
        help="image budget: this many task images per engine [0.75 x --images]",
    )  # fmt: skip
    parser.add_argument("--modes", default="aware,unaware", help="runs, in order [aware,unaware]")
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--out", help="output directory [bench/out/<time>]")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.images, opts.layer_mb, opts.waves, opts.per_wave = 3, 2, 2, 4
        opts.group, opts.calls, opts.slots, opts.warm = 2, 3, 2, 1
    if opts.budget_images is None:
        opts.budget_images = math.ceil(0.75 * opts.images)
    opts.modes = [m for m in opts.modes.split(",") if m]
    if unknown := set(opts.modes) - set(MODES):
        parser.error(f"unknown modes: {unknown}")
    opts.argv = argv
    return opts


def main() -> None:
    opts = options(sys.argv[1:])
    result = asyncio.run(run(opts))
    out = opts.out or os.path.join(OUT_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "images.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    text = report(result)
    with open(os.path.join(out, "images.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"[images] wrote {out}/images.{{json,md}}")


if __name__ == "__main__":
    main()
