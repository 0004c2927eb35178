"""The protocol as other languages see it: JSON Schema files, PROTOCOL.md, and
two non-Python clients (the redis-cli walkthrough and the Node.js example) run
against a live worker.

The document checks keep PROTOCOL.md in step with the code: every key, every
message field, every error code and every Lua script it shows is compared with
the source, and its shell examples with the walkthrough that the tests run.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from tests.helpers import missing
from toolq.producer import Client
from toolq.schemas import ErrorCode, Keys, Result, models
from toolq.schemas import export as schema_export

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "PROTOCOL.md"
WALKTHROUGH = ROOT / "examples" / "redis-cli" / "walkthrough.sh"
NODE_DIR = ROOT / "examples" / "node"
NODE_SCRIPTS = schema_export.SCRIPT_COPIES
SCRIPTS = {name: NODE_SCRIPTS[name] for name in schema_export.WALKTHROUGH_SCRIPTS}
REQUIRE_NODE = os.environ.get("TOOLQ_REQUIRE_NODE") == "1"


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The body of the PROTOCOL.md section whose heading is ``title``."""
    match = re.search(
        rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,{6}}} |\Z)", doc_text(), re.M | re.S
    )
    assert match, f"PROTOCOL.md has no section {title!r}"
    return match.group(2)


def table_column(text: str) -> list[str]:
    """First-column code spans of the markdown table rows in ``text``."""
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def marked_blocks(marker: str) -> dict[str, str]:
    """``<!-- marker:NAME -->`` followed by a fenced block, as {NAME: block body}."""
    pattern = rf"<!-- {marker}:(\w+) -->\n```\w*\n(.*?)\n```"
    return dict(re.findall(pattern, doc_text(), re.S))


# ------------------------------------------------------------ JSON Schema
def test_json_schema_files_match_the_models():
    problems = schema_export.check()
    assert not problems, f"{problems}: run `python -m toolq.schemas.export`"


def test_every_wire_model_is_exported():
    exported = {m.model for m in schema_export.MESSAGES.values()}
    wire = {
        obj
        for obj in vars(models).values()
        if inspect.isclass(obj)
        and issubclass(obj, models.WireModel)
        and obj is not models.WireModel
    }
    assert wire <= exported, f"not exported: {wire - exported}"
    assert {models.TrajectorySpec, models.ToolInfo} <= exported


def test_check_reports_drift(tmp_path: Path):
    assert schema_export.main(["--dir", str(tmp_path)]) == 0
    assert schema_export.check(tmp_path) == []
    (tmp_path / "result.json").write_text("{}\n")
    (tmp_path / "event.json").unlink()
    (tmp_path / "old.json").write_text("{}\n")
    assert schema_export.check(tmp_path) == [
        "missing: event.json",
        "stale: old.json",
        "differs from the models: result.json",
    ]
    assert schema_export.main(["--check", "--dir", str(tmp_path)]) == 1


def test_schemas_are_valid_and_describe_decoded_messages():
    files = {p.name: json.loads(p.read_text()) for p in schema_export.SCHEMA_DIR.glob("*.json")}
    for body in files.values():
        jsonschema.Draft202012Validator.check_schema(body)
    result = Result(call_id="1-0", traj="t", ok=False, error_code="timeout", data={"a": 1})
    jsonschema.validate(result.model_dump(mode="json"), files["result.json"])
    with pytest.raises(jsonschema.ValidationError):  # `ok` is required
        jsonschema.validate({"call_id": "1-0", "traj": "t"}, files["result.json"])
    with pytest.raises(jsonschema.ValidationError):  # the trajectory id pattern
        jsonschema.validate({"traj": "a b"}, files["open_request.json"])
    assert files["call_entry.json"]["x-toolq"]["json_fields"] == ["args", "policy"]
    assert set(files["error_code.json"]["enum"]) == {code.value for code in ErrorCode}


# ------------------------------------------------------------ PROTOCOL.md
def test_error_code_table_lists_every_code():
    documented = table_column(section("Error codes"))
    assert sorted(documented) == sorted(code.value for code in ErrorCode)


def keys_with_placeholders() -> dict[str, str]:
    """Every key ``Keys`` names, as PROTOCOL.md writes it (``<ns>:{T}:result:<call_id>``)."""
    keys = Keys("<ns>")
    out = {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name in ("ns", "traj_pattern"):
            continue
        if isinstance(member, property):
            out[name] = getattr(keys, name)
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]
            args = ["T" if p == "traj_id" else f"<{p}>" for p in params]
            out[name] = getattr(keys, name)(*args)
    return out


def test_every_key_is_documented():
    documented = set(table_column(section("Keys")))
    missing = {name: key for name, key in keys_with_placeholders().items() if key not in documented}
    assert not missing, f"keys missing from the PROTOCOL.md key table: {missing}"


@pytest.mark.parametrize(
    "model",
    [m.model for m in schema_export.MESSAGES.values()] + [models.Limits],
    ids=lambda m: m.__name__,
)
def test_every_message_field_is_documented(model: Any):
    documented = table_column(section(model.__name__))
    assert documented == list(model.model_fields), "field tables follow the model's order"


def test_trajectory_states_are_documented():
    documented = table_column(section("Trajectory states"))
    assert documented == [s.value for s in models.TrajStatus]


def test_doc_shows_the_scripts_the_client_runs():
    shown = marked_blocks("lua")
    assert shown.keys() == NODE_SCRIPTS.keys()
    for name, body in shown.items():
        assert body == NODE_SCRIPTS[name].strip("\n"), f"PROTOCOL.md's {name} is stale"


def walkthrough_regions() -> dict[str, str]:
    """The ``# doc:NAME`` ... ``# /doc`` regions of the walkthrough script."""
    text = WALKTHROUGH.read_text(encoding="utf-8")
    return dict(re.findall(r"^# doc:(\w+)\n(.*?)\n# /doc$", text, re.S | re.M))


def test_doc_shell_examples_are_the_walkthrough():
    regions = walkthrough_regions()
    assert {"open", "call", "result", "close"} <= regions.keys()
    assert marked_blocks("walkthrough") == regions
    # Every sh block in the document is one of those quoted from the script.
    assert len(re.findall(r"^```sh$", doc_text(), re.M)) == len(regions)


def test_examples_embed_the_same_scripts():
    shell = WALKTHROUGH.read_text(encoding="utf-8")
    node = (NODE_DIR / "toolq.js").read_text(encoding="utf-8")
    for name, lua in NODE_SCRIPTS.items():
        in_node = re.search(rf"const {name} = `\n(.*?)\n`;", node, re.S)
        assert in_node and in_node.group(1) == lua.strip("\n"), f"toolq.js {name} is stale"
    for name, lua in SCRIPTS.items():
        in_shell = re.search(rf"{name}=\$\(cat <<'LUA'\n(.*?)\nLUA\n\)", shell, re.S)
        assert in_shell and in_shell.group(1) == lua.strip("\n"), f"walkthrough {name} is stale"


# ------------------------------------------------------- redis-cli client
def redis_cli() -> str:
    found = "/usr/bin/redis-cli" if os.access("/usr/bin/redis-cli", os.X_OK) else None
    found = found or shutil.which("redis-cli")
    if not found:
        missing("no redis-cli (apt-get install redis-tools)")
    return found


def run_walkthrough(redis_url: str, ns: str, traj: str, wait_s: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_NAMESPACE": ns,
        "TOOLQ_TRAJ": traj,
        "TOOLQ_WAIT_S": str(wait_s),
        "REDIS_CLI": redis_cli(),
    }
    return subprocess.run(
        ["bash", str(WALKTHROUGH)], env=env, capture_output=True, text=True, timeout=wait_s + 60
    )


def test_walkthrough_drives_a_trajectory(start_worker, redis_url: str, ns: str, client: Client):
    start_worker("local")
    proc = run_walkthrough(redis_url, ns, "walk-1", wait_s=60)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert out["traj"] == "walk-1" and out["open"] == "new"
    assert out["ok"] == "1" and out["output"] == "hi" and out["exit_code"] == "0"
    assert out["status"] == "completed"
    # What the script did is what a Python client sees.
    result = client.result("walk-1", out["call_id"], timeout_s=1)
    assert result.ok and result.output == "hi\n" and result.tool == "bash"
    record = client.record("walk-1")
    assert record and record.status.value == "completed" and record.calls_total == 1
    assert record.spec and record.spec.labels == {"example": "redis-cli"}


def test_walkthrough_fails_when_nothing_answers(redis_url: str, ns: str):
    proc = run_walkthrough(redis_url, ns, "walk-2", wait_s=1)  # no worker
    assert proc.returncode != 0
    assert "no result" in proc.stderr


# ------------------------------------------------------------ Node client
def node_ready() -> str:
    """Path of node, with the example's node_modules installed (``npm ci``)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    problem = None if node and npm else "node and npm are needed for the Node.js example"
    if problem is None and not (NODE_DIR / "node_modules" / "redis").is_dir():
        proc = subprocess.run(
            [npm or "npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        problem = f"npm ci failed: {proc.stderr[-2000:]}" if proc.returncode else None
    if problem:
        if REQUIRE_NODE:
            pytest.fail(problem)
        pytest.skip(problem)
    assert node
    return node


def test_node_client_demo(start_worker, redis_url: str, ns: str):
    node = node_ready()
    worker = start_worker("local").worker
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_NAMESPACE": ns,
        "TOOLQ_TRAJ": "node-1",
    }
    proc = subprocess.run(
        [node, str(NODE_DIR / "demo.js")], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    steps = {line["step"]: line for line in map(json.loads, proc.stdout.splitlines())}
    assert steps["open"]["status"] == "new"
    hi = steps["call"]["result"]
    assert hi["ok"] is True and hi["output"] == "hi\n" and hi["exit_code"] == 0
    assert steps["state"]["result"]["output"] == "from node"
    failed = steps["error"]["result"]
    assert failed["ok"] is False and failed["error_code"] == "exit_status"
    assert failed["exit_code"] == 3
    assert steps["close"]["record"]["status"] == "completed"
    cancel = steps["cancel"]
    assert cancel["result"]["error_code"] == "cancelled" and cancel["status"] == "cancelled"
    # Background tasks exist only if this worker has the tools.
    assert worker is not None
    if worker.registry.resolve("bg_start") is None:
        assert steps["bg"]["supported"] is False
    else:
        task = steps["bg"]["task"]
        assert task["status"] == "completed" and "bg-hello" in task["stdout_tail"]
    # The Node client wrote what the Python models read.
    r = redis.Redis.from_url(redis_url)
    stored = Result.from_fields(r.hgetall(Keys(ns).result("node-1", hi["call_id"])))
    assert stored.output == "hi\n"
    r.close()
