"""Each result carries its stage times (``Result.stages``), through Redis, on every backend."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import redis_client
from toolq.producer import Client
from toolq.schemas import Keys

pytestmark = pytest.mark.redis_kinds("single", "cluster")

SANDBOX_STAGES = ["read", "sent", "tool_started", "tool_ended", "replied", "made"]


def test_a_sandbox_call_has_every_stage_in_order(
    backend, start_worker, client: Client, redis_url: str, ns: str
):
    start_worker(backend)
    client.open("t")
    client.call("t", "bash", {"command": "true"})  # the slot is up: the next call is plain
    before_ms = time.time() * 1000
    r = client.call("t", "bash", {"command": "sleep 0.05"})
    after_ms = time.time() * 1000
    assert r.ok and r.stages is not None, r
    assert list(r.stages) == SANDBOX_STAGES
    times = [r.stages[name] for name in SANDBOX_STAGES]
    # One host's wall clock for the client, the worker and the sandbox: in order, and
    # between the client's submit and its result.
    assert times == sorted(times), r.stages
    assert before_ms - 5 <= times[0] and times[-1] <= after_ms + 5, (before_ms, after_ms)
    tool_ms = r.stages["tool_ended"] - r.stages["tool_started"]
    assert 45 <= tool_ms <= r.run_ms + 1, (tool_ms, r.run_ms)
    # The stored hash holds the same stages as the event the client read.
    stored = redis_client(redis_url).hgetall(Keys(ns).result("t", r.call_id))
    assert json.loads(stored[b"stages"]) == r.stages


def test_a_refused_call_has_read_and_made_only(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    r = client.call("t", "no_such_tool", {})
    assert not r.ok and r.error_code == "unknown_tool"
    assert r.stages is not None and list(r.stages) == ["read", "made"]
    assert r.stages["read"] <= r.stages["made"]
