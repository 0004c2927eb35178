"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

import pytest
import redis

from toolq.producer import Client
from toolq.schemas import Keys

#: The `toolq` command line, run with the interpreter under test.
TOOLQ = [sys.executable, "-m", "toolq.producer.cli"]
#: Label every container toolq starts carries.
LABELS = "toolq.managed=1"


def redis_client(url: str) -> Any:
    """A plain redis-py client for a toolq Redis URL: a Redis, or a RedisCluster."""
    from toolq.schemas.local import redis_target

    target, cluster = redis_target(url)
    return redis.RedisCluster.from_url(target) if cluster else redis.Redis.from_url(target)


def unique_sleep() -> str:
    """A ``sleep`` argument no other test (or engineer) uses, to find it with ps."""
    return f"1000.{uuid.uuid4().int % 10**6:06d}"


def count_procs(client: Client, traj: str, needle: str) -> int:
    """Live (non-zombie) processes whose command line contains ``needle``, via ps."""
    pattern = f"[{needle[0]}]{needle[1:]}"  # the bracket keeps grep from matching itself
    command = f"ps -eo stat=,args= | grep -v '^Z' | grep -c '{pattern}' || true"
    r = client.call(traj, "bash", {"command": command})
    assert r.exit_code == 0, r
    return int(r.output.strip())


def containers_left(namespaces: set[str]) -> list[Any]:
    """Names of toolq containers (running or not) that belong to these namespaces."""
    import docker

    listed = docker.from_env().api.containers(all=True, filters={"label": LABELS})
    return [c["Names"] for c in listed if (c.get("Labels") or {}).get("toolq.ns") in namespaces]


def worker_process(  # a real `toolq worker` process, local backend, fast takeovers
    url: str, ns: str, worker_id: str, *extra: str, log_dir: str | None = None
) -> subprocess.Popen:
    env = dict(os.environ, TOOLQ_REDIS_URL=url, TOOLQ_NAMESPACE=ns, TOOLQ_WORKER_ID=worker_id)
    proc = subprocess.Popen(
        [
            *TOOLQ,
            "worker",
            "--backend",
            "local",
            "--heartbeat-s",
            "0.3",
            "--dead-after-s",
            "2",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{log_dir}/{worker_id}.log", "w") if log_dir else subprocess.DEVNULL,  # noqa: SIM115
    )
    r = redis_client(url)
    deadline = time.monotonic() + 30
    while r.zscore(Keys(ns).workers, worker_id) is None:
        assert time.monotonic() < deadline, "worker did not register"
        time.sleep(0.05)
    return proc


def bridge_gateway(dc: Any) -> str:
    """The host's address on Docker's default bridge, on any engine.

    Some engines (a freshly started dockerd 20.10) list the bridge's subnet
    without a ``Gateway``: then the bridge interface's own address is the
    answer, and failing that the subnet's first host (where Docker puts it).
    """
    attrs = dc.networks.get("bridge").attrs
    ipam = (attrs.get("IPAM") or {}).get("Config") or []
    configs = [c for c in ipam if "." in c.get("Subnet", "")]  # IPv4 only
    for config in configs:
        if config.get("Gateway"):
            return str(config["Gateway"]).split("/")[0]
    interface = (attrs.get("Options") or {}).get("com.docker.network.bridge.name", "docker0")
    try:
        shown = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", interface], capture_output=True, text=True
        ).stdout
    except OSError:  # no iproute2
        shown = ""
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", shown)
    if found:
        return found.group(1)
    assert configs, f"the bridge network has no IPv4 subnet: {attrs.get('IPAM')}"
    return str(next(ipaddress.ip_network(configs[0]["Subnet"]).hosts()))


def wait_for(check: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    """Poll until ``check()`` is truthy (the deadline only bounds a failing test)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def missing(what: str) -> NoReturn:
    """A tool the test needs is not here: skip on a developer's machine, but fail
    where TOOLQ_STRICT=1 (CI), because a skipped test is a missing test."""
    if os.environ.get("TOOLQ_STRICT") == "1":
        pytest.fail(f"{what} (TOOLQ_STRICT=1: missing tools fail)")
    pytest.skip(what)
