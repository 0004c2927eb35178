"""The benchmark's quick mode runs end to end (tiny counts; no timing is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_DOCKER, docker_ready, require_docker

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.timeout(180)
def test_quick_mode_writes_every_output(tmp_path: Path) -> None:
    docker = docker_ready()
    if not docker and REQUIRE_DOCKER:
        pytest.fail("no Docker engine or test image")
    # Without Docker only the local backend's paths can run.
    paths = [] if docker else ["--paths", "toolq_local,limit_local"]
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(tmp_path), *paths],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["rows"]
    assert rows and all(r["errors"] == 0 and r["n"] > 0 for r in rows)
    seen = {r["path"] for r in rows}
    expected = {"toolq_local", "limit_local"}
    if docker:
        expected |= {"toolq", "limit", "rq", "exec", "exec_cli"}
    assert expected <= seen
    toolq = next(r for r in rows if r["path"] == ("toolq" if docker else "toolq_local"))
    assert toolq["client_rt_per_call"] > 0 and toolq["worker_rt_per_call"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "## Targets" in markdown and "| path | tool |" in markdown
    # One trajectory: each toolq row says where its calls' time went, stage by stage.
    staged = [r for r in rows if r["path"].startswith("toolq") and r["concurrency"] == 1]
    assert staged and all(len(r["stages_ms"]) == 7 for r in staged), staged
    assert "where a toolq call's time goes" in markdown
    if docker:  # the relay floor, measured in the same run, and the added cost as its multiple
        floor = next(r for r in rows if r["path"] == "relay")
        assert floor["n"] > 0 and floor["p50_ms"] > 0
        assert "x the floor" in markdown
    for png in ("results.png", "latency.png", "throughput.png"):
        assert (tmp_path / png).stat().st_size > 1000
    if docker:  # --publish writes README's table from this same report
        readme = tmp_path / "README.md"
        readme.write_text((RUN.parent.parent / "README.md").read_text())
        sys.path.insert(0, str(RUN.parent))
        from readme_table import publish

        publish(report, str(readme))
        table = readme.read_text().split("<!-- bench table")[1].split("<!-- end of")[0]
        one = next(
            r for r in rows if (r["path"], r["tool"], r["concurrency"]) == ("toolq", "true", 1)
        )
        assert f"| 1 | {one['p50_ms']:.2f} |" in table or f"| 1 | {one['p50_ms']:.3g} |" in table
        assert table.count("\n| ") >= 3, table


@pytest.mark.timeout(300)
def test_recycle_quick_mode_reuses_every_container_it_can(tmp_path: Path) -> None:
    require_docker()
    proc = subprocess.run(
        [sys.executable, str(RUN.parent / "recycle.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "recycle.json").read_text())
    one = result["one_at_a_time"]
    # One at a time, after the first: every open of the recycle mode finds the last
    # trajectory's container reset; the others never reuse one.
    assert one["recycle"]["reused"] == one["recycle"]["n"] > 0
    assert one["cold"]["reused"] == one["warm"]["reused"] == 0
    assert result["recycle"]["rejected"] == 0 and result["recycle"]["recycled"] > 0
    assert "## Recycled containers: open latency" in (tmp_path / "recycle.md").read_text()
