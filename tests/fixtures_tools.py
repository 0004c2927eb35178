"""A user tools module for the tests: what a user's ``mypkg/tools.py`` looks like.

Loaded by ``toolq worker --tools tests.fixtures_tools`` (validation, specs) and by
``toolq rq-worker --tools tests.fixtures_tools`` (execution), from the repository root.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import Field

from toolq.worker import ToolArgs, tool
from toolq.worker.tools import Registry


class AddArgs(ToolArgs):
    """Arguments of ``add``."""

    a: int = Field(description="First addend.")
    b: int = Field(description="Second addend.")


@tool("add", "Add two integers.", args=AddArgs, aliases=["sum_numbers"])
def add(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b}


@tool(timeout_s=5)
def shout(text: str, times: int = 1) -> str:
    """Upper-case a text, repeated ``times`` times.

    (Name, description and argument model all come from this function.)
    """
    return " ".join([text.upper()] * times)


@tool("fail", "Raise ValueError with the given message.")
def fail(message: str) -> None:
    raise ValueError(message)


@tool("slow", "Sleep, then say so.", timeout_s=1)
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@tool("flaky", "Fail until called more than fail_times times.", retries=2)
def flaky(counter_path: str, fail_times: int) -> str:
    # Attempts run in separate work horses: the count lives in a file.
    path = Path(counter_path)
    attempt = int(path.read_text() if path.exists() else "0") + 1
    path.write_text(str(attempt))
    if attempt <= fail_times:
        raise RuntimeError(f"attempt {attempt} failed")
    return f"succeeded on attempt {attempt}"


@tool("append_line", "Append a line to a file, after an optional pause.")
def append_line(path: str, line: str, pause_s: float = 0.0) -> str:
    time.sleep(pause_s)
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


@tool("block", "Write a marker file, then wait until a release file exists.", timeout_s=120)
def block(marker: str, release: str) -> str:
    Path(marker).write_text("started")
    while not Path(release).exists():
        time.sleep(0.05)
    return "released"


@tool("big_dict", "Return a dict of n entries.")
def big_dict(n: int) -> dict[str, int]:
    return {f"key{i}": i for i in range(n)}


@tool("die", "Kill the process running the tool (no RQ callback runs).")
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def toolq_register(registry: Registry) -> None:
    """Hook for what a decorator cannot say: here, a framework's name for ``bash``."""
    registry.alias("run_shell", "bash")
