"""Where one call's time goes, at one trajectory (`true`).

    python bench/stages.py [--calls 400] [--backend local|docker]

A worker process and an AsyncClient loop over one trajectory. Medians per
call, from the result's own fields (1 ms resolution: read the medians, not
single calls): the entry to the call's start in the sandbox (`queued_ms`),
the agent's run (`run_ms`), the result made to the client holding it
(`finished → client`), and the rest (the submit's round trip up to the
entry, the agent's reply to the worker, the result made).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

from toolq.producer import AsyncClient
from toolq.worker.embedded import EmbeddedRedis

IMAGE = "toolq-sandbox:test"


async def measure(url: str, ns: str, calls: int) -> list[dict[str, float]]:
    client = AsyncClient(url, ns)
    await client.open("t")
    await client.call("t", "bash", {"command": "true"}, wait_s=300)  # the slot is up
    rows = []
    for _ in range(calls):
        t0 = time.time() * 1000
        r = await client.call("t", "bash", {"command": "true"}, wait_s=60)
        t1 = time.time() * 1000
        rows.append(
            {
                "total": t1 - t0,
                "queued_ms": r.queued_ms,
                "run_ms": r.run_ms,
                "finished → client": t1 - r.finished_ms,
                "rest": (r.finished_ms - t0) - r.queued_ms - r.run_ms,
            }
        )
    await client.close("t")
    return rows[len(rows) // 8 :]  # warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--backend", default="local", choices=["local", "docker"])
    args = parser.parse_args()
    toolq = os.path.join(os.path.dirname(sys.executable), "toolq")
    with EmbeddedRedis() as server:
        ns = f"stages{uuid.uuid4().hex[:6]}"
        cmd = [toolq, "--redis-url", server.url, "--namespace", ns, "worker"]
        cmd += ["--backend", args.backend, "--slots", "2", "--log-level", "WARNING"]
        if args.backend == "docker":
            cmd += ["--image", IMAGE]
        worker = subprocess.Popen(cmd)
        try:
            rows = asyncio.run(measure(server.url, ns, args.calls))
        finally:
            worker.terminate()
            worker.wait(60)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
