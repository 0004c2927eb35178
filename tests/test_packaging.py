"""The distribution: what the wheel ships, and what the producer needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_every_package_and_the_schemas(tmp_path):
    # Build from a clean copy: a build/ directory left in the tree would hide a
    # package missing from pyproject.toml.
    source = tmp_path / "src"
    junk = shutil.ignore_patterns("build", "dist", "*.egg-info", ".git", "node_modules", "out")
    shutil.copytree(ROOT, source, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("toolq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("schemas/keys.py", "producer/client.py", "worker/agent/loop.py",
                   "worker/backends/docker.py", "worker/backends/local.py",
                   "schemas/json/result.json"):  # fmt: skip
        assert f"toolq/{module}" in names, module
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    adapters = sorted(p.name for p in (ROOT / "integrations").glob("*.py"))
    assert "mcp_server.py" in adapters and "swerex.py" in adapters and "skyrl.py" in adapters
    for name in adapters:  # every adapter module, as toolq.integrations.<name>
        assert f"toolq/integrations/{name}" in names, name


def test_the_producer_does_not_import_the_worker_stack():
    code = (
        "import sys, toolq.producer, toolq.producer.cli\n"
        "heavy = [m for m in ('docker', 'rq', 'prometheus_client', 'toolq.worker.worker')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_toolq_imports_no_agent_framework():
    """The frameworks are extras: importing the producer, its CLI, the worker or the
    integrations package must not import any of them (only an adapter module does)."""
    code = (
        "import sys, toolq.producer, toolq.producer.cli, toolq.worker.worker, toolq.integrations\n"
        "frameworks = ('mcp', 'swerex', 'skyrl_gym', 'uvicorn', 'omegaconf', 'minisweagent')\n"
        "imported = [m for m in frameworks if m in sys.modules]\n"
        "assert not imported, imported\n"
        "import toolq.integrations.mcp_server\n"
        "assert 'mcp' in sys.modules  # the check itself can fail\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
