"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from toolq.producer import Client

#: The `toolq` command line, run with the interpreter under test.
TOOLQ = [sys.executable, "-m", "toolq.producer.cli"]
#: Label every container toolq starts carries.
LABELS = "toolq.managed=1"


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
