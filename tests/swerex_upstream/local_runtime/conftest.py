"""``test_local_runtime.py`` makes its runtime with a fixture of its own
(``LocalRuntime()``): here that name stands for the toolq runtime instead."""

from __future__ import annotations

import pytest

from toolq.integrations.swerex import ToolqRuntime


@pytest.fixture(autouse=True)
def _toolq_for_local_runtime(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, toolq_runtime: ToolqRuntime
) -> None:
    monkeypatch.setattr(request.module, "LocalRuntime", lambda: toolq_runtime)
