"""Helpers every benchmark path shares: statistics, Redis accounting, host facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(BENCH_DIR, "out")
IMAGE = os.environ.get("TOOLQ_TEST_IMAGE", "toolq-sandbox:test")


def pct(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Run:
    """One measured row: a path, a tool, a concurrency, every latency and the wall time."""

    path: str
    tool: str
    concurrency: int
    samples_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] | None = None  # Accounting.counts() of toolq runs
    # toolq at one trajectory: each call's time per stage (stage_breakdown), in ms
    breakdown: list[dict[str, float]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.samples_ms) or [float("nan")]
        n = len(self.samples_ms)
        return {
            "path": self.path,
            "tool": self.tool,
            "concurrency": self.concurrency,
            "n": n,
            "errors": self.errors,
            "p50_ms": round(pct(ordered, 50), 3),
            "p99_ms": round(pct(ordered, 99), 3),
            "mean_ms": round(statistics.fmean(ordered), 3),
            "max_ms": round(ordered[-1], 3),
            "calls_per_s": round(n / self.wall_s, 1) if self.wall_s > 0 else 0.0,
            **self.extra,
            **per_call(self.redis, n),
            **median_stages(self.breakdown),
        }

    def merge(self, other: Run) -> None:
        """Add another slice of the same measurement (rounds interleaved with other paths)."""
        self.samples_ms += other.samples_ms
        self.wall_s += other.wall_s
        self.errors += other.errors
        self.breakdown += other.breakdown
        if other.redis:
            mine = self.redis or {}
            for key, value in other.redis.items():
                if isinstance(value, dict):
                    into = mine.setdefault(key, {})
                    for name, count in value.items():
                        into[name] = into.get(name, 0) + count
                else:
                    mine[key] = mine.get(key, 0) + value
            self.redis = mine


#: A call's path through toolq, stage by stage: (name, from, to), where the ends
#: are ``Result.stages`` names or the client's own ``submitted`` and ``woken``.
STAGES = (
    ("submit → read", "submitted", "read"),
    ("read → sent", "read", "sent"),
    ("sent → tool", "sent", "tool_started"),
    ("tool", "tool_started", "tool_ended"),
    ("tool → replied", "tool_ended", "replied"),
    ("replied → made", "replied", "made"),
    ("made → client", "made", "woken"),
)


def stage_breakdown(times: dict[str, float]) -> dict[str, float]:
    """One call's milliseconds per stage (``STAGES``), from its stage times."""
    return {name: times[b] - times[a] for name, a, b in STAGES if a in times and b in times}


def median_stages(breakdown: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each stage over a run's calls (``stages_ms``), if it has them."""
    if not breakdown:
        return {}
    names = [name for name, _, _ in STAGES if all(name in b for b in breakdown)]
    return {"stages_ms": {n: round(statistics.median(b[n] for b in breakdown), 3) for n in names}}


def per_call(redis: dict[str, Any] | None, calls: int) -> dict[str, Any]:
    """Redis traffic per call, from ``Accounting.counts`` (summed over rounds)."""
    if not redis:
        return {}
    calls = max(calls, 1)
    server = redis["server_cmds"]
    return {
        "client_rt_per_call": round(redis["client_rt"] / calls, 2),
        "client_cmds_per_call": round(redis["client_cmds"] / calls, 2),
        "worker_rt_per_call": round(redis["worker_rt"] / calls, 2),
        "worker_cmds_per_call": round(redis["worker_cmds"] / calls, 2),
        "server_cmds_per_call": round(sum(server.values()) / calls, 2),
        "worker_cpu_ms_per_call": round(1000 * redis.get("worker_cpu_s", 0.0) / calls, 3),
        "redis_cpu_us_per_call": round(1e6 * redis.get("redis_cpu_s", 0.0) / calls, 1),
        "server_cmds": server,
    }


@dataclass
class Budget:
    """How much to measure at each level: a time box and a call cap."""

    duration_s: float
    max_calls: int
    min_calls: int = 1

    def split(self, rounds: int) -> Budget:
        """One of ``rounds`` equal slices of this budget."""
        return Budget(
            self.duration_s / rounds,
            max(1, -(-self.max_calls // rounds)),
            max(1, -(-self.min_calls // rounds)),
        )

    def done(self, started: float, calls: int) -> bool:
        if calls < self.min_calls:
            return False
        return calls >= self.max_calls or time.perf_counter() - started >= self.duration_s


# -- Redis accounting ---------------------------------------------------------
class RedisCounter:
    """Counts round trips (socket writes) and commands of redis-py's asyncio client.

    A pipeline is one round trip carrying several commands; a blocking XREAD is
    one round trip. Installed by patching the asyncio Connection class, so it
    sees every client of the process.
    """

    round_trips = 0
    commands = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        from redis.asyncio.connection import AbstractConnection

        send, pack = AbstractConnection.send_packed_command, AbstractConnection.pack_command

        async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            cls.round_trips += 1
            await send(self, command, check_health)

        def pack_command(self: Any, *args: Any) -> Any:
            cls.commands += 1
            return pack(self, *args)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
        cls._installed = True

    @classmethod
    def snapshot(cls) -> dict[str, int]:
        return {"round_trips": cls.round_trips, "commands": cls.commands}


def commandstats(redis: Any) -> dict[str, int]:
    """Server-side command counts (``INFO commandstats``), by command name."""
    info = redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def redis_cpu_s(redis: Any) -> float:
    """CPU seconds the Redis server has used (user + system, main thread and all)."""
    info = redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system; 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# -- processes and memory --------------------------------------------------------
def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants (the local backend's agents)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{name}/stat", "rb") as fh:
                    raw = fh.read()
                ppid = int(raw[raw.rfind(b")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss_kb(current)
        todo += children.get(current, [])
    return total


def container_memory_mib(api: Any, cids: list[str]) -> list[float]:
    """What ``docker stats`` shows as MEM USAGE (usage less inactive file cache), in MiB."""
    out = []
    for cid in cids:
        with contextlib.suppress(Exception):
            mem = api.stats(cid, stream=False, one_shot=True).get("memory_stats") or {}
            stats = mem.get("stats") or {}
            cache = stats.get("inactive_file", stats.get("total_inactive_file", 0))
            out.append((mem.get("usage", 0) - cache) / 2**20)
    return out


@contextlib.contextmanager
def stage(name: str, log: list[dict[str, Any]]) -> Iterator[None]:
    """Print and record how long a stage of the run took."""
    started = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        yield
    finally:
        took = time.perf_counter() - started
        log.append({"stage": name, "s": round(took, 1)})
        print(f"[bench] {name}: {took:.1f}s", flush=True)


def host_info() -> dict[str, Any]:
    """The machine the figures were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    with contextlib.suppress(Exception):
        import docker

        version = docker.from_env().version()
        info["docker_engine"] = version.get("Version")
    with contextlib.suppress(Exception):
        from toolq.worker.embedded import redis_server_binary

        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        info["redis"] = next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())
    with contextlib.suppress(Exception):
        import redis
        import rq

        info["redis_py"] = redis.__version__
        info["rq"] = rq.__version__
    return info


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
