"""The alternative users would pick: RQ jobs doing `docker exec`, and `docker exec` alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import redis
import rq_jobs
from calls import EXEC_WORKDIR, SMALL_FILE, SMALL_TEXT, WRITE_TEXT, Call, tar_of
from common import BENCH_DIR, IMAGE
from harness import CallFn
from rq import Queue
from rq.results import Result as RqResult

QUEUE = "toolq-bench"
LABEL = "toolq.bench"


class Containers:
    """Plain containers (``sleep infinity``), one per trajectory, for the exec paths."""

    def __init__(self, count: int, image: str = IMAGE, start_concurrency: int = 4) -> None:
        self.api: Any = docker.from_env().api
        self.image = image
        started = time.perf_counter()
        with ThreadPoolExecutor(start_concurrency) as pool:
            self.cids = list(pool.map(self._start, range(count)))
        self.start_s = time.perf_counter() - started

    def _start(self, _index: int) -> str:
        host = self.api.create_host_config(
            init=True, network_mode="none", mem_limit="1g", memswap_limit="1g", pids_limit=256
        )
        cid = str(
            self.api.create_container(
                self.image, ["sleep", "infinity"], labels={LABEL: "1"}, host_config=host
            )["Id"]
        )
        self.api.start(cid)
        self.api.put_archive(cid, EXEC_WORKDIR, tar_of(SMALL_FILE, SMALL_TEXT.encode()))
        return cid

    def remove(self) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda c: self.api.remove_container(c, force=True), self.cids))


def exec_job(call: Call) -> tuple[Any, tuple[Any, ...]]:
    """The job function and its arguments (after the container id) for one call."""
    if call.argv is None:  # write_file: upload a tar, as a docker-py user would
        return rq_jobs.upload, (EXEC_WORKDIR, tar_of("out.txt", WRITE_TEXT.encode()))
    return rq_jobs.exec_call, (call.argv, EXEC_WORKDIR)


def _checked(result: tuple[int, str]) -> tuple[bool, str]:
    code, output = result
    return code == 0, output


# -- docker exec alone --------------------------------------------------------------
def exec_fns(cids: list[str], call: Call, pool: ThreadPoolExecutor) -> list[CallFn]:
    """docker-py exec from this process, in threads: no queue at all."""
    fn, args = exec_job(call)

    def make(cid: str) -> CallFn:
        async def run(_index: int) -> tuple[bool, str]:
            loop = asyncio.get_running_loop()
            return _checked(await loop.run_in_executor(pool, fn, cid, *args))

        return run

    return [make(cid) for cid in cids]


def exec_cli_fns(cids: list[str], call: Call) -> list[CallFn]:
    """The ``docker`` CLI: a process per call."""
    assert call.argv is not None

    def make(cid: str) -> CallFn:
        async def run(_index: int) -> tuple[bool, str]:
            proc = await asyncio.create_subprocess_exec(
                "docker", "exec", "-w", EXEC_WORKDIR, cid, *call.argv,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            return proc.returncode == 0, out.decode("utf-8", "replace")

        return run

    return [make(cid) for cid in cids]


# -- RQ ----------------------------------------------------------------------------------
class RqWorkers:
    """``rq worker`` processes (SimpleWorker: no fork per job, the faster choice here)."""

    def __init__(self, redis_url: str, count: int, worker_class: str = "SimpleWorker") -> None:
        self.redis_url = redis_url
        env = {
            **os.environ,
            "PYTHONPATH": BENCH_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        rq_cli = [sys.executable, "-c", "from rq.cli import main; main()"]
        argv = [*rq_cli, "worker", "-u", redis_url, "-w", f"rq.worker.{worker_class}"]
        argv += ["-P", BENCH_DIR, "--logging_level", "WARNING", "-q", QUEUE]
        self.procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL) for _ in range(count)
        ]
        self.conn = redis.Redis.from_url(redis_url)
        self.queue = Queue(QUEUE, connection=self.conn)

    def fns(self, cids: list[str], call: Call, pool: ThreadPoolExecutor) -> list[CallFn]:
        """Enqueue one job per call, block on its result (RQ's XREAD-based wait)."""
        fn, args = exec_job(call)

        def blocking(cid: str) -> tuple[bool, str]:
            job = self.queue.enqueue(fn, cid, *args, result_ttl=600, job_timeout=120)
            res = job.latest_result(timeout=120)
            if res is None:
                return False, "no result in 120 s"
            if res.type != RqResult.Type.SUCCESSFUL:
                return False, str(res.exc_string)[-300:]
            return _checked(res.return_value)

        def make(cid: str) -> CallFn:
            async def run(_index: int) -> tuple[bool, str]:
                return await asyncio.get_running_loop().run_in_executor(pool, blocking, cid)

            return run

        return [make(cid) for cid in cids]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.conn.close()
