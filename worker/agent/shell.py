"""Commands: ``bash`` (a fresh shell per call) and ``shell`` (persistent interactive
sessions whose cwd, env and functions survive between calls)."""

from __future__ import annotations

import binascii
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from .background import start_bg
from .procs import (
    DRAIN_AFTER_EXIT_S,
    POLL_S,
    SHELL,
    Capture,
    base_env,
    descendants,
    ignores_sigint,
    kill_group,
    proc_table,
    process_reply,
    run_process,
    signal_pids,
)
from .protocol import ToolError, call_timeout, max_output_of


def tool_bash(slot, args, req):
    """Run a command in a fresh shell in the workspace (``background``: as a bg task)."""
    command = args["command"]
    if not isinstance(command, str):
        raise TypeError("command must be a string")
    if args.get("background"):
        return start_bg(slot, command, None, req)
    code, capture, timed_out = run_process(
        slot, [SHELL, "-c", command], call_timeout(req, args), max_output_of(req)
    )
    return process_reply(code, capture, timed_out, call_timeout(req, args))


SHELL_START_S = 10.0
# After SIGINT (then after SIGKILL of the stragglers), how long the session
# gets to come back to its prompt before it is killed and replaced.
INTERRUPT_GRACE_S = 1.0
MAX_SHELL_SESSIONS = 8
# Interactive (-i) so that SIGINT aborts the whole command line like Ctrl-C in a
# terminal and the shell survives; no readline, history, prompts or mail checks.
SHELL_SETUP = "unset HISTFILE MAILCHECK PROMPT_COMMAND; PS1=''; PS2=''; PS0=''; set +o history +H\n"


def shell_session_argv():
    if os.path.basename(SHELL) == "bash":
        return [SHELL, "--noprofile", "--norc", "--noediting", "-i"]
    return [SHELL, "-i"]


class ShellSession:
    """A persistent interactive shell over pipes: cwd, env, functions survive calls.

    Each command is written to a file and sourced (``. file </dev/null``), so a
    syntax error cannot desynchronise the session and commands cannot read the
    session's own input; a marker line with ``$?`` ends its output.
    """

    def __init__(self, slot, name):
        self.name = name
        self.lock = threading.Lock()  # one command at a time; close waits for it
        self.killed = False
        self.dir = tempfile.mkdtemp(prefix="toolq-shell-")
        self.script = os.path.join(self.dir, "command")
        self.token = "__toolq_%s" % binascii.hexlify(os.urandom(8)).decode("ascii")
        self.seq = 0
        env = base_env(slot)
        env.update(PS1="", PS2="")
        try:
            self.proc = subprocess.Popen(
                shell_session_argv(),
                cwd=slot.cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.fd = self.proc.stdout.fileno()
        # The shell's start-up chatter ("no job control in this shell") is discarded.
        code, _capture, _timed_out = self.run(SHELL_SETUP, SHELL_START_S, 4096)
        if code != 0:
            self.close()
            raise ToolError("tool_error", "the shell session did not start (status %s)" % code)

    def alive(self):
        return not self.killed and self.proc.poll() is None

    def cwd(self):
        try:
            return os.readlink("/proc/%d/cwd" % self.proc.pid)
        except OSError:
            return None

    def run(self, command, timeout_s, max_output):
        """Run ``command``; returns (exit_code, capture, timed_out).

        On timeout: SIGINT to the session's process group (the shell aborts the
        command line, ``cmd &`` jobs ignore it), then SIGKILL of the shell's
        descendants that do not ignore SIGINT, then the session is killed.
        """
        with self.lock:
            capture = Capture(max_output)
            self._discard_pending()
            self.seq += 1
            marker = "%s_%d" % (self.token, self.seq)
            with open(self.script, "wb") as fh:
                fh.write(command.encode("utf-8", "surrogateescape"))
            line = ". %s </dev/null\nprintf '\\n%s %%d\\n' \"$?\"\n" % (
                shlex.quote(self.script),
                marker,
            )
            try:
                self.proc.stdin.write(line.encode("utf-8", "surrogateescape"))
                self.proc.stdin.flush()
            except OSError:
                self.kill()
                return self._ended(capture, False)
            reader = MarkerReader(self, marker, capture)
            state = reader.read_until(time.monotonic() + timeout_s)
            timed_out = state == "deadline"
            if timed_out:
                state = self._interrupt(reader)
            if state == "marker":
                return reader.code, capture, timed_out
            self.kill()  # it exited, or it would not come back to its prompt
            return self._ended(capture, timed_out)

    def _ended(self, capture, timed_out):
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = -signal.SIGKILL
        return code, capture, timed_out

    def _interrupt(self, reader):
        kill_group(self.proc.pid, signal.SIGINT)
        state = reader.read_until(time.monotonic() + INTERRUPT_GRACE_S)
        if state != "deadline":
            return state
        stragglers = [
            pid for pid in descendants(proc_table(), self.proc.pid) if not ignores_sigint(pid)
        ]
        signal_pids(stragglers, signal.SIGKILL)
        return reader.read_until(time.monotonic() + INTERRUPT_GRACE_S)

    def _discard_pending(self):
        """Drop what background jobs printed since the last command ended."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while poller.poll(0):
            if not os.read(self.fd, 262144):
                return

    def kill(self):
        """Kill the shell and everything it started (any thread; idempotent)."""
        self.killed = True
        signal_pids(descendants(proc_table(), self.proc.pid), signal.SIGKILL)
        kill_group(self.proc.pid, signal.SIGKILL)

    def close(self):
        """Kill, reap, and free the pipes and the command file (waits for a running call)."""
        self.kill()
        with self.lock:
            self._ended(None, False)
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            shutil.rmtree(self.dir, ignore_errors=True)


class MarkerReader:
    """Feeds a session's output into a Capture until the command's marker line."""

    def __init__(self, session, marker, capture):
        self.session = session
        self.marker = b"\n" + marker.encode("ascii") + b" "
        self.capture = capture
        self.hold = b""  # bytes that may be the start of the marker
        self.code = None
        self.exited_at = None

    def read_until(self, deadline):
        """``"marker"`` (``self.code`` set), ``"eof"`` (the shell is gone) or ``"deadline"``."""
        poller = select.poll()
        poller.register(self.session.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            if self._scan():
                return "marker"
            now = time.monotonic()
            if self.session.killed or self._gone(now):
                self._flush()
                return "eof"
            if now >= deadline:
                return "deadline"
            if not poller.poll(min(deadline - now, POLL_S) * 1000.0):
                continue
            data = os.read(self.session.fd, 262144)
            if not data:
                self._flush()
                return "eof"
            self.hold += data

    def _gone(self, now):
        # The shell exited but a background job holds the pipe open: no EOF comes.
        if self.exited_at is None and self.session.proc.poll() is not None:
            self.exited_at = now
        return self.exited_at is not None and now - self.exited_at > DRAIN_AFTER_EXIT_S

    def _scan(self):
        idx = self.hold.find(self.marker)
        if idx < 0:
            keep = len(self.marker) - 1
            if len(self.hold) > keep:
                self.capture.add(self.hold[:-keep])
                self.hold = self.hold[-keep:]
            return False
        end = self.hold.find(b"\n", idx + len(self.marker))
        self.capture.add(self.hold[:idx])
        self.hold = self.hold[idx:]
        if end < 0:
            return False
        try:
            self.code = int(self.hold[len(self.marker) : end - idx])
        except ValueError:
            self.code = -1
        self.hold = b""  # anything after the marker is a background job's, not ours
        return True

    def _flush(self):
        self.capture.add(self.hold)
        self.hold = b""


def tool_shell(slot, args, req):
    """Run a command in the slot's persistent shell session ``session``."""
    command = args["command"]
    if not isinstance(command, str):
        raise TypeError("command must be a string")
    name = args.get("session") or "default"
    timeout_s = call_timeout(req, args)
    session = slot.shells.get(name)
    restarted = False
    if session is not None and (args.get("restart") or not session.alive()):
        session.close()
        del slot.shells[name]
        session, restarted = None, True
    if session is None:
        if len(slot.shells) >= MAX_SHELL_SESSIONS:
            raise ToolError(
                "limit_exceeded",
                "at most %d shell sessions per slot (open: %s)"
                % (MAX_SHELL_SESSIONS, ", ".join(sorted(slot.shells))),
            )
        session = slot.shells[name] = ShellSession(slot, name)
    code, capture, timed_out = session.run(command, timeout_s, max_output_of(req))
    reply = process_reply(code, capture, timed_out, timeout_s)
    reply["data"] = {"session": name, "restarted": restarted, "cwd": session.cwd()}
    if not session.alive():
        reply["data"]["session_ended"] = True  # the next call starts a fresh one
    return reply
