"""Queue wait split: behind the trajectory's earlier calls vs waiting for toolq.

A trajectory's calls run one at a time, so an agent that emits several tool
calls in one turn has them queue behind each other. That part of
``queued_ms`` is ``behind_ms``; only the rest (``toolq_call_wait_seconds``)
says whether toolq keeps up, and only it feeds the ToolqSlowQueue alert.
Real Redis, a real worker (local backend).
"""

from __future__ import annotations

import time

from toolq.producer import Client


def test_parallel_calls_wait_behind_each_other_not_for_toolq(start_worker, client: Client):
    handle = start_worker("local")
    client.open("turn")
    warm = client.call("turn", "bash", {"command": "true"})  # the slot is up
    assert warm.ok  # its wait for the slot's start counts as behind (not toolq's wait)
    calls = [("bash", {"command": "sleep 1"}) for _ in range(3)]
    first, second, third = client.call_many("turn", calls, wait_s=120)
    assert first.ok and second.ok and third.ok
    # Submitted together, the 3rd could start only after two 1 s sleeps ended:
    # a causal lower bound, whatever the machine's load.
    assert second.behind_ms > 500 and third.behind_ms > 1500
    assert third.behind_ms <= third.queued_ms
    # What is left is the step from one call's end to the next one's start,
    # with no Redis round trip in between: less than the two sleeps it waited on.
    assert third.queued_ms - third.behind_ms < third.behind_ms
    assert first.behind_ms == 0  # nothing of this trajectory ran when it arrived
    client.close("turn")

    registry = handle.worker.observer.registry
    deadline = time.monotonic() + 30
    while registry.get_sample_value("toolq_call_wait_seconds_count", {"tool": "bash"}) != 4:
        assert time.monotonic() < deadline, "the 4 calls were not observed"
        time.sleep(0.05)
    queued_s = registry.get_sample_value("toolq_call_queue_seconds_sum", {"tool": "bash"})
    waited_s = registry.get_sample_value("toolq_call_wait_seconds_sum", {"tool": "bash"})
    behind_s = sum(r.behind_ms for r in (warm, first, second, third)) / 1000
    assert queued_s is not None and waited_s is not None
    assert abs(queued_s - behind_s - waited_s) < 0.01  # the histogram holds the rest
    assert queued_s > 2.5 and waited_s < queued_s - 2.0


def test_a_call_after_a_pause_is_behind_nothing(start_worker, client: Client):
    start_worker("local")
    client.open("think")
    assert client.call("think", "bash", {"command": "true"}).ok
    later = client.call("think", "bash", {"command": "true"})  # sent after the first ended
    assert later.ok and later.behind_ms == 0
    client.close("think")
