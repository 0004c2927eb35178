"""mini-swe-agent on toolq: ``ToolqEnvironment`` under a real ``mini`` run.

mini-swe-agent's own environment tests run against it in
``tests/minisweagent_upstream``; here the ``mini`` command itself runs a task
end to end with mini-swe-agent's deterministic test model, its config naming
``toolq.integrations.minisweagent.ToolqEnvironment``, through a real Redis and
worker on each backend; and the environment's failures are reported the way
mini-swe-agent reports its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TEST_IMAGE
from toolq.integrations.minisweagent import ToolqEnvironment
from toolq.producer import Client

GREETING = 'print("hello from toolq")'


def step(text: str, command: str) -> dict[str, Any]:
    """One answer of mini-swe-agent's ``DeterministicModel`` (its ``make_output``)."""
    content = f"{text}\n\n```mswea_bash_command\n{command}\n```"
    return {
        "role": "assistant",
        "content": content,
        "extra": {"actions": [{"command": command}], "cost": 0.0},
    }


def wait_ended(client: Client, traj: str) -> str:
    deadline = time.monotonic() + 60
    while (record := client.record(traj)) is None or not record.status.final:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    return record.status.value


def test_a_mini_run_with_the_deterministic_model_completes_on_toolq(
    backend, start_worker, redis_url: str, ns: str, client: Client, tmp_path: Path
):
    start_worker(backend)
    config = {
        "model": {
            "model_class": "minisweagent.models.test_models.DeterministicModel",
            "model_name": "deterministic",
            "outputs": [
                step(
                    "I write the script.",
                    f"printf '%s\\n' '{GREETING}' > hello.py && python hello.py",
                ),
                step(
                    "It works: I submit.",
                    "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat hello.py",
                ),
            ],
        },
        "environment": {
            "environment_class": "toolq.integrations.minisweagent.ToolqEnvironment",
            "redis_url": redis_url,
            "namespace": ns,
            "image": TEST_IMAGE,
            "trajectory_prefix": "mini-test",
        },
    }
    if backend == "local":  # python is python3 on the host too
        config["environment"]["env"] = {"HOME": str(tmp_path)}
    (tmp_path / "toolq.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run.traj.json"
    env = {**os.environ, "MSWEA_CONFIGURED": "1", "MSWEA_SILENT_STARTUP": "1"}
    env["MSWEA_GLOBAL_CONFIG_DIR"] = str(tmp_path / "mswea")
    command = [sys.executable, "-m", "minisweagent.run.mini", "-c", "mini.yaml"]
    command += ["-c", str(tmp_path / "toolq.yaml"), "-y", "--exit-immediately", "-o", str(out)]
    command += ["-t", "Write hello.py that prints a greeting, run it, and submit it."]
    run = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["info"]["exit_status"] == "Submitted", saved["info"]
    assert saved["info"]["submission"] == GREETING + "\n"
    observations = [m["content"] for m in saved["messages"] if m["role"] in ("user", "tool")]
    assert any("hello from toolq" in str(o) for o in observations), observations
    traj = saved["info"]["config"]["toolq_trajectory"]
    assert traj.startswith("mini-test-")
    # the environment closed its trajectory when mini ended: both commands ran there
    assert wait_ended(client, traj) == "completed"
    record = client.record(traj)
    assert record is not None and record.calls_total == 2


def test_failures_are_reported_as_mini_swe_agent_reports_its_own(
    start_worker, redis_url: str, ns: str, client: Client
):
    # no worker: the constructor gives up after startup_timeout_s, the trajectory cancelled
    with pytest.raises(RuntimeError, match="no sandbox for trajectory"):
        ToolqEnvironment(
            redis_url=redis_url, namespace=ns, startup_timeout_s=1, trajectory_id="mini-none"
        )
    assert wait_ended(client, "mini-none") == "cancelled"
    start_worker("local")
    env = ToolqEnvironment(
        redis_url=redis_url, namespace=ns, spec={"limits": {"max_output_bytes": 1024}}
    )
    try:
        big = env.execute({"command": "seq 1 100000"})
        assert big["returncode"] == 0 and "[..." in big["output"] and len(big["output"]) < 1200
        slow = env.execute({"command": "echo started; sleep 30"}, timeout=1)
        assert slow["returncode"] == -1 and slow["extra"]["exception_type"] == "TimeoutExpired"
        assert "timed out after 1 seconds" in slow["exception_info"] and "started" in slow["output"]
        # the trajectory ends underneath (a cancel): a clear error, not an exception
        client.cancel(env.trajectory_id)
        wait_ended(client, env.trajectory_id)
        gone = env.execute({"command": "true"})
        assert gone["returncode"] == -1 and "trajectory_ended" in gone["exception_info"], gone
    finally:
        env.cleanup()
    env.cleanup()  # twice: nothing happens
    # Redis unreachable: the command's result says so
    down = ToolqEnvironment.__new__(ToolqEnvironment)
    down.__dict__.update(env.__dict__)
    down.client = Client("redis://127.0.0.1:1/0", ns)
    failed = down.execute({"command": "true"})
    assert failed["returncode"] == -1 and failed["extra"]["exception_type"], failed
    down.cleanup()
