"""mini-swe-agent: per-command latency of ``ToolqEnvironment`` against its own
``DockerEnvironment`` (one ``docker exec`` per command), in one run.

    python bench/mini_env.py [--commands 200] [--rounds 3]

Both environments run the same commands, one at a time as an agent does, in the
same image (``TOOLQ_TEST_IMAGE``, default ``toolq-sandbox:test``): ``true``
(the per-command floor) and ``ls -la /usr/bin | wc -l`` (some work and output).
toolq's side is a worker process (Docker backend) behind an embedded Redis;
``DockerEnvironment`` runs ``docker exec ... bash -lc`` (its default
interpreter) per command. Rounds alternate the two, so both see the same load.
Prints a Markdown table of median, p95 and mean per command and the ratio;
absolute times on a shared machine are noise, the ratio within one run is the
result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from common import IMAGE, pct
from harness import WorkerProc
from minisweagent.environments.docker import DockerEnvironment

from toolq.integrations.minisweagent import ToolqEnvironment
from toolq.worker.embedded import EmbeddedRedis

COMMANDS = {"true": "true", "ls+wc": "ls -la /usr/bin | wc -l"}
Samples = dict[tuple[str, str], list[float]]


def timed(env: Any, command: str, n: int) -> list[float]:
    """Milliseconds of each of ``n`` ``execute`` calls of ``command``."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        out = env.execute({"command": command})
        samples.append((time.perf_counter() - started) * 1000.0)
        if out["returncode"] != 0:
            raise RuntimeError(f"{command!r} failed: {out}")
    return samples


def measure(make: dict[str, Callable[[], Any]], n: int, rounds: int) -> Samples:
    """Samples per (environment, command), the environments alternating by round."""
    samples: Samples = {}
    envs = {name: factory() for name, factory in make.items()}
    try:
        for env in envs.values():  # warm-up: first calls start nothing new
            timed(env, "true", 5)
        for _ in range(rounds):
            for name, env in envs.items():
                for label, command in COMMANDS.items():
                    samples.setdefault((name, label), []).extend(timed(env, command, n))
    finally:
        for env in envs.values():
            env.cleanup()
    return samples


def report(samples: Samples) -> str:
    lines = [
        "| command | environment | median ms | p95 ms | mean ms | n |",
        "|---|---|---|---|---|---|",
    ]
    for label in COMMANDS:
        medians = {}
        for (name, of), values in samples.items():
            if of != label:
                continue
            ordered = sorted(values)
            medians[name] = statistics.median(ordered)
            lines.append(
                f"| `{label}` | {name} | {medians[name]:.2f} | {pct(ordered, 95):.2f} | "
                f"{statistics.fmean(ordered):.2f} | {len(ordered)} |"
            )
        if {"toolq", "docker exec"} <= medians.keys():
            ratio = medians["docker exec"] / medians["toolq"]
            lines.append(f"| `{label}` | ratio (median) | {ratio:.1f}x faster on toolq | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200, help="per command, per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        ns = f"minibench{uuid.uuid4().hex[:6]}"
        worker = WorkerProc(server.url, ns, backend="docker", default_image=IMAGE, slots=4)
        try:
            make = {
                "toolq": lambda: ToolqEnvironment(redis_url=server.url, namespace=ns, image=IMAGE),
                "docker exec": lambda: DockerEnvironment(image=IMAGE, cwd="/workspace"),
            }
            samples = measure(make, args.commands, args.rounds)
        finally:
            worker.stop()
    print(report(samples))


if __name__ == "__main__":
    main()
