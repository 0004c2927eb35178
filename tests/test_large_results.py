"""Large results travel with their output raw beside the JSON (no megabytes of JSON
decoded in the finish script); small ones ride inline in their event. Both read back
exactly, through Redis, on every backend."""

from __future__ import annotations

import pytest

from tests.helpers import redis_client
from toolq.producer import Client
from toolq.schemas import Keys

pytestmark = pytest.mark.redis_kinds("single", "cluster")

PROGRAM = "import sys; sys.stdout.write('é✓x\"\\\\' * 60000)"  # quotes, escapes, non-ASCII


def _result_event(redis_url: str, ns: str, traj: str, call_id: str) -> dict[bytes, bytes]:
    events = redis_client(redis_url).xrange(Keys(ns).events(traj))
    return next(f for _id, f in events if f.get(b"call_id") == call_id.encode())


def test_a_large_output_round_trips_exactly(
    backend, start_worker, client: Client, redis_url: str, ns: str
):
    start_worker(backend)
    client.open("t", {"limits": {"max_output_bytes": 2 * 1024 * 1024}})
    client.call("t", "write_file", {"path": "big.py", "content": PROGRAM})
    r = client.call("t", "bash", {"command": "python3 big.py"})
    expected = 'é✓x"\\' * 60000
    assert r.ok and not r.truncated, (r.error, r.truncated)
    assert r.output == expected
    stored = redis_client(redis_url).hgetall(Keys(ns).result("t", r.call_id))
    assert stored[b"output"].decode("utf-8") == expected
    assert stored[b"ok"] == b"1" and b"stages" in stored
    assert b"result" not in _result_event(redis_url, ns, "t", r.call_id)  # read from the hash
    small = client.call("t", "bash", {"command": "echo small"})
    assert small.output == "small\n"
    assert b"result" in _result_event(redis_url, ns, "t", small.call_id)  # inline
