"""`toolq mcp` over stdio, driven by the MCP SDK's own client against a live worker.

The SDK's stdio client spawns a real `toolq mcp` process, which talks to a
real Redis and a real worker (local backend). The session is one trajectory:
the tests read its record through the toolq client to see it open, count its
calls, and close. The command line's failures and the missing extra are here
too; HTTP is in test_mcp_http.py.
"""

from __future__ import annotations

import asyncio
import json
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from mcp.types import CallToolResult

from tests.helpers import TOOLQ, wait_for, worker_process
from tests.mcp_clients import (
    INITIALIZE,
    SPEC,
    call,
    notify,
    rpc,
    status,
    stdio_session,
    text,
    toolq_mcp,
    until,
)
from toolq.producer import Client
from toolq.schemas import TrajStatus
from toolq.worker.embedded import EmbeddedRedis


@pytest.fixture
def worker(start_worker: Callable[..., Any]) -> Any:
    return start_worker("local")


def test_stdio_lists_the_published_tools_the_policy_allows(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"

    async def listed() -> list[Any]:
        async with stdio_session(redis_url, ns, "--trajectory", traj) as session:
            return list((await session.list_tools()).tools)

    tools = {t.name: t for t in asyncio.run(listed())}
    assert client.record(traj) is None  # listing opened no trajectory (no sandbox claimed)
    published = {t.name: t for t in client.tools()}
    assert "archive" in published and "archive" not in tools  # blocked by the spec
    assert set(tools) == set(published) - {"archive"}
    assert {"bash", "shell", "read_file", "write_file"} <= set(tools)
    for name, tool in tools.items():
        assert tool.input_schema == published[name].parameters
        assert tool.description == published[name].description and tool.description
        Draft202012Validator.check_schema(tool.input_schema)


def test_joining_a_trajectory_lists_with_the_policy_in_force(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    """A trajectory whose policy an entry changed: its session lists and refuses
    by that policy, not by the spec the server was started with."""
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"
    client.open(traj)
    changed = client.result(traj, client.set_policy(traj, blocked_tools=["terminal"]))
    assert changed.ok, changed  # `terminal` is an alias of bash: bash is blocked

    async def joined() -> tuple[set[str], CallToolResult]:
        async with stdio_session(redis_url, ns, "--trajectory", traj) as session:
            names = {t.name for t in (await session.list_tools()).tools}
            return names, await call(session, "bash", command="true")

    names, refused = asyncio.run(joined())
    assert "bash" not in names and "archive" in names  # the entry's policy replaced the spec's
    assert refused.is_error and refused.structured_content is not None
    assert refused.structured_content["error_code"] == "tool_blocked"


def test_stdio_session_is_one_trajectory_closed_when_the_session_ends(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"

    async def session_calls() -> list[CallToolResult]:
        async with stdio_session(redis_url, ns, "--trajectory", traj) as session:
            results = [
                await call(session, "write_file", path="notes/a.txt", content="first\n"),
                await call(session, "bash", command="cat notes/a.txt; echo $GREETING"),
                await call(session, "shell", command="cd notes && export N=7"),
                await call(session, "shell", command="echo $N; ls"),
                await call(session, "read_file", path="notes/a.txt"),
            ]
            assert status(client, traj) == TrajStatus.RUNNING  # open while the session is
            return results

    results = asyncio.run(session_calls())
    assert not any(r.is_error for r in results), [text(r) for r in results]
    assert text(results[1]) == "first\nhello\n"  # the file, and the spec's env
    assert text(results[3]) == "7\na.txt\n"  # the shell's cwd and env persisted
    assert "first" in text(results[4])
    for r in results:
        assert r.structured_content is not None
        assert r.structured_content["ok"] is True and r.structured_content["traj"] == traj
    wait_for(lambda: status(client, traj) == TrajStatus.COMPLETED, what="the close")
    record = client.record(traj)
    assert record is not None and record.calls_total == len(results) == record.calls_submitted


def test_stdio_tool_errors_carry_the_error_code(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"
    failing = [
        ("no_such_tool", {}, "unknown_tool"),
        ("bash", {"command": 3}, "invalid_args"),
        ("bash", {}, "invalid_args"),
        ("archive", {"path": "."}, "tool_blocked"),
        ("bash", {"command": "echo partial; exit 3"}, "exit_status"),
        ("bash", {"command": "sleep 30", "timeout_s": 0.5}, "timeout"),
        ("read_file", {"path": "missing.txt"}, "not_found"),
    ]

    async def session_calls() -> list[CallToolResult]:
        async with stdio_session(redis_url, ns, "--trajectory", traj) as session:
            results = [await call(session, tool, **args) for tool, args, _ in failing]
            results.append(await call(session, "bash", command="echo still here"))
            return results

    *errors, after = asyncio.run(session_calls())
    for (tool, _, code), result in zip(failing, errors, strict=True):
        assert result.is_error, (tool, code, text(result))
        assert result.structured_content is not None
        assert result.structured_content["error_code"] == code, result.structured_content
        assert result.structured_content["ok"] is False
        assert f"[{code}]" in text(result), text(result)
    exit_result = errors[4]
    assert exit_result.structured_content is not None
    assert exit_result.structured_content["exit_code"] == 3
    assert text(exit_result).startswith("partial\n")
    assert not after.is_error and text(after) == "still here\n"  # the session survived them
    wait_for(lambda: status(client, traj) == TrajStatus.COMPLETED, what="the close")
    record = client.record(traj)
    assert record is not None  # every call got exactly one result
    assert (record.calls_total, record.calls_failed) == (len(failing) + 1, len(failing))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_stdio_server_while_stdin_is_open(
    redis_url: str, ns: str, worker: Any, client: Client, signum: int, tmp_path: Path
) -> None:
    """The client keeps stdin open (no EOF): the signal alone ends the process,
    with status 0, after closing the trajectory."""
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"
    command = toolq_mcp(redis_url, ns, "--spec", json.dumps(SPEC), "--trajectory", traj)
    with (tmp_path / "mcp.log").open("w") as log:
        proc = subprocess.Popen(command, stdin=PIPE, stdout=PIPE, stderr=log, bufsize=0)
    try:
        assert "result" in rpc(proc, 1, "initialize", INITIALIZE)
        notify(proc, "notifications/initialized")
        called = rpc(proc, 2, "tools/call", {"name": "bash", "arguments": {"command": "true"}})
        assert called["result"]["isError"] is False, called
        proc.send_signal(signum)
        assert proc.wait(60) == 0, (tmp_path / "mcp.log").read_text()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: status(client, traj) == TrajStatus.COMPLETED, what="the close")
    record = client.record(traj)
    assert record is not None and record.calls_total == 1


def test_keep_open_leaves_the_trajectory_for_the_next_session(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"

    async def three_sessions() -> list[CallToolResult]:
        async with stdio_session(redis_url, ns, "--trajectory", traj, "--keep-open") as first:
            wrote = await call(first, "write_file", path="kept.txt", content="kept")
        assert status(client, traj) == TrajStatus.RUNNING
        async with stdio_session(redis_url, ns, "--trajectory", traj) as second:
            joined = await call(second, "read_file", path="kept.txt")
        await until(lambda: status(client, traj) == TrajStatus.COMPLETED, "the second close")
        async with stdio_session(redis_url, ns, "--trajectory", traj) as third:
            return [wrote, joined, await call(third, "read_file", path="kept.txt")]

    wrote, joined, started_over = asyncio.run(three_sessions())
    assert not wrote.is_error and not joined.is_error and "kept" in text(joined)
    assert started_over.structured_content is not None  # an ended one starts over, empty
    assert started_over.structured_content["error_code"] == "not_found"
    wait_for(lambda: status(client, traj) == TrajStatus.COMPLETED, what="the third close")


def test_a_trajectory_that_timed_out_answers_trajectory_ended(
    redis_url: str, ns: str, worker: Any, client: Client
) -> None:
    """An idle session's trajectory times out like any other; the session's next
    call is told so (a fresh sandbox would silently lose the agent's files)."""
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"
    spec = {"limits": {"idle_timeout_s": 1}}

    async def idle_session() -> tuple[CallToolResult, CallToolResult]:
        async with stdio_session(redis_url, ns, "--trajectory", traj, spec=spec) as session:
            first = await call(session, "write_file", path="a.txt", content="a")
            await until(lambda: status(client, traj) == TrajStatus.TIMEOUT, "the idle timeout")
            return first, await call(session, "read_file", path="a.txt")

    first, late = asyncio.run(idle_session())
    assert not first.is_error and late.is_error
    assert late.structured_content is not None
    assert late.structured_content["error_code"] == "trajectory_ended"
    assert status(client, traj) == TrajStatus.TIMEOUT  # not started over


def test_without_a_worker_calls_answer_wait_timeout(
    redis_url: str, ns: str, client: Client
) -> None:
    """No worker: a call gives up after --wait-s with a tool error, not a hang."""
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"

    async def unanswered() -> CallToolResult:
        async with stdio_session(redis_url, ns, "--trajectory", traj, "--wait-s", "1") as s:
            return await call(s, "bash", command="true")

    result = asyncio.run(unanswered())
    assert result.is_error and result.structured_content is not None
    assert result.structured_content["error_code"] == "wait_timeout"
    assert "[wait_timeout]" in text(result)
    assert status(client, traj) == TrajStatus.PENDING  # submitted: a worker would run it


def test_redis_unreachable_mid_session_is_a_tool_error_with_its_code(ns: str) -> None:
    """A failure of the client itself, not only the worker's codes, is a tool result
    with toolq's code, and infra set: toolq, not the model, is to blame."""
    traj = f"mcp-test-{uuid.uuid4().hex[:8]}"
    with EmbeddedRedis() as server:
        worker = worker_process(server.url, ns, "w-mcp")
        try:

            async def session_calls() -> tuple[CallToolResult, CallToolResult]:
                async with stdio_session(server.url, ns, "--trajectory", traj) as session:
                    up = await call(session, "bash", command="echo up")
                    server.stop()
                    return up, await call(session, "bash", command="echo down")

            up, down = asyncio.run(session_calls())
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    assert not up.is_error and text(up) == "up\n"
    assert down.is_error and down.structured_content is not None
    assert down.structured_content["error_code"] == "redis_unreachable"
    assert down.structured_content["infra"] is True
    assert text(down).startswith("[redis_unreachable]"), text(down)


def test_stdin_closed_at_once_exits_0_and_warns_without_a_worker(redis_url: str, ns: str) -> None:
    r = subprocess.run(
        toolq_mcp(redis_url, ns), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # stdout is the protocol's: nothing else is written there
    assert "no worker is alive" in r.stderr


@pytest.mark.parametrize(
    ("options", "exit_status"),
    [
        (["--transport", "http", "--trajectory", "t1"], 2),
        (["--trajectory", "bad id!"], 2),
        (["--max-sessions", "2"], 2),  # stdio has one session
        (["--transport", "http", "--max-sessions", "0"], 2),
        (["--spec", '{"imag": "x"}'], 2),
        (["--redis-url", "redis://127.0.0.1:1"], 3),  # unreachable: fails at start
    ],
)
def test_bad_starts_fail_with_one_line_and_the_cli_status(
    redis_url: str, ns: str, options: list[str], exit_status: int
) -> None:
    command = toolq_mcp(redis_url, ns)
    if options[0] == "--redis-url":  # the group's option, before the command
        command = [*TOOLQ, *options, "--namespace", ns, "mcp"]
    else:
        command += options
    r = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == exit_status, (options, r.stderr)
    assert r.stderr.startswith(("Error", "Usage")), r.stderr


def test_toolq_works_without_the_mcp_extra_and_says_how_to_get_it(redis_url: str, ns: str) -> None:
    """A Python where `import mcp` fails, as when the extra is not installed."""
    no_mcp = "import sys; sys.modules['mcp'] = None; from toolq.producer.cli import main; main()"
    base = [sys.executable, "-c", no_mcp, "--redis-url", redis_url, "--namespace", ns]
    served = subprocess.run(
        [*base, "mcp"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert served.returncode == 1, served.stderr
    assert "pip install 'toolq[mcp]'" in served.stderr
    listed = subprocess.run([*base, "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and "mcp" in listed.stdout
    tools = subprocess.run([*base, "tools", "--format", "mcp"], capture_output=True, text=True)
    assert tools.returncode == 0, tools.stderr  # the mcp format needs no SDK
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, toolq.producer.cli; print('mcp' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert imported.stdout.strip() == "False"  # the CLI does not import the SDK


def _reply_line(proc: subprocess.Popen) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "no reply within 60 s"
    reply: dict[str, Any] = json.loads(proc.stdout.readline())
    return reply


#: Lines that are no JSON-RPC message, and the error code and id of their reply.
BAD_LINES = [
    (b"{not json\n", -32700, None),
    (b'{"jsonrpc": "2.0", "id": 7, "params": {}}\n', -32600, 7),  # no method
    (b'{"jsonrpc": "1.0", "id": "a", "method": "ping"}\n', -32600, "a"),
    (b'{"id": 8, "method": "ping"}\n', -32600, 8),  # no jsonrpc at all
    (b'[{"jsonrpc": "2.0", "id": 9, "method": "ping"}]\n', -32600, None),  # a batch
    (b'{"jsonrpc": "2.0", "id": 10, "method": 5}\n', -32600, 10),
    (b"\xff\xfe\n", -32700, None),
]


def test_stdio_answers_what_is_no_json_rpc_message_with_its_error(
    redis_url: str, ns: str, worker: Any, tmp_path: Path
) -> None:
    """Each bad line gets JSON-RPC's error reply (the SDK alone drops it and the client
    waits for nothing); the session goes on, and a good request still gets its answer."""
    command = toolq_mcp(redis_url, ns, "--spec", json.dumps(SPEC))
    with (tmp_path / "mcp.log").open("w") as log:
        proc = subprocess.Popen(command, stdin=PIPE, stdout=PIPE, stderr=log, bufsize=0)
    try:
        assert "result" in rpc(proc, 1, "initialize", INITIALIZE)
        notify(proc, "notifications/initialized")
        assert proc.stdin is not None
        for line, code, msg_id in BAD_LINES:
            proc.stdin.write(line)
            reply = _reply_line(proc)
            assert reply["jsonrpc"] == "2.0" and reply["error"]["code"] == code, (line, reply)
            assert reply["id"] == msg_id, (line, reply)
        proc.stdin.write(b"\n")  # a blank line is no message: no reply
        assert "result" in rpc(proc, 2, "ping", {})
        listed = rpc(proc, 3, "tools/list", {})
        assert any(t["name"] == "bash" for t in listed["result"]["tools"])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0, (tmp_path / "mcp.log").read_text()


def test_stdin_from_a_file_gets_the_same_error_replies(
    redis_url: str, ns: str, worker: Any, tmp_path: Path
) -> None:
    """stdin a regular file (it cannot be polled): the same checks, the error replies in
    the order of their lines."""
    requests = tmp_path / "requests.jsonl"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE}
    lines = [json.dumps(init).encode() + b"\n"] + [line for line, _, _ in BAD_LINES]
    requests.write_bytes(b"".join(lines))
    with requests.open("rb") as stdin:
        r = subprocess.run(
            toolq_mcp(redis_url, ns, "--spec", json.dumps(SPEC)),
            stdin=stdin,
            capture_output=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    replies = [json.loads(line) for line in r.stdout.splitlines()]
    assert [r["id"] for r in replies if "result" in r] == [1]  # initialize, answered
    codes = [(reply["error"]["code"], reply["id"]) for reply in replies if "error" in reply]
    assert codes == [(code, msg_id) for _, code, msg_id in BAD_LINES]
