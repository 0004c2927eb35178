"""A toolq worker process for the benchmark, with its Redis traffic counted.

    python bench/worker_main.py SETTINGS_JSON STATS_FILE

Runs like ``toolq worker`` (SIGTERM stops it gracefully). On SIGUSR1 it writes
its Redis round trips, commands, RSS and booted warm containers to STATS_FILE as one JSON object; on
SIGUSR2 every asyncio task's stack to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from common import RedisCounter, rss_kb

from toolq.worker.service import connect, make_backend
from toolq.worker.settings import WorkerSettings
from toolq.worker.worker import Worker


def dump(path: str, worker: Worker) -> None:
    boxes = getattr(worker.backend, "_boxes", [])
    # Warm containers booted and free (a benchmark step waits for its pool to refill).
    warm = sum(1 for b in boxes if b.ready and not b.used and not b.closing and not b.dead)
    data = {**RedisCounter.snapshot(), "rss_kb": rss_kb(os.getpid()), "warm_ready": warm}
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)


def dump_tasks() -> None:
    """SIGUSR2: every task's stack to stderr (what a worker that does not stop waits for)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def main(settings: WorkerSettings, stats_path: str) -> None:
    RedisCounter.install()
    redis = connect(settings.redis_url or "")
    worker = Worker(settings, redis, make_backend(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGUSR1, dump, stats_path, worker)
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks)
    try:
        await worker.run()
    finally:
        await redis.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="worker %(levelname)s %(message)s")
    logging.getLogger("toolq.worker.slots").setLevel(os.environ.get("TOOLQ_SLOTS_LOG", "WARNING"))
    fields = json.loads(sys.argv[1])
    fields["tools_modules"] = tuple(fields.get("tools_modules", ()))
    asyncio.run(main(WorkerSettings(**fields), sys.argv[2]))
