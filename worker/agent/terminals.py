"""Terminals: programs on a pseudo-terminal, driven by keystrokes.

The agent runs the program on a pty and keeps what it prints, raw; the worker
renders those bytes with a terminal emulator (the screen a user would see). A
reader thread drains the pty all the time, so a program never blocks on a full
terminal while nobody reads it."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

from .keys import keys_bytes
from .procs import (
    DRAIN_AFTER_EXIT_S,
    POLL_S,
    SHELL,
    base_env,
    descendants,
    kill_group,
    proc_table,
    signal_pids,
)
from .protocol import ToolError, call_timeout

MAX_TERMINALS = 8
TERMINAL_BUFFER_BYTES = 4 * 1024 * 1024  # raw output kept between reads; older is dropped
TERMINAL_QUIET_S = 0.5  # default: return once the output has been quiet this long
TERMINAL_SEARCH_BYTES = 1024 * 1024  # a pattern is looked for in the last this many bytes
TERMINAL_STUCK_S = 5.0  # typing fails after this long without a byte taken
TERMINAL_TERM = "xterm-256color"
# Runs in the child after setsid: makes the pty its controlling terminal (job
# control, Ctrl-C as SIGINT, SIGWINCH), then execs the program.
TERMINAL_SHIM = (
    "import fcntl,os,sys,termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)
# What a pattern is matched against: the output without escape sequences and CRs.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[()*+][0-~]|\x1b[ -/]*[0-~]|\r"
)


class Terminal:
    """A program on a pseudo-terminal; its output is kept raw until the next read."""

    serial = 0

    def __init__(self, slot, name, rows, cols, command):
        self.name = name
        Terminal.serial += 1
        self.term_id = "%s-%d" % (name, Terminal.serial)
        self.rows, self.cols = rows, cols
        master, child = os.openpty()
        self.fd = master
        # Non-blocking: a write into a full input queue must not hang the slot's thread.
        os.set_blocking(master, False)
        self.set_size(rows, cols)
        env = base_env(slot)
        env["TERM"] = TERMINAL_TERM
        for var in ("COLUMNS", "LINES"):  # the pty's size says it (and changes)
            env.pop(var, None)
        program = [SHELL, "-i"] if not command else [SHELL, "-c", command]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", TERMINAL_SHIM, *program],
                cwd=slot.cwd,
                env=env,
                stdin=child,
                stdout=child,
                stderr=child,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            os.close(master)
            raise
        finally:
            os.close(child)
        self.cond = threading.Condition()
        self.pending = bytearray()  # output since the last read
        self.dropped = 0  # bytes of it dropped (over TERMINAL_BUFFER_BYTES)
        self.total = 0  # bytes ever read
        self.last_output = time.monotonic()
        self.eof = False
        self.closed = False
        self.thread = threading.Thread(target=self._pump, name="term-" + name, daemon=True)
        self.thread.start()

    def set_size(self, rows, cols):
        """Set the pty's window size (the kernel sends SIGWINCH to its foreground group)."""
        self.rows, self.cols = rows, cols
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _pump(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self.closed:
            if not poller.poll(200):
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:  # woken, nothing to read after all
                continue
            except OSError:  # EIO: every holder of the pty's other end is gone
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.pending += data
                self.total += len(data)
                over = len(self.pending) - TERMINAL_BUFFER_BYTES
                if over > 0:
                    del self.pending[:over]
                    self.dropped += over
                self.last_output = time.monotonic()
                self.cond.notify_all()

    def alive(self):
        return not self.closed and self.proc.poll() is None

    def send(self, data):
        """Type ``data``; a program that reads nothing fills the pty's input (about 4 KiB)."""
        view = memoryview(data)
        poller = select.poll()  # not select(): an agent may hold fds past FD_SETSIZE
        poller.register(self.fd, select.POLLOUT)
        deadline = time.monotonic() + TERMINAL_STUCK_S
        while view:
            if not self.alive():
                raise ToolError("invalid_args", "terminal %r has ended" % self.name)
            written = 0
            if poller.poll(100):
                try:
                    written = os.write(self.fd, view[:4096])
                except BlockingIOError:  # the input queue is full
                    pass
                view = view[written:]
            if written:
                deadline = time.monotonic() + TERMINAL_STUCK_S
            elif time.monotonic() > deadline:
                raise ToolError("timeout", "the program in terminal %r reads no input" % self.name)

    def wait(self, since_total, quiet_s, pattern, deadline):
        """Wait for ``pattern`` in the output after ``since_total`` (or, without one, for
        ``quiet_s`` without output), the program's end, or ``deadline``.
        Returns (why, matched text): why is pattern | quiet | exited | timeout."""
        started = time.monotonic()
        with self.cond:
            while True:
                if pattern is not None:
                    found = self._search(pattern, since_total)
                    if found is not None:
                        return "pattern", found
                if not self.alive() and (self.eof or self.proc.poll() is not None):
                    self._drain_after_exit()
                    return "exited", None
                now = time.monotonic()
                quiet_since = max(self.last_output, started)
                if pattern is None and quiet_s is not None and now - quiet_since >= quiet_s:
                    return "quiet", None
                if now >= deadline:
                    return "timeout", None
                left = deadline - now
                if pattern is None and quiet_s is not None:
                    left = min(left, quiet_since + quiet_s - now)
                self.cond.wait(max(min(left, POLL_S * 4), 0.005))

    def _drain_after_exit(self):
        # Output written just before the exit may still be in the pty.
        end = time.monotonic() + DRAIN_AFTER_EXIT_S * 2
        while not self.eof and time.monotonic() < end:
            self.cond.wait(DRAIN_AFTER_EXIT_S)

    def _search(self, pattern, since_total):
        new = len(self.pending) - max(self.total - since_total, 0)
        window = bytes(self.pending[max(new, 0, len(self.pending) - TERMINAL_SEARCH_BYTES) :])
        text = ESCAPES.sub("", window.decode("utf-8", "replace"))
        match = pattern.search(text)
        return None if match is None else match.group(0)

    def take(self):
        """The output since the last read, and how many bytes of it were dropped."""
        with self.cond:
            data, dropped = bytes(self.pending), self.dropped
            self.pending = bytearray()
            self.dropped = 0
        return data, dropped

    def exit_code(self):
        code = self.proc.poll()
        return code

    def kill(self):
        """Kill the program and everything it started (any thread; idempotent)."""
        signal_pids(descendants(proc_table(), self.proc.pid), signal.SIGKILL)
        kill_group(self.proc.pid, signal.SIGKILL)

    def close(self):
        self.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(1.0)
        try:
            os.close(self.fd)
        except OSError:
            pass


def close_terminals(slot):
    """End the slot's terminals (cancel, drop, agent exit)."""
    terminals = list(slot.terminals.values())
    slot.terminals.clear()
    for term in terminals:
        term.kill()
    for term in terminals:
        term.close()


def find_terminal(slot, args):
    name = args.get("terminal") or "default"
    term = slot.terminals.get(name)
    if term is None:
        raise ToolError("not_found", "no terminal %r: open it with terminal_open" % name)
    return term


def terminal_reply(term, req, args, waited, matched, since_total, keys_sent=0):
    """The reply: the raw output since the last read as the blob, for the worker's emulator."""
    data, dropped = term.take()
    code = term.exit_code()
    info = {
        "terminal": term.name,
        "term_id": term.term_id,
        "rows": term.rows,
        "cols": term.cols,
        "alive": term.alive(),
        "exit_code": code,
        "waited": waited,
        "matched": matched,
        "raw_bytes": len(data),
        "dropped_bytes": dropped,
        "pid": term.proc.pid,
    }
    reply = {"ok": True, "blob": data, "data": info, "exit_code": code}
    if waited == "timeout" and args.get("wait_for") is not None:
        timeout_s = call_timeout(req, args)
        reply.update(ok=False, timed_out=True, error_code="timeout")
        reply["error"] = "pattern %r did not appear within %gs" % (args["wait_for"], timeout_s)
    return reply


def wait_args(term, req, args, since_total):
    """Wait as the call asks (see ``Terminal.wait``), at most the call's timeout."""
    pattern = args.get("wait_for")
    if pattern is not None:
        try:
            pattern = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ValueError("wait_for is not a regular expression: %s" % exc) from None
    quiet_s = args.get("quiet_s", TERMINAL_QUIET_S)
    deadline = time.monotonic() + call_timeout(req, args)
    if pattern is None and not quiet_s:
        return "now", None
    return term.wait(since_total, quiet_s, pattern, deadline)


def tool_terminal_open(slot, args, req):
    """Open (or restart) a terminal; an open one is resized to the size asked."""
    name = args.get("terminal") or "default"
    rows, cols = int(args.get("rows", 24)), int(args.get("cols", 80))
    if not (2 <= rows <= 1000 and 2 <= cols <= 1000):
        raise ValueError("rows and cols must be between 2 and 1000")
    term = slot.terminals.get(name)
    if term is not None and (args.get("restart") or not term.alive()):
        del slot.terminals[name]
        term.close()
        term = None
    created = term is None
    if created:
        if len(slot.terminals) >= MAX_TERMINALS:
            raise ToolError(
                "limit_exceeded",
                "at most %d terminals per slot (open: %s)"
                % (MAX_TERMINALS, ", ".join(sorted(slot.terminals))),
            )
        term = slot.terminals[name] = Terminal(slot, name, rows, cols, args.get("command"))
    elif (rows, cols) != (term.rows, term.cols):
        term.set_size(rows, cols)
    since = term.total if not created else 0
    waited, matched = wait_args(term, req, args, since)
    reply = terminal_reply(term, req, args, waited, matched, since)
    reply["data"]["created"] = created
    return reply


def tool_terminal_send(slot, args, req):
    """Type keys into a terminal, then wait (quiet output, a pattern) and read it."""
    term = find_terminal(slot, args)
    data = keys_bytes(args.get("keys", []), args.get("literal"), args.get("app_cursor"))
    since = term.total
    term.send(data)
    waited, matched = wait_args(term, req, args, since)
    return terminal_reply(term, req, args, waited, matched, since, len(data))


def tool_terminal_read(slot, args, req):
    """Wait (quiet output, a pattern) and read a terminal, typing nothing."""
    term = find_terminal(slot, args)
    since = term.total - len(term.pending)  # unread output counts for the pattern
    waited, matched = wait_args(term, req, args, since)
    return terminal_reply(term, req, args, waited, matched, since)


def tool_terminal_close(slot, args, req):
    """End a terminal's program (and what it started); the reply has its last output."""
    term = find_terminal(slot, args)
    del slot.terminals[term.name]
    term.kill()
    term.close()
    reply = terminal_reply(term, req, args, "exited", None, term.total)
    reply["data"]["alive"] = False
    return reply


TERMINAL_TOOLS = {
    "terminal_open": tool_terminal_open,
    "terminal_send": tool_terminal_send,
    "terminal_read": tool_terminal_read,
    "terminal_close": tool_terminal_close,
}
