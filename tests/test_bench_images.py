"""``bench/images.py --quick`` runs end to end: a registry, a second Docker engine,
both runs; the second engine and its data are gone afterwards (no timing is checked)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_docker

BENCH = Path(__file__).resolve().parent.parent / "bench" / "images.py"
SOCKET = "/run/toolq-bench-docker2.sock"


@pytest.mark.timeout(300)
def test_quick_mode_runs_both_modes_and_cleans_up(tmp_path: Path) -> None:
    require_docker()
    # Root, dockerd and docker-registry: a second engine and a registry (.ci/run
    # installs them; missing, this fails rather than skips).
    assert os.geteuid() == 0 and shutil.which("dockerd"), "needs root and dockerd"
    assert os.path.exists("/usr/bin/docker-registry"), "needs docker-registry"
    docker0 = os.path.exists("/sys/class/net/docker0")
    roots_before = set(glob.glob("/var/tmp/toolq-bench-docker2-*"))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=290,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "images.json").read_text())
    waves = result["settings"]["waves"] * result["settings"]["per_wave"]
    for mode in ("aware", "unaware"):
        run = result[mode]
        assert run["raw"]["trajectories"] == waves
        assert len(run["raw"]["first_s"]) == waves
        # Each open's time to its first result, in parts that add up to it.
        for (took, _), (parts, _) in zip(
            run["raw"]["first_s"], run["raw"]["first_parts"], strict=True
        ):
            assert set(parts) == {"open_to_claim", "claim_to_sent", "sent_to_result"}
            assert all(v > -0.05 for v in parts.values()), parts
            assert abs(sum(parts.values()) - took) < 0.1, (parts, took)
        # Every image a wave named was pulled by some engine (none held it before).
        named = {image for wave in run["raw"]["waves"] for image in wave}
        pulled = {image for counts in run["raw"]["pulls"].values() for image in counts}
        assert pulled == named, run["raw"]["pulls"]
        assert all(used > 0 for used in run["raw"]["disk_bytes"].values())
    markdown = (tmp_path / "images.md").read_text()
    assert "| pulls per image per engine, most |" in markdown
    assert "aware ÷ unaware" in markdown
    assert not os.path.exists(SOCKET)
    assert set(glob.glob("/var/tmp/toolq-bench-docker2-*")) == roots_before
    # The first engine's bridge (docker0) is still there, and the second's is gone.
    assert os.path.exists("/sys/class/net/docker0") == docker0
    assert not [i for i in os.listdir("/sys/class/net") if i.startswith("tqb2")]
