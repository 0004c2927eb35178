"""The persistent ``shell`` tool through Redis, on every backend.

State (cwd, env, functions, an activated virtualenv) survives calls; a timeout
interrupts the command but not the session; a session that exits is restarted.
"""

from __future__ import annotations

from tests.helpers import count_procs, unique_sleep
from toolq.producer import Client


def test_cwd_env_functions_and_venv_persist(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    setup = client.call(
        "t",
        "shell",
        {
            "command": "mkdir -p proj/venv/bin && cd proj && export GREETING=hello && "
            'greet() { echo "$GREETING $1"; } && '
            "printf 'export VIRTUAL_ENV=%s/venv\\nexport PATH=$VIRTUAL_ENV/bin:$PATH\\n' "
            '"$PWD" > venv/bin/activate && '
            "printf '#!/bin/sh\\necho from-venv\\n' > venv/bin/vtool && chmod +x venv/bin/vtool"
        },
    )
    assert setup.ok, setup
    assert setup.data and setup.data["session"] == "default" and not setup.data["restarted"]
    assert client.call("t", "shell", {"command": "source venv/bin/activate"}).ok
    r = client.call("t", "shell", {"command": "pwd; greet world; vtool; echo $VIRTUAL_ENV"})
    assert r.ok, r
    lines = r.output.splitlines()
    assert lines[0].endswith("/proj") and r.data and r.data["cwd"] == lines[0]
    assert lines[1:3] == ["hello world", "from-venv"]
    assert lines[3] == lines[0] + "/venv"
    # a fresh `bash` call does not see the session's state
    assert client.call("t", "bash", {"command": "echo ${GREETING:-unset}"}).output == "unset\n"


def test_exit_code_output_and_errors(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    r = client.call("t", "shell", {"command": "echo out; echo err >&2; (exit 3)"})
    assert not r.ok and r.exit_code == 3 and r.error_code == "exit_status"
    assert r.output == "out\nerr\n"
    no_newline = client.call("t", "shell", {"command": "printf abc"})
    assert no_newline.ok and no_newline.output == "abc"
    # a syntax error is the command's failure, not the session's
    bad = client.call("t", "shell", {"command": 'echo "unterminated'})
    assert not bad.ok and bad.exit_code == 2 and "unexpected EOF" in bad.output
    # commands cannot read the session's input: stdin is /dev/null
    r = client.call("t", "shell", {"command": "cat; read -r line; echo read=$?"})
    assert r.ok and r.output == "read=1\n", r


def test_timeout_interrupts_the_command_and_keeps_the_session(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    secs = unique_sleep()
    r = client.call(
        "t",
        "shell",
        {
            "command": f"mkdir -p sub && cd sub && echo before && sleep {secs}; echo never",
            "timeout_s": 1,
        },
    )
    assert not r.ok and r.timed_out and r.error_code == "timeout"
    assert r.output.startswith("before\n") and "never" not in r.output
    after = client.call("t", "shell", {"command": "pwd; echo alive"})
    assert after.ok and after.output.endswith("/sub\nalive\n"), after
    assert after.data and not after.data["restarted"]
    assert count_procs(client, "t", f"sleep {secs}") == 0


def test_a_command_that_survives_sigint_is_killed_and_the_session_kept(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    assert client.call("t", "shell", {"command": "export KEEP=1"}).ok
    stubborn = (
        "python3 -c 'import signal, time; "
        'signal.signal(signal.SIGINT, lambda *a: print("ignored", flush=True)); '
        'print("up", flush=True); time.sleep(1000)\''
    )
    r = client.call("t", "shell", {"command": stubborn, "timeout_s": 1})
    assert r.timed_out and r.output.startswith("up\nignored\n"), r
    after = client.call("t", "shell", {"command": "echo KEEP=$KEEP"})
    assert after.ok and after.output == "KEEP=1\n" and after.data and not after.data["restarted"]


def test_background_job_of_a_session_survives_a_later_timeout(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    secs = unique_sleep()
    assert client.call("t", "shell", {"command": f"sleep {secs} &"}).ok
    assert client.call("t", "shell", {"command": "sleep 1000", "timeout_s": 1}).timed_out
    assert count_procs(client, "t", f"sleep {secs}") == 1  # not the timed-out command's


def test_exit_ends_the_session_and_the_next_call_restarts_it(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    r = client.call("t", "shell", {"command": "cd / && export GONE=1 && exit 7"})
    assert not r.ok and r.exit_code == 7 and r.data and r.data.get("session_ended")
    fresh = client.call("t", "shell", {"command": "echo ${GONE:-unset}; pwd"})
    assert fresh.ok and fresh.data and fresh.data["restarted"]
    unset, cwd = fresh.output.splitlines()
    assert unset == "unset" and cwd != "/"
    assert not client.call("t", "shell", {"command": "true"}).data["restarted"]  # type: ignore[index]


def test_named_sessions_are_separate_and_restart_on_request(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    assert client.call("t", "shell", {"command": "export WHO=a", "session": "a"}).ok
    assert client.call("t", "shell", {"command": "export WHO=b", "session": "b"}).ok
    a = client.call("t", "shell", {"command": "echo $WHO", "session": "a"})
    b = client.call("t", "shell", {"command": "echo $WHO", "session": "b"})
    assert (a.output, b.output) == ("a\n", "b\n")
    r = client.call(
        "t", "shell", {"command": "echo ${WHO:-unset}", "session": "a", "restart": True}
    )
    assert r.output == "unset\n" and r.data and r.data["restarted"]
    bad = client.call("t", "shell", {"command": "true", "session": "no spaces"})
    assert not bad.ok and bad.error_code == "invalid_args"


def test_output_flood_is_capped_and_counted(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t", {"limits": {"max_output_bytes": 4096}})
    size = 100 * 1000 * 1000
    r = client.call(
        "t",
        "shell",
        {"command": f"echo START; head -c {size} /dev/zero | tr '\\0' x; echo; echo END"},
        timeout_s=120,
    )
    assert r.ok and r.truncated, r
    assert r.output_bytes == len("START\n") + size + 1 + len("END\n")
    assert r.output.startswith("START\nxxx") and r.output.endswith("xxx\nEND\n")
    assert len(r.output) < 4096 + 100 and "bytes omitted" in r.output
    assert client.call("t", "shell", {"command": "echo next"}).output == "next\n"


def test_framework_shell_aliases(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    # terminal_stateful and execute_bash (OpenHands) are the persistent shell
    assert client.call("t", "terminal_stateful", {"command": "cd /tmp"}).ok
    r = client.call("t", "execute_bash", {"command": "pwd", "timeout": 10, "security_risk": "LOW"})
    assert r.ok and r.output == "/tmp\n" and r.tool == "shell", r
    refused = client.call("t", "execute_bash", {"command": "y", "is_input": "true"})
    assert not refused.ok and refused.error_code == "invalid_args"
    # run_shell_command (Gemini CLI) is a fresh bash, optionally in a directory
    assert client.call("t", "bash", {"command": "mkdir -p 'my dir'"}).ok
    r = client.call(
        "t",
        "run_shell_command",
        {"command": 'basename "$PWD"', "directory": "my dir", "description": "x"},
    )
    assert r.ok and r.output == "my dir\n" and r.tool == "bash", r
