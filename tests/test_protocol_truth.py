"""What a client author reads in PROTOCOL.md is what happens (issue 33, item 8):
error codes on every path, counts, documented fields, the walkthrough as the
document shows it. Through a real worker and Redis."""

from __future__ import annotations

import os
import re
import subprocess

from tests.helpers import wait_for
from tests.test_protocol import doc_text, marked_blocks, redis_cli
from toolq.producer import Client
from toolq.schemas import Keys, WorkerInfo
from toolq.schemas import export as schema_export


def test_protocol_md_alone_drives_a_trajectory(start_worker, redis_url, ns, client: Client):
    """The walkthrough section's blocks, as they stand in the document, with the
    three scripts it names: a stranger's script, no glue from elsewhere."""
    start_worker("local")
    lua = marked_blocks("lua")
    script = [
        f"{name}=$(cat <<'LUA'\n{lua[name]}\nLUA\n)"
        for name in ("OPEN_LUA", "ENQUEUED_LUA", "SUBMIT_LUA")
    ]
    section = doc_text().split("## redis-cli walkthrough", 1)[1].split("\n## ", 1)[0]
    script += re.findall(r"<!-- walkthrough:\w+ -->\n```sh\n(.*?)\n```", section, re.S)
    script.append('echo "status=$final ok=$ok output=$output"')
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_NAMESPACE": ns,
        "TOOLQ_TRAJ": "stranger",
        "REDIS_CLI": redis_cli(),
    }
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["status=completed", "ok=1", "output=hi"], proc.stdout
    record = client.record("stranger")
    assert record and record.calls_total == 1


def test_submit_is_documented_as_returning_two_values():
    section = doc_text().split("<!-- walkthrough:call -->", 1)[0][-400:]
    assert "which is the call id" not in section and "two values" in section


def test_calls_waiting_on_a_missing_snapshot_get_snapshot_not_found(start_worker, client: Client):
    # Submitted before any worker runs, so every call waits when the start fails.
    client.open("lost", {"snapshot": "never-taken"})
    ids = client.submit_many("lost", [("bash", {"command": "true"})] * 3)
    start_worker("local")
    results = client.results([("lost", i) for i in ids], wait_s=60)
    assert [r.error_code for r in results] == ["snapshot_not_found"] * 3, results
    assert all("never-taken" in (r.error or "") for r in results)
    record = wait_for(lambda: (r := client.record("lost")) and r.status.final and r, what="end")
    assert record.status.value == "failed"
    record = wait_for(lambda: (r := client.record("lost")) and r.calls_total == 3 and r, what="3")
    assert record.calls_submitted == 3 and record.calls_failed == 3
    later = client.call("lost", "bash", {"command": "true"}, wait_s=30)
    assert later.error_code == "trajectory_ended" and "never-taken" in (later.error or "")


def test_a_cancel_before_any_worker_counts_the_calls_it_answers(client: Client):
    client.open("early")
    client.submit_many("early", [("bash", {"command": "true"})] * 2)
    assert client.cancel("early") == "cancelled"
    record = client.record("early")
    assert record and (record.calls_submitted, record.calls_total) == (2, 2)
    assert record.calls_failed == 2


def test_a_result_for_a_never_opened_trajectory_names_it(client: Client):
    r = client.call("never-opened", "bash", {"command": "true"}, wait_s=10)
    assert r.error_code == "bad_request" and r.traj == "never-opened", r


def test_json_fields_list_every_json_text_field():
    schemas = schema_export.build_schemas()
    record = next(v for k, v in schemas.items() if "trajectory_record" in k)
    assert '"unenforced"' in record.split('"json_fields"', 1)[1].split("]", 1)[0]


def test_record_fields_written_by_the_scripts_are_documented():
    section = doc_text().split("### TrajectoryRecord", 1)[1].split("###", 1)[0]
    for name in ("enqueued_ms", "cancel_requested_ms"):
        assert f"| `{name}` |" in section, name


def test_workers_publish_dead_after_s(start_worker, redis_url, ns, client: Client):
    start_worker("local", dead_after_s=7.5)
    key = Keys(ns).workers
    (worker_id,) = wait_for(lambda: client.redis.zrange(key, 0, -1), what="a heartbeat")
    fields = client.redis.hgetall(Keys(ns).worker(worker_id.decode()))
    info = WorkerInfo.from_fields(fields)
    assert info.dead_after_s == 7.5


def test_a_fractional_timeout_is_reported_as_given(start_worker, client: Client):
    start_worker("local")
    client.open("frac")
    r = client.call("frac", "bash", {"command": "sleep 20"}, timeout_s=1.2, wait_s=60)
    assert r.error_code == "timeout", r
    assert "1.2s" in (r.error or "") and "2s" not in (r.error or "").replace("1.2s", ""), r
