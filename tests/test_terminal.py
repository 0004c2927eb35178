"""Terminals through Redis, on every backend: a program on a pseudo-terminal, driven
by keystrokes, its screen rendered by a VT emulator in the worker.

Full-screen programs (``less``, ``top``, the Python REPL) draw and take keys;
the scrollback since the last read comes with the screen; waits end on a
pattern, on quiet output or at the timeout; caps, limits and cancel hold.
"""

from __future__ import annotations

import subprocess
import threading
import time

from tests.conftest import require_docker
from tests.helpers import count_procs, unique_sleep
from toolq.producer import Client
from toolq.schemas import Result

#: The end of a shell prompt (the sandbox user's ``$``, root's ``#`` on the local backend).
PROMPT = r"[$#] $"


def open_traj(client: Client, backend: str, **spec: object) -> None:
    """Open ``t``; on the local backend with a HOME of its own, so that the shell does
    not run this host's ``~/.bashrc`` (the sandbox's is the image's)."""
    env = {"HOME": "/nonexistent-toolq-home"} if backend == "local" else {}
    client.open("t", {"env": env, **spec})


def send(client: Client, args: dict[str, object]) -> Result:
    """A ``terminal_send`` call of ``t``."""
    return client.call("t", "terminal_send", args)


def interrupt(client: Client) -> None:
    """C-c until the screen goes quiet: bash can miss a SIGINT that lands between a
    loop's commands (seen on a loaded host), and the loop then runs on."""
    for _ in range(5):
        r = send(client, {"keys": "C-c", "quiet_s": 0.3, "timeout_s": 3})
        if r.ok and r.data["waited"] == "quiet":
            return
    raise AssertionError(f"the terminal never went quiet: {r}")


def screen(r) -> str:
    """The screen part of a terminal result (the output after its scrollback lines)."""
    return "\n".join(r.output.splitlines()[r.data["scrollback_lines"] :])


def test_a_shell_on_a_terminal_takes_keys_and_shows_its_screen(
    backend, start_worker, client: Client
):
    start_worker(backend)
    open_traj(client, backend)
    opened = client.call("t", "terminal_open", {"rows": 10, "cols": 60, "wait_for": PROMPT})
    assert opened.ok, opened
    assert opened.data["rows"] == 10 and opened.data["cols"] == 60 and opened.data["created"]
    r = client.call(
        "t", "terminal_send", {"keys": ["stty size; tty; echo $TERM", "Enter"], "wait_for": "xterm"}
    )
    assert r.ok, r
    assert "10 60" in r.output and "/dev/pts/" in r.output and "xterm-256color" in r.output
    # Ctrl-C interrupts the foreground job (the terminal's line discipline), the shell stays
    r = send(client, {"keys": ["sleep 100", "Enter"], "quiet_s": 0.3})
    assert r.ok and r.data["waited"] == "quiet", r
    r = send(client, {"keys": "C-c", "quiet_s": 0.3})
    assert r.ok and "^C" in r.output, r
    r = client.call(
        "t",
        "terminal_send",
        {"keys": ["echo after=$?", "Enter"], "wait_for": "after=130\n.*" + PROMPT},
    )
    assert r.ok, r
    # C-d ends the shell (at its prompt: typed earlier, the line discipline takes it)
    r = send(client, {"keys": "C-d", "quiet_s": 5})
    assert r.ok and r.data["alive"] is False and r.data["waited"] == "exited", r
    # typing into an ended terminal: a clear error; opening it again starts afresh
    r = send(client, {"keys": "ls\n"})
    assert not r.ok and r.error_code == "invalid_args" and "ended" in (r.error or ""), r
    again = client.call("t", "terminal_open", {"wait_for": PROMPT})
    assert again.ok and again.data["created"] and again.data["term_id"] != opened.data["term_id"]


def test_full_screen_programs_less_top_and_the_python_repl(backend, start_worker, client: Client):
    start_worker(backend)
    open_traj(client, backend)
    assert client.call("t", "terminal_open", {"rows": 12, "cols": 70, "wait_for": PROMPT}).ok
    client.call(
        "t",
        "write_file",
        {"path": "lines.txt", "content": "".join(f"line {i}\n" for i in range(1, 201))},
    )
    # less draws one screenful on the alternate screen and waits for keys
    r = client.call(
        "t", "terminal_send", {"keys": ["less lines.txt", "Enter"], "wait_for": "line 11"}
    )
    assert r.ok and r.data["alternate_screen"], r
    rows = screen(r).splitlines()
    assert rows[0] == "line 1" and rows[10] == "line 11" and len(rows) == 12, rows
    r = send(client, {"keys": "Space", "wait_for": "line 22"})
    assert screen(r).splitlines()[0] == "line 12", r.output
    r = send(client, {"keys": ["Down", "Down"], "quiet_s": 0.3})
    assert screen(r).splitlines()[0] == "line 14", r.output  # arrows in application mode
    r = send(client, {"keys": ["/line 150", "Enter"], "wait_for": "line 160"})
    assert screen(r).splitlines()[0] == "line 150", r.output
    # q leaves less: the shell's screen is back, with no scrollback from the pager
    r = send(client, {"keys": "q", "wait_for": PROMPT})
    assert r.ok and not r.data["alternate_screen"] and r.data["scrollback_lines"] == 0, r
    assert "less lines.txt" in r.output and "line 150" not in r.output
    # top redraws every few seconds: quiet for 0.5 s still comes; q quits
    r = send(client, {"keys": ["top -d 1", "Enter"], "wait_for": "PID"})
    assert r.ok and "PID" in screen(r), r
    r = send(client, {"keys": "q", "wait_for": PROMPT})
    assert r.ok and not r.data["alternate_screen"], r
    # the Python REPL: prompts, a multi-line block, Ctrl-D ends it
    r = send(client, {"keys": ["python3 -q", "Enter"], "wait_for": ">>> $"})
    assert r.ok, r
    r = client.call(
        "t",
        "terminal_send",
        {
            "keys": ["for i in range(3):", "Enter", "    print(i * 7)", "Enter", "Enter"],
            "wait_for": "14\\n>>> $",
        },
    )
    assert r.ok and "0\n7\n14\n>>>" in r.output, r
    r = send(client, {"keys": "C-d", "wait_for": PROMPT})
    assert r.ok, r


def test_scrollback_since_the_last_read_comes_before_the_screen(
    backend, start_worker, client: Client
):
    start_worker(backend)
    open_traj(client, backend, limits={"max_output_bytes": 2048})
    assert client.call("t", "terminal_open", {"rows": 5, "cols": 40, "wait_for": PROMPT}).ok
    r = client.call(
        "t", "terminal_send", {"keys": ["seq 1 30", "Enter"], "wait_for": r"^30\n.*" + PROMPT}
    )
    lines = r.output.splitlines()
    assert r.ok and r.data["scrollback_lines"] >= 26, r
    # scrollback and screen together: every line, once, in order
    start = lines.index("1")
    assert lines[start : start + 30] == [str(i) for i in range(1, 31)], lines
    assert len(screen(r).splitlines()) <= 5 and "30" in screen(r).splitlines()
    # the next read has no scrollback: it was read
    r = client.call("t", "terminal_read", {"quiet_s": 0})
    assert r.data["scrollback_lines"] == 0 and r.data["screen_lines"] <= 5
    # more than the cap: the oldest scrollback lines are dropped and counted
    r = client.call(
        "t", "terminal_send", {"keys": ["seq 1 5000", "Enter"], "wait_for": r"^5000\n.*" + PROMPT}
    )
    assert r.ok and r.truncated and r.output_bytes > 2048, r
    assert len(r.output.encode()) <= 2048 and r.output.startswith("[... ")
    assert "lines of scrollback omitted" in r.output.splitlines()[0]
    assert "5000" in screen(r)
    # a flood: the agent keeps the last 4 MiB, the worker renders the last 128 KiB; the
    # result says how much it left out, stays within the cap, and the screen is right
    flood = "head -c 6000000 /dev/zero | tr '\\0' y | fold -w 30; echo FLOOD-DONE"
    r = send(client, {"keys": [flood, "Enter"], "wait_for": "FLOOD-DONE\n.*" + PROMPT})
    assert r.ok and r.truncated and len(r.output.encode()) <= 2048, r
    assert r.output.startswith("[... ") and "bytes of output not rendered" in r.output
    assert r.data["dropped_bytes"] + r.data["skipped_bytes"] > 5_000_000, r.data
    rows = screen(r).splitlines()
    assert any(row.endswith("yFLOOD-DONE") for row in rows), rows  # fold ends with no newline
    # the text view: the output since the last read as a log
    r = send(client, {"keys": ["printf 'a\\033[1mb\\033[0mc\\n'", "Enter"], "view": "text"})
    assert r.ok and "abc\n" in r.output and "\x1b" not in r.output and "\r" not in r.output


def test_waits_end_on_a_pattern_quiet_or_the_timeout_and_bad_input_is_refused(
    backend, start_worker, client: Client
):
    start_worker(backend)
    open_traj(client, backend)
    assert client.call("t", "terminal_open", {"wait_for": PROMPT}).ok
    # a pattern that never comes: a timeout error with the screen so far
    r = client.call(
        "t",
        "terminal_send",
        {"keys": ["echo start; sleep 30", "Enter"], "wait_for": "NEVER", "timeout_s": 1},
    )
    assert not r.ok and r.timed_out and r.error_code == "timeout" and "start" in r.output, r
    # output that never goes quiet: the wait ends at timeout_s, not an error
    send(client, {"keys": "C-c", "quiet_s": 0.2})
    r = client.call(
        "t",
        "terminal_send",
        {"keys": ["while :; do date +%N; sleep 0.05; done", "Enter"], "timeout_s": 1.5},
    )
    assert r.ok and r.data["waited"] == "timeout", r
    interrupt(client)
    # a pattern that arrives later than the call's start
    r = client.call(
        "t",
        "terminal_send",
        {"keys": ["sleep 1; echo READY-$((6*7))", "Enter"], "wait_for": "READY-42"},
    )
    assert r.ok and r.data["waited"] == "pattern" and r.data["matched"] == "READY-42", r
    # bad input: a clear error, nothing lost
    for args in (
        {"keys": "x", "wait_for": "("},
        {"keys": 3},
        {"keys": "x", "terminal": "../x"},
        {"keys": "x", "quiet_s": -1},
    ):
        bad = client.call("t", "terminal_send", args)
        assert not bad.ok and bad.error_code == "invalid_args", (args, bad)
    missing = client.call("t", "terminal_read", {"terminal": "nope"})
    assert not missing.ok and missing.error_code == "not_found", missing
    big = client.call("t", "terminal_open", {"terminal": "big", "rows": 501})
    assert not big.ok and big.error_code == "invalid_args"
    # at most 8 terminals per trajectory
    for i in range(7):
        assert client.call("t", "terminal_open", {"terminal": f"n{i}", "quiet_s": 0}).ok
    over = client.call("t", "terminal_open", {"terminal": "ninth", "quiet_s": 0})
    assert not over.ok and over.error_code == "limit_exceeded", over
    closed = client.call("t", "terminal_close", {"terminal": "n0"})
    assert closed.ok and closed.data["alive"] is False
    assert client.call("t", "terminal_open", {"terminal": "ninth", "quiet_s": 0}).ok


def test_named_keys_command_resize_and_the_terminus_alias(backend, start_worker, client: Client):
    start_worker(backend)
    open_traj(client, backend)
    # a program instead of a shell: in raw mode it sees the bytes each key sends
    prog = (
        "import os,tty; tty.setraw(0); os.write(1, b'ready'); data=b''\n"
        "while not data.endswith(b'\\r'): data += os.read(0, 64)\n"
        "tty.setcbreak(0); print(repr(data))"
    )
    client.call("t", "write_file", {"path": "keys.py", "content": prog})
    r = client.call(
        "t", "terminal_open", {"terminal": "raw", "command": "python3 keys.py", "wait_for": "ready"}
    )
    assert r.ok, r
    keys = ["C-a", "Up", "F5", "M-x", "Tab", "C-c", "Escape", "BSpace", "Enter"]
    r = send(client, {"terminal": "raw", "keys": keys, "quiet_s": 1})
    assert r.ok and r.data["alive"] is False and r.data["exit_code"] == 0, r
    assert "b'\\x01\\x1b[A\\x1b[15~\\x1bx\\t\\x03\\x1b\\x7f\\r'" in r.output, r.output
    # resize: the program sees the new size
    assert client.call("t", "terminal_open", {"rows": 24, "cols": 80, "wait_for": PROMPT}).ok
    r = client.call("t", "terminal_open", {"rows": 30, "cols": 100, "quiet_s": 0.2})
    assert r.ok and not r.data["created"] and r.data["rows"] == 30
    r = send(client, {"keys": ["stty size", "Enter"], "wait_for": "30 100"})
    assert r.ok, r
    # literal: key names typed as text
    r = client.call(
        "t", "terminal_send", {"keys": ["echo ", "Enter"], "literal": True, "quiet_s": 0.3}
    )
    assert "echo Enter" in r.output, r
    send(client, {"keys": "C-u", "quiet_s": 0.2})
    # Terminal-Bench Terminus's send_keys
    r = client.call(
        "t", "send_keys", {"keystrokes": "echo $((40+2))\n", "is_blocking": True, "timeout_sec": 10}
    )
    assert r.ok and r.tool == "terminal_send" and "\n42" in r.output, r
    r = client.call("t", "send_keys", {"keystrokes": "echo $((6*7))x\n", "duration": 1.0})
    assert r.ok and r.data["waited"] == "quiet" and "\n42x" in r.output, r


def test_close_and_cancel_kill_the_terminals_programs(backend, start_worker, client: Client):
    start_worker(backend)
    open_traj(client, backend)
    assert client.call("t", "terminal_open", {"wait_for": PROMPT}).ok
    seconds = unique_sleep()
    sent = client.call(
        "t", "terminal_send", {"keys": [f"sleep {seconds} &", "Enter"], "quiet_s": 0.3}
    )
    assert sent.ok and count_procs(client, "t", f"sleep {seconds}") == 1, sent
    assert client.call("t", "terminal_close", {}).ok
    assert count_procs(client, "t", f"sleep {seconds}") == 0
    # cancel: a read waiting in the terminal is answered, its program killed
    assert client.call("t", "terminal_open", {"wait_for": PROMPT}).ok
    seconds = unique_sleep()
    assert client.call(
        "t", "terminal_send", {"keys": [f"sleep {seconds}", "Enter"], "quiet_s": 0.3}
    ).ok
    result: dict[str, Result] = {}

    def waiting() -> None:
        args = {"wait_for": "NEVER", "timeout_s": 120}
        result["r"] = client.call("t", "terminal_read", args, wait_s=90)

    thread = threading.Thread(target=waiting)
    thread.start()
    deadline = time.monotonic() + 60
    while (record := client.record("t")) is not None and record.calls_in_flight == 0:
        assert time.monotonic() < deadline, record  # the read has not reached the worker
        time.sleep(0.05)
    client.cancel("t")
    thread.join(90)
    assert result["r"].error_code == "cancelled", result["r"]
    while (record := client.record("t")) is None or not record.status.final:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert record.status.value == "cancelled"
    if backend == "local":  # the docker backend removes the container, and the processes
        ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True, check=True)
        assert f"sleep {seconds}" not in ps.stdout


def test_a_lost_sandbox_takes_its_terminals_along(start_worker, client: Client, dc):
    """The container dies under a waiting read: the read is answered (sandbox_lost),
    the next sandbox has no terminal of that name, and a new one starts blank."""
    require_docker()
    start_worker("docker")
    client.open("t")
    opened = client.call("t", "terminal_open", {"wait_for": PROMPT})
    assert opened.ok, opened
    assert send(client, {"keys": ["echo BEFORE-LOSS", "Enter"], "wait_for": "BEFORE-LOSS\\n"}).ok
    result: dict[str, Result] = {}

    def waiting() -> None:
        args = {"wait_for": "NEVER", "timeout_s": 60}
        result["r"] = client.call("t", "terminal_read", args, wait_s=120)

    thread = threading.Thread(target=waiting)
    thread.start()
    deadline = time.monotonic() + 60
    while (record := client.record("t")) is not None and record.calls_in_flight == 0:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    dc.containers.get(opened.slot.split(":", 1)[0]).remove(force=True)  # <short id>:<slot>
    thread.join(120)
    assert result["r"].error_code == "sandbox_lost", result["r"]
    gone = client.call("t", "terminal_read", {})
    assert gone.error_code == "not_found" and gone.slot_reset, gone
    fresh = client.call("t", "terminal_open", {"wait_for": PROMPT})
    assert fresh.ok and "BEFORE-LOSS" not in fresh.output, fresh


def test_keys_a_program_never_reads_are_a_clear_error(start_worker, client: Client):
    """A program in raw mode that reads nothing fills the terminal's input: typing more
    is refused after a few seconds (timeout), and the terminal and the trajectory go on.
    (In line mode the terminal itself drops what passes a line's length, as any does.)"""
    start_worker("local")
    open_traj(client, "local")
    stuck = (
        "python3 -c 'import time,tty; tty.setraw(0); print(\"raw\", flush=True); time.sleep(120)'"
    )
    assert client.call("t", "terminal_open", {"command": stuck, "wait_for": "raw"}).ok
    r = send(client, {"keys": "x" * 200_000, "quiet_s": 0})
    assert not r.ok and r.error_code == "timeout" and "reads no input" in (r.error or ""), r
    assert client.call("t", "terminal_read", {"quiet_s": 0}).ok
    assert client.call("t", "terminal_close", {}).ok
    assert client.call("t", "bash", {"command": "true"}).ok
