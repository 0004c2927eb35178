"""The alert rules' unit tests (``deploy/prometheus/alerts_test.yml``) run by
``promtool test rules``, for both copies of the rules (compose and k8s)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_dashboards import DEPLOY, prometheus_binary


def promtool() -> str:
    prometheus_binary()  # skips, or fails in CI, without prometheus
    found = shutil.which("promtool")
    assert found, "prometheus is installed without promtool"
    return found


@pytest.mark.parametrize("rules", ["prometheus/alerts.yml", "k8s/alerts.yml"])
def test_alert_rules_pass_their_unit_tests(rules, tmp_path: Path):
    tests = (DEPLOY / "prometheus/alerts_test.yml").read_text()
    shutil.copy(DEPLOY / rules, tmp_path / "alerts.yml")
    (tmp_path / "alerts_test.yml").write_text(tests)
    proc = subprocess.run(
        [promtool(), "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test():
    import yaml

    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())
    fired = {
        t["alertname"]
        for case in tests["tests"]
        for t in case["alert_rule_test"]
        if t.get("exp_alerts")
    }
    assert alerts <= fired, alerts - fired
