"""Exactly one result, whatever comes in: poison entries, resubmissions, limits that hold.

Every test talks to a live worker through a real Redis, as a hostile or
careless client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import wait_for
from toolq.producer import AsyncClient, Client
from toolq.schemas import FINAL_STATUSES, Keys, lua


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return {"command": "true", "x": value}


def deep_json(depth: int) -> str:
    return '{"command": "true", "x": ' + "[" * depth + "]" * depth + "}"


def result_events(r: redis.Redis, keys: Keys, traj: str) -> list[str]:
    return [
        f[b"call_id"].decode()
        for _, f in r.xrange(keys.events(traj))
        if f.get(b"type") == b"result"
    ]


# ------------------------------------------------------------ poison entries
def test_poison_entries_get_an_error_and_spare_their_batch(
    start_worker, client: Client, redis_url, ns
):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    client.open("t")
    before = client.submit("t", "bash", {"command": "echo before"})
    # 1,000 levels deep, straight onto the stream, and 900 through the client
    raw = r.xadd(keys.calls("t"), {"tool": "bash", "args": deep_json(1000), "call_id": "deep"})
    through_client = client.submit("t", "bash", nested(900))
    after = client.submit("t", "bash", {"command": "echo after"})
    start_worker("local")  # all five are read in one batch
    assert client.result("t", before).output == "before\n"
    for call_id in ("deep", through_client):
        r_ = client.result("t", call_id)
        assert r_.error_code == "invalid_args" and "deeper than 64" in (r_.error or ""), r_
    assert client.result("t", after).output == "after\n"
    assert raw.decode() not in result_events(r, keys, "t")  # answered under its call_id only
    assert client.call("t", "bash", {"command": "echo still"}).output == "still\n"


def test_a_poison_open_request_is_dead_lettered_and_acknowledged(
    start_worker, client, redis_url, ns
):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    start_worker("local")
    r.xadd(keys.open, {"v": "1", "traj": "deep", "spec": deep_json(1000)})
    wait_for(lambda: r.xlen(keys.dead) == 1, what="the dead letter")
    dead = r.xrange(keys.dead)[0][1]
    assert b"deeper than 64" in dead[b"reason"] and dead[b"stream"] == keys.open.encode()
    wait_for(lambda: r.xpending(keys.open, "workers")["pending"] == 0, what="the ack")
    client.open("fine")
    assert client.call("fine", "bash", {"command": "echo ok"}).ok


def test_a_malformed_entry_is_answered_under_its_call_id(start_worker, client, redis_url, ns):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    start_worker("local")
    client.open("t")
    r.xadd(keys.calls("t"), {"tool": "bash", "args": "not json", "call_id": "my-1"})
    r.xadd(keys.calls("t"), {"tool": "bash", "timeout_s": "-1", "call_id": "my-2"})
    got = client.result("t", "my-1")
    assert got.call_id == "my-1" and got.error_code == "invalid_args"  # the model's to fix
    assert "not valid JSON" in (got.error or "")
    bad = client.result("t", "my-2")
    assert bad.error_code == "bad_request" and "timeout_s" in (bad.error or ""), bad


def test_async_submit_with_a_call_id_submits(start_worker, aclient_factory):
    start_worker("local")

    async def main() -> str:
        async with aclient_factory() as c:
            await c.open("t")
            call_id = await c.submit("t", "bash", {"command": "echo x"}, call_id="mine")
            assert call_id == "mine"
            return (await c.result("t", "mine")).output

    assert asyncio.run(main()) == "x\n"


# -------------------------------------------------------------- resubmission
def test_a_call_id_runs_once_while_its_result_lives_and_again_after(
    start_worker, client: Client, tmp_path: Path
):
    handle = start_worker("local", result_ttl_s=2)
    client.open("t")
    log = tmp_path / "runs"
    args = {"command": f"echo run >> {log}; echo done"}
    first = client.call("t", "bash", args, call_id="c1")
    again = client.call("t", "bash", args, call_id="c1")  # the result stands
    assert first == again and log.read_text() == "run\n"
    handle.stop()
    start_worker("local", result_ttl_s=2)  # another worker: the same rule
    assert client.call("t", "bash", args, call_id="c1") == first
    assert log.read_text() == "run\n"
    wait_for(lambda: not client.redis.exists(client.keys.result("t", "c1")), what="expiry")
    later = client.call("t", "bash", args, call_id="c1")  # expired: a new call
    assert later.ok and later.finished_ms > first.finished_ms
    assert log.read_text() == "run\nrun\n"


def test_the_same_call_id_twice_in_the_stream_runs_once(start_worker, client, tmp_path: Path):
    client.open("t")
    log = tmp_path / "runs"
    args = {"command": f"echo run >> {log}"}
    keys = client.keys
    # two entries with one id, as a client retrying after a lost reply leaves them
    for _ in range(2):
        client.redis.xadd(
            keys.calls("t"), {"tool": "bash", "args": json.dumps(args), "call_id": "twice"}
        )
    start_worker("local")
    assert client.result("t", "twice").ok
    assert client.call("t", "bash", {"command": "true"}).ok  # both entries were passed
    assert log.read_text() == "run\n"
    assert result_events(client.redis, keys, "t").count("twice") == 1


# ----------------------------------------------------------- interrupted open
def test_an_interrupted_open_is_recovered_by_opening_again(start_worker, client, redis_url, ns):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    start_worker("local")
    # a producer that died right after the open script: a record, no request
    traj_keys = [keys.traj("t"), keys.calls("t"), keys.events("t"), keys.bg_index("t")]
    assert r.eval(lua.OPEN, 4, *traj_keys, "t", int(time.time() * 1000), "{}", 0) == b"new"
    assert client.open("t") == "pending"  # re-enqueued
    assert client.call("t", "bash", {"command": "echo back"}).output == "back\n"
    assert r.xlen(keys.open) <= 2 and client.open("t") == "running"


# ------------------------------------------------------------------- policy
def test_aliases_follow_the_tool_policy_both_ways(start_worker, client: Client):
    start_worker("local")
    client.open("no-terminal", {"blocked_tools": ["terminal"]})
    assert client.call("no-terminal", "bash", {"command": "true"}).error_code == "tool_blocked"
    client.open("only-terminal", {"allowed_tools": ["terminal"]})
    assert client.call("only-terminal", "bash", {"command": "echo y"}).output == "y\n"
    client.open("no-bash", {"blocked_tools": ["bash"]})
    assert client.call("no-bash", "terminal", {"command": "true"}).error_code == "tool_blocked"


# ------------------------------------------------------------------- limits
def test_timeout_caps_hold_inside_the_sandbox(start_worker, client: Client):
    start_worker("local")
    client.open("t", {"limits": {"max_call_timeout_s": 0.5}})
    assert client.call("t", "write_file", {"path": "keep", "content": "k"}).ok
    r = client.call("t", "bash", {"command": "sleep 3; echo finished", "timeout_s": 30})
    assert r.timed_out and "finished" not in r.output, r
    s = client.call("t", "shell", {"command": "sleep 3; echo finished", "timeout_s": 30})
    assert s.timed_out and "finished" not in s.output, s
    after = client.call("t", "read_file", {"path": "keep"})
    assert after.output == "k" and not after.slot_reset  # the workspace survived


def test_read_ahead_and_output_are_bounded(start_worker, client: Client, tmp_path: Path):
    handle = start_worker("local", read_ahead=4, max_output_bytes=4096)
    client.open("t", {"limits": {"max_output_bytes": 1_000_000}})
    release = tmp_path / "release"
    blocker = client.submit(
        "t", "bash", {"command": f"while [ ! -f {release} ]; do sleep 0.05; done"}
    )
    queued = [client.submit("t", "bash", {"command": f"echo {i}"}) for i in range(40)]
    traj = wait_for(lambda: handle.worker.owned.get("t") if handle.worker else None, what="claim")
    wait_for(lambda: len(traj.items) >= 4, what="the read-ahead to fill")
    time.sleep(0.5)  # a reader that ignored the bound would read on meanwhile
    assert len(traj.items) < 2 * 4  # at most one read past the bound
    assert client.redis.xlen(client.keys.calls("t")) > 40 - 8  # the rest wait in Redis
    release.write_text("go")
    assert client.result("t", blocker).ok
    assert [client.result("t", q).output for q in queued] == [f"{i}\n" for i in range(40)]
    big = client.call("t", "bash", {"command": "head -c 100000 /dev/zero | tr '\\0' x"})
    assert big.truncated and big.output_bytes == 100_000 and len(big.output) < 4096 + 100


# ---------------------------------------------------------- smaller fixes
def test_no_key_is_left_without_a_ttl_by_an_invalid_open(start_worker, client, redis_url, ns):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    traj_keys = [keys.traj("bad"), keys.calls("bad"), keys.events("bad"), keys.bg_index("bad")]
    bad_spec = '{"limits": {"memory_mb": "lots"}}'
    r.eval(lua.OPEN, 4, *traj_keys, "bad", int(time.time() * 1000), bad_spec, 0)
    queued = client.submit("bad", "bash", {"command": "true"})
    r.xadd(keys.open, {"v": "1", "traj": "bad", "spec": bad_spec})
    start_worker("local")
    assert client.result("bad", queued).error_code == "trajectory_ended"
    wait_for(lambda: client.record("bad").status.value == "failed", what="failed")
    for key in r.scan_iter(f"{ns}:{{bad}}*"):
        assert r.pttl(key) > 0, key


def test_a_close_with_an_invalid_field_still_closes(start_worker, client, redis_url, ns):
    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    start_worker("local")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    r.xadd(keys.calls("t"), {"v": "1", "type": "close", "timeout_s": "soon"})
    wait_for(lambda: client.record("t").status.value == "completed", what="completed")


def test_read_file_truncated_means_cut_by_the_cap(start_worker, client: Client):
    start_worker("local")
    client.open("t", {"limits": {"max_output_bytes": 1000}})
    assert client.call("t", "write_file", {"path": "f", "content": "x" * 5000}).ok
    whole = client.call("t", "read_file", {"path": "f"})
    assert whole.truncated and whole.data and whole.data["length"] == 1000  # the cap cut it
    asked = client.call("t", "read_file", {"path": "f", "limit": 10})
    assert not asked.truncated and asked.data and asked.data["size"] == 5000  # as asked


def test_answers_of_the_submit_and_cancel_scripts_ride_in_their_event(start_worker, client):
    start_worker("local")
    client.open("t")
    client.close("t")
    wait_for(lambda: client.record("t").status.value == "completed", what="the end")
    late = client.submit("t", "bash", {"command": "true"})
    last = client.redis.xrevrange(client.keys.events("t"), count=1)[0][1]
    inline = json.loads(last[b"result"])
    assert inline["call_id"] == late and inline["error_code"] == "trajectory_ended"
    client.open("p")  # no worker claims it before the cancel: the script answers
    queued = client.submit("p", "bash", {"command": "true"})
    assert client.cancel("p") in ("cancelled", "requested")
    assert client.result("p", queued).error_code == "cancelled"


def test_stale_backlog_members_are_pruned(start_worker, client: Client):
    handle = start_worker("local")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    client.redis.zadd(client.keys.pending, {"t": 1})  # as a lost race would leave it
    assert handle.run(handle.worker.fleet.prune_pending()) == 1
    assert client.redis.zcard(client.keys.pending) == 0


# ------------------------------------------------------- Redis restarting
def test_clients_ride_out_redis_restarts(ns):
    from tests.conftest import WorkerThread
    from toolq.worker.embedded import EmbeddedRedis
    from toolq.worker.settings import WorkerSettings

    with EmbeddedRedis(appendonly=True) as server:
        settings = WorkerSettings(
            redis_url=server.url, namespace=ns, backend="local", slots=8, block_ms=200,
            heartbeat_s=0.3,
        )  # fmt: skip
        worker = WorkerThread(settings)
        errors: list[BaseException] = []
        done: list[str] = []
        stop = threading.Event()

        def agent(j: int) -> None:
            with Client(server.url, ns) as c:
                n = 0
                while not stop.is_set() or n < 3:
                    t = f"a{j}-{n}"
                    try:
                        c.open(t)
                        assert c.call(t, "bash", {"command": f"echo {n}"}).output == f"{n}\n"
                        extra = c.submit(t, "bash", {"command": "true"})
                        (c.close if n % 2 else c.cancel)(t)
                        assert c.result(t, extra).error_code in (None, "cancelled")
                        done.append(t)
                    except BaseException as exc:
                        errors.append(exc)
                    n += 1

        async def async_agent() -> None:
            async with AsyncClient(server.url, ns) as c:
                n = 0
                while not stop.is_set() or n < 3:
                    t = f"async-{n}"
                    try:
                        await c.open(t)
                        assert (await c.call(t, "bash", {"command": "echo a"})).ok
                        await c.close(t)
                        done.append(t)
                    except BaseException as exc:
                        errors.append(exc)
                    n += 1

        threads = [threading.Thread(target=agent, args=(j,)) for j in range(3)]
        threads.append(threading.Thread(target=asyncio.run, args=(async_agent(),)))
        try:
            for t in threads:
                t.start()
            for _ in range(2):
                so_far = len(done)
                wait_for(lambda n=so_far: len(done) > n + 3, what="calls between restarts")
                server.restart(down_s=0.5)
            stop.set()
            for t in threads:
                t.join(120)
        finally:
            stop.set()
            worker.stop()
        assert not errors, errors[:3]
        assert len(done) >= 4 * 3  # every agent went on after the restarts


# --------------------------------------------------------- property test
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
call_fields = st.dictionaries(
    st.sampled_from(["v", "type", "tool", "args", "timeout_s", "idempotent", "call_id", "x"])
    | st.binary(min_size=1, max_size=6),
    st.sampled_from(["bash", "read_file", "nope", "call", "close", "cancel", "1", "-1", "2"])
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | json_values.map(json.dumps)
    | st.just(deep_json(200))
    | st.just(json.dumps({"command": "echo hi"})),
    min_size=1,
    max_size=6,
)
open_fields = st.fixed_dictionaries(
    {"traj": st.sampled_from(["", "ok-id", "bad id", "x" * 200])},
    optional={
        "v": st.sampled_from(["1", "2", "x"]),
        "spec": json_values.map(json.dumps) | st.text(max_size=10) | st.just(deep_json(100)),
    },
)


def no_ttl(r: redis.Redis, ns: str) -> set[bytes]:
    return {k for k in r.scan_iter(f"{ns}:*") if r.ttl(k) == -1}


@pytest.fixture(scope="module")
def fuzz_target(request):
    """One worker for every example (module scope: a worker start per example is slow)."""
    from tests.conftest import WorkerThread
    from toolq.worker.embedded import EmbeddedRedis
    from toolq.worker.settings import WorkerSettings

    with EmbeddedRedis() as server:
        ns = "fuzz"
        settings = WorkerSettings(
            redis_url=server.url, namespace=ns, backend="local", slots=16, block_ms=200,
            heartbeat_s=0.3, max_entry_bytes=4096,
        )  # fmt: skip
        worker = WorkerThread(settings)
        with Client(server.url, ns) as client:
            client.open("warm")
            assert client.call("warm", "bash", {"command": "true"}).ok
            client.close("warm")
            yield client, redis.Redis.from_url(server.url), Keys(ns), worker
        worker.stop()


counter = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(call_fields, min_size=1, max_size=5), opens=st.lists(open_fields, max_size=2))
def test_whatever_comes_in_every_call_gets_one_result(fuzz_target, calls, opens):
    client, r, keys, worker = fuzz_target
    before = no_ttl(r, keys.ns)
    traj = f"g{next(counter)}"
    client.open(traj)
    usable: list[str] = []
    for fields in calls:
        entry_id = r.xadd(keys.calls(traj), fields).decode()
        decoded = {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v
            for k, v in fields.items()
        }
        if decoded.get("type") in ("close", "cancel"):
            continue  # control entries get no result
        cid = decoded.get("call_id")
        cid = cid.decode("utf-8", "replace") if isinstance(cid, bytes) else cid
        valid = isinstance(cid, str) and re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", cid)
        usable.append(cid if valid else entry_id)
    opened = []
    for fields in opens:
        traj_id = (
            f"{fields['traj']}-{next(counter)}" if fields["traj"] == "ok-id" else fields["traj"]
        )
        r.xadd(keys.open, {**fields, "traj": traj_id})
        opened.append(traj_id)
    for call_id in set(usable):
        got = client.result(traj, call_id, timeout_s=30)
        assert got.call_id == call_id
        assert got.ok or got.error_code
    events = result_events(r, keys, traj)
    assert all(events.count(c) == 1 for c in set(usable)), events
    # everything ends; then no key is left without a TTL that was not there before
    with contextlib.suppress(Exception):
        client.cancel(traj)
    for t in opened:
        if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", t):
            wait_for(lambda t=t: r.hget(keys.traj(t), "status") is not None, what=f"{t} handled")
            with contextlib.suppress(Exception):
                client.cancel(t)
    ended = [traj, *(t for t in opened if r.exists(keys.traj(t)))]
    for t in ended:
        wait_for(
            lambda t=t: (r.hget(keys.traj(t), "status") or b"").decode() in FINAL_STATUSES,
            what=f"{t} to end",
        )
    wait_for(lambda: r.xpending(keys.open, "workers")["pending"] == 0, what="open requests acked")
    wait_for(lambda: no_ttl(r, keys.ns) <= before | GLOBAL(keys), what="no key without a TTL")
    assert worker.thread.is_alive() and worker.error is None


def GLOBAL(keys: Keys) -> set[bytes]:
    return {
        k.encode()
        for k in (keys.open, keys.dead, keys.runs, keys.pending, keys.workers, keys.tools)
    }


def test_echoed_input_is_cut_in_the_result(start_worker, client: Client, redis_url, ns):
    from toolq.schemas import ECHO_MAX_CHARS, ERROR_MAX_CHARS

    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    start_worker("local")
    client.open("t")
    huge = "x" * 1_000_000
    bad_id = r.xadd(keys.calls("t"), {"tool": "bash", "args": "{}", "call_id": huge}).decode()
    r.xadd(keys.calls("t"), {"tool": huge, "args": "{}", "call_id": "long-tool"})
    r.xadd(keys.calls("t"), {"tool": "bash", "args": json.dumps({huge: 1}), "call_id": "long-arg"})
    for call_id in (bad_id, "long-tool", "long-arg"):
        got = client.result("t", call_id)
        assert not got.ok and got.error_code in ("bad_request", "unknown_tool", "invalid_args"), got
        assert len(got.error or "") <= ERROR_MAX_CHARS and len(got.tool) <= ECHO_MAX_CHARS, got
        stored = sum(len(k) + len(v) for k, v in r.hgetall(keys.result("t", call_id)).items())
        assert stored < 2 * ERROR_MAX_CHARS + 1000, (call_id, stored)
    assert "chars cut" in (client.result("t", "long-tool").error or "")
    assert client.call("t", "bash", {"command": "echo fine"}).output == "fine\n"
