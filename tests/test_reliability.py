"""Nothing lost: dead workers, fenced workers, Redis restarts, hostile input, ACL and TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import missing, worker_process
from toolq.producer import Client
from toolq.schemas import Keys
from toolq.worker.embedded import EmbeddedRedis


def test_a_killed_workers_trajectory_is_taken_over(start_worker, client: Client, redis_url, ns):
    dying = worker_process(redis_url, ns, "dying")
    try:
        client.open("t")
        first = client.call("t", "bash", {"command": "echo x > f; echo $PPID"})
        assert first.worker == "dying"
        start_worker("local", heartbeat_s=0.3, dead_after_s=2)
        running = client.submit("t", "bash", {"command": "sleep 60"})
        rerun = client.submit("t", "bash", {"command": "echo again"}, idempotent=True)
        queued = [client.submit("t", "bash", {"command": f"echo {i}"}) for i in range(3)]
        time.sleep(0.5)  # the sleep runs on the dying worker
    finally:
        dying.send_signal(signal.SIGKILL)
        dying.wait()
    lost = client.result("t", running, timeout_s=30)
    assert lost.error_code == "worker_lost" and "dying" in (lost.error or "")
    again = client.result("t", rerun, timeout_s=30)
    assert again.ok and again.output == "again\n" and again.worker != "dying"
    assert again.slot_reset  # the local workspace died with its worker
    outs = [client.result("t", q, timeout_s=30).output for q in queued]
    assert outs == ["0\n", "1\n", "2\n"]
    rec = client.record("t")
    assert rec is not None and rec.status.value == "running" and rec.owner != "dying"
    r = redis.Redis.from_url(redis_url)
    assert r.zscore(Keys(ns).workers, "dying") is None


def test_a_worker_taken_for_dead_stops_serving_what_it_lost(
    start_worker, client: Client, redis_url, ns
):
    handle = start_worker("local", heartbeat_s=0.2)
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    redis.Redis.from_url(redis_url).hset(Keys(ns).traj("t"), "owner", "someone-else")
    deadline = time.monotonic() + 10
    while "t" in handle.worker.owned and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    assert "t" not in handle.worker.owned  # type: ignore[union-attr]


def test_redis_restarts_lose_nothing_and_run_nothing_twice(start_worker, aof_redis, ns):
    from tests.conftest import WorkerThread
    from toolq.worker.settings import WorkerSettings

    worker = WorkerThread(
        WorkerSettings(
            redis_url=aof_redis.url,
            namespace=ns,
            backend="local",
            slots=4,
            block_ms=200,
            heartbeat_s=0.3,
        )
    )
    errors: list[str] = []
    n_calls = 25

    def agent(traj: str) -> None:
        with Client(aof_redis.url, ns) as c:
            c.open(traj)
            for i in range(n_calls):
                r = c.call(
                    traj,
                    "bash",
                    {"command": f"echo {i} >> log; echo {i}"},
                    call_id=f"{traj}-{i}",
                    wait_s=60,
                )
                if r.output != f"{i}\n":
                    errors.append(f"{traj} call {i}: {r.error_code} {r.error}")

    try:
        threads = [threading.Thread(target=agent, args=(f"a{j}",)) for j in range(3)]
        for t in threads:
            t.start()
        for _ in range(2):
            time.sleep(1.0)
            aof_redis.restart(down_s=0.5)
        for t in threads:
            t.join(120)
        assert not errors, errors
        with Client(aof_redis.url, ns) as c:
            for j in range(3):
                log = c.call(f"a{j}", "read_file", {"path": "log"}).output.split()
                assert log == [str(i) for i in range(n_calls)], "a call ran twice or never"
    finally:
        worker.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(["v", "type", "tool", "args", "timeout_s", "idempotent", "x"]) | (
    st.binary(min_size=1, max_size=8)
)
field_values = (
    st.binary(max_size=40)
    | st.text(max_size=40)
    | json_values.map(json.dumps)
    | st.sampled_from(["read_file", "write_file", "nope", "call", "2", "-1", "1e309", "NaN"])
)


@pytest.fixture
def garbage_target(start_worker, client: Client, redis_url, ns):
    start_worker("local", max_entry_bytes=4096)
    client.open("g")
    assert client.call("g", "bash", {"command": "true"}).ok
    return client, redis.Redis.from_url(redis_url), Keys(ns)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(field_names, field_values, min_size=1, max_size=6))
def test_generated_garbage_gets_one_result_each_and_the_worker_keeps_serving(
    garbage_target, fields
):
    client, r, keys = garbage_target
    # control entries would end the trajectory; a client call_id would rename the result
    fields = {k: v for k, v in fields.items() if k not in (b"type", "type", b"call_id")} or {
        "x": "y"
    }
    entry_id = r.xadd(keys.calls("g"), fields).decode()
    result = client.result("g", entry_id, timeout_s=20)
    assert result.call_id == entry_id
    assert result.ok or result.error_code


def test_huge_payloads_are_refused_and_nothing_else_is_disturbed(garbage_target):
    client, r, keys = garbage_target
    big = r.xadd(
        keys.calls("g"),
        {"tool": "write_file", "args": json.dumps({"path": "a", "content": "x" * 10_000})},
    )
    assert client.result("g", big.decode(), timeout_s=20).error_code == "payload_too_large"
    assert client.call("g", "bash", {"command": "echo fine"}).output == "fine\n"


def test_password_and_acl_user(start_worker, ns, tmp_path):
    acl = ["--requirepass", "s3cret", "--user", "agent", "on", ">agentpw", "~*", "&*", "+@all"]
    with EmbeddedRedis(extra_args=acl, password="s3cret") as server:
        url = f"redis://agent:agentpw@127.0.0.1:{server.port}/0"
        from tests.conftest import WorkerThread
        from toolq.worker.settings import WorkerSettings

        worker = WorkerThread(WorkerSettings(redis_url=url, namespace=ns, backend="local"))
        try:
            with Client(url, ns) as c:
                c.open("t")
                assert c.call("t", "bash", {"command": "echo authed"}).output == "authed\n"
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port, password="wrong").ping()
        finally:
            worker.stop()


def make_certs(tmp_path) -> dict[str, str]:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=toolq-test-ca",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return {name: str(tmp_path / name) for name in ("ca.crt", "server.crt", "server.key")}


def test_tls_connections(ns, tmp_path):
    if not os.path.exists("/usr/bin/redis-server"):
        missing("Debian's redis-server (built with TLS) is not installed")
    certs = make_certs(tmp_path)
    from toolq.worker.embedded import free_port

    tls_port = free_port()
    args = [
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        certs["server.crt"],
        "--tls-key-file",
        certs["server.key"],
        "--tls-ca-cert-file",
        certs["ca.crt"],
        "--tls-auth-clients",
        "no",
    ]
    with EmbeddedRedis(extra_args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca.crt']}"
        from tests.conftest import WorkerThread
        from toolq.worker.settings import WorkerSettings

        worker = WorkerThread(WorkerSettings(redis_url=url, namespace=ns, backend="local"))
        try:
            with Client(url, ns) as c:
                c.open("t")
                assert c.call("t", "bash", {"command": "echo over tls"}).output == "over tls\n"
        finally:
            worker.stop()


def test_a_wait_on_a_trajectory_whose_record_is_lost_raises_unknown_trajectory(
    client: Client, redis_url, ns
):
    import asyncio

    from toolq.producer import AsyncClient, UnknownTrajectory

    r, keys = redis.Redis.from_url(redis_url), Keys(ns)
    client.open("t")  # no worker: its calls wait
    running = client.submit("t", "bash", {"command": "true"})
    queued = client.submit("t", "bash", {"command": "true"})

    def lose_the_record() -> None:  # as a Redis crash that lost its last writes can
        time.sleep(0.5)
        r.delete(keys.traj("t"))

    threading.Thread(target=lose_the_record).start()
    # The waits would last a minute; they end within seconds of the loss instead.
    with pytest.raises(UnknownTrajectory, match="trajectory t is gone"):
        client.result("t", running, timeout_s=60)

    async def wait_async() -> None:
        async with AsyncClient(redis_url, ns) as c:
            await c.result("t", queued, timeout_s=60)

    with pytest.raises(UnknownTrajectory, match="trajectory t is gone"):
        asyncio.run(wait_async())
