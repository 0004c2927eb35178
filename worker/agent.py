#!/usr/bin/env python3
"""toolq in-sandbox agent: one long-lived process per sandbox.

Stdlib only, Python >= 3.8: this file is copied as is into containers (and run
as a subprocess by the local backend), so every backend has the same tool
semantics.

Protocol (JSON lines on stdin/stdout):

- worker -> agent: one line per frame, a JSON array of requests
  ``{"id", "op", "slot", ...}`` with ``op`` in ``init | call | cancel | drop |
  ping``. ``call`` requests of one slot run in order; different slots run
  concurrently; ``cancel``/``drop``/``ping`` act at once.
- agent -> worker: one JSON object per line: ``{"id": ..., ...reply}`` for a
  request, or ``{"event": ..., ...}`` for unsolicited news (background tasks).
- either way, a message with ``"blob": N`` is followed by N raw bytes (right
  after its line; after a frame's line, the blobs of its requests in order):
  how snapshots move without base64 or JSON escaping.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import queue
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
import zlib

AGENT_VERSION = "1"
DEFAULT_MAX_OUTPUT = 65536
POLL_S = 0.05
# After the command's main process exits, leftovers (``cmd &``) may hold the
# output pipe open; stop reading after this long instead of waiting for them.
DRAIN_AFTER_EXIT_S = 0.05
KILL_GRACE_S = 2.0
MAX_FILE_BYTES = 64 * 1024 * 1024

_write_lock = threading.Lock()
_out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout


def emit(message):
    """Write one reply or event line (thread-safe). A reply's ``blob`` (bytes) goes
    raw right after its line, which says its length: no base64, no JSON escaping."""
    blob = message.pop("blob", None)
    if blob is not None:
        message["blob"] = len(blob)
    # ASCII JSON never fails to encode, whatever a tool produced.
    line = json.dumps(message, separators=(",", ":")) + "\n"
    data = line.encode("utf-8", "surrogateescape")
    with _write_lock:
        _write_all(data)
        if blob is not None:
            _write_all(blob)
        _out.flush()


def _write_all(data):
    """Write every byte of ``data`` to the worker. Under ``python3 -u`` stdout is a raw
    FileIO, whose write may be short: gVisor writes at most 64 KiB per call to the
    exec's pipe (Linux's blocking pipes never return short), and a dropped rest
    would corrupt the stream."""
    view = memoryview(data)
    while view:
        written = _out.write(view)
        if written is None:  # a non-blocking stdout, full: wait until it drains
            select.select([], [_out], [])
            continue
        view = view[written:]


class ToolError(Exception):
    """A tool failed in an expected way; becomes an error result."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------
# output capture: keep head and tail, count everything
# --------------------------------------------------------------------------


class Capture:
    """Keeps the first and last ``cap/2`` bytes of a stream and its total size."""

    def __init__(self, cap):
        self.half = max(cap // 2, 64)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data):
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    @property
    def truncated(self):
        return self.total > len(self.head) + len(self.tail)

    def text(self):
        head = self.head.decode("utf-8", "replace")
        if not self.tail:
            return head
        tail = self.tail.decode("utf-8", "replace")
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self.tail)
        return "%s\n[... %d bytes omitted ...]\n%s" % (head, omitted, tail)


# --------------------------------------------------------------------------
# slots
# --------------------------------------------------------------------------


class Slot:
    """One workspace: a root directory, an env, and a queue of calls run in order."""

    def __init__(self, name, root, env, workdir):
        self.name = name
        self.root = os.path.realpath(root)
        self.env = env
        self.cwd = self.root
        if workdir:
            self.cwd = resolve_path(self, workdir)
        self.queue = queue.Queue()
        self.procs = set()
        # Process groups of finished calls: `cmd &` leftovers live on in them
        # until the slot is cancelled or dropped.
        self.groups = set()
        self.lock = threading.Lock()
        self.generation = 0  # bumped by cancel: queued calls of older generations are dropped
        self.shells = {}  # session name -> ShellSession
        self.bg = {}  # task id -> BgTask, oldest first
        self.bg_seq = 0
        self.edit_history = {}  # path -> previous contents, for the editor's undo_edit
        self.terminals = {}  # terminal name -> Terminal (see "terminals" below)
        self.thread = threading.Thread(target=self._run, name="slot-" + name, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            req = self.queue.get()
            if req is None:
                return
            if req.get("_gen", 0) != self.generation:
                emit(cancelled_reply(req))
                continue
            emit(run_call(self, req))

    def track(self, proc):
        with self.lock:
            self.procs.add(proc)
            self.groups.add(proc.pid)  # start_new_session: its pid is its group id
            if len(self.groups) > 256:  # forget groups with no process left
                self.groups = set(g for g in self.groups if group_alive(g))

    def untrack(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def kill_all(self):
        """Kill every process group this slot's calls started, running or left over."""
        with self.lock:
            groups = set(self.groups) | set(p.pid for p in self.procs)
            self.groups = set()
        for pgid in groups:
            kill_group(pgid, signal.SIGKILL)


SLOTS = {}


def base_env(slot):
    env = dict(os.environ)
    env.pop("TOOLQ_AGENT", None)
    env.update(slot.env)
    env["PWD"] = slot.cwd
    env.setdefault("HOME", slot.root)
    return env


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cancelled_reply(req):
    return error_reply(req, "cancelled", "call cancelled")


def error_reply(req, code, message, **extra):
    reply = {"id": req.get("id"), "ok": False, "error_code": code, "error": message}
    reply.update(extra)
    return reply


# --------------------------------------------------------------------------
# request handling
# --------------------------------------------------------------------------


def handle(req):
    """Dispatch one request; calls go to their slot's queue."""
    op = req.get("op")
    if op == "call":
        slot = SLOTS.get(req.get("slot"))
        if slot is None:
            emit(error_reply(req, "sandbox_error", "unknown slot %r" % req.get("slot")))
            return
        req["_gen"] = slot.generation
        slot.queue.put(req)
    elif op == "init":
        emit(op_init(req))
    elif op == "cancel":
        emit(op_cancel(req))
    elif op == "drop":
        emit(op_drop(req))
    elif op == "ping":
        emit({"id": req.get("id"), "ok": True, "version": AGENT_VERSION, "pid": os.getpid()})
    else:
        emit(error_reply(req, "bad_request", "unknown op %r" % op))


def op_init(req):
    name = req.get("slot")
    root = req.get("root")
    try:
        os.makedirs(root, exist_ok=True)
        old = SLOTS.pop(name, None)
        if old is not None:
            old.queue.put(None)
        SLOTS[name] = Slot(name, root, req.get("env") or {}, req.get("workdir"))
        if req.get("workdir"):
            os.makedirs(SLOTS[name].cwd, exist_ok=True)
    except (OSError, ToolError, ValueError, TypeError) as exc:
        SLOTS.pop(name, None)
        return error_reply(req, "sandbox_error", "cannot create workspace: %s" % exc)
    return {"id": req.get("id"), "ok": True, "root": SLOTS[name].root}


def op_cancel(req):
    slot = SLOTS.get(req.get("slot"))
    if slot is None:
        return {"id": req.get("id"), "ok": True}
    slot.generation += 1
    slot.kill_all()
    stop_slot_tasks(slot)
    return {"id": req.get("id"), "ok": True}


def op_drop(req):
    slot = SLOTS.pop(req.get("slot"), None)
    if slot is None:
        return {"id": req.get("id"), "ok": True}
    slot.generation += 1
    slot.kill_all()
    stop_slot_tasks(slot)
    slot.queue.put(None)
    if req.get("delete", True):
        shutil.rmtree(slot.root, ignore_errors=True)
    return {"id": req.get("id"), "ok": True}


def run_call(slot, req):
    started = time.monotonic()
    started_at_ms = round(time.time() * 1000.0, 3)  # the result's stages (wall clock)
    tool = req.get("tool")
    start_by_ms = req.get("start_by_ms")
    if start_by_ms is not None and time.time() * 1000.0 > float(start_by_ms):
        # The worker's lease on this trajectory ran out before the call could
        # start (it stalled): another worker may own it now. Not run.
        return error_reply(req, "not_started", "the worker's lease ran out before the call started")
    fn = TOOLS.get(tool)
    if fn is None:
        reply = error_reply(req, "unknown_tool", "unknown tool %r" % tool)
    else:
        try:
            reply = fn(slot, req.get("args") or {}, req)
            reply["id"] = req.get("id")
            reply.setdefault("ok", True)
        except ToolError as exc:
            reply = error_reply(req, exc.code, exc.message)
        except (KeyError, TypeError, ValueError) as exc:
            reply = error_reply(req, "invalid_args", "bad arguments for %s: %s" % (tool, exc))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                message = "no space left in the workspace: its size cap (disk_mb) is reached"
                reply = error_reply(req, "limit_exceeded", message)
            else:
                reply = error_reply(req, "io_error", "%s: %s" % (type(exc).__name__, exc))
        except Exception as exc:  # a tool bug must not kill the agent
            reply = error_reply(req, "tool_error", "%s: %s" % (type(exc).__name__, exc))
    reply["run_ms"] = round((time.monotonic() - started) * 1000.0, 3)
    reply["started_at_ms"] = started_at_ms
    reply["ended_at_ms"] = round(time.time() * 1000.0, 3)
    return reply


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------


def resolve_path(slot, path):
    """Resolve ``path`` inside the slot's workspace; refuse anything that escapes."""
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    if "\x00" in path:
        raise ValueError("path contains a NUL byte")
    joined = os.path.join(slot.cwd if not os.path.isabs(path) else "/", path)
    real = os.path.realpath(joined)
    if real != slot.root and not real.startswith(slot.root + os.sep):
        raise ToolError(
            "path_outside_workspace", "path %r is outside the workspace %s" % (path, slot.root)
        )
    return real


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def shell_path():
    for candidate in ("/bin/bash", "/usr/bin/bash", "/bin/sh"):
        if os.path.exists(candidate):
            return candidate
    return "/bin/sh"


SHELL = shell_path()


def run_process(slot, argv, timeout_s, max_output, stdin_data=None):
    """Run ``argv`` in its own process group; capture merged output with a cap.

    Returns (exit_code, capture, timed_out). On timeout the whole process group
    is killed and the partial output is returned.
    """
    proc = subprocess.Popen(
        argv,
        cwd=slot.cwd,
        env=base_env(slot),
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    slot.track(proc)
    try:
        if stdin_data is not None:
            feed_stdin(proc, stdin_data)
        capture, timed_out = pump_output(proc, timeout_s, max_output)
        if timed_out:
            kill_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
    finally:
        slot.untrack(proc)
        proc.stdout.close()
    return code, capture, timed_out


def feed_stdin(proc, data):
    def write():
        try:
            proc.stdin.write(data)
        except OSError:
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    threading.Thread(target=write, daemon=True).start()


def pump_output(proc, timeout_s, max_output):
    capture = Capture(max_output)
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    exited_at = None
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        now = time.monotonic()
        if now >= deadline:
            return capture, True
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT_S:
            return capture, False
        wait_s = min(deadline - now, POLL_S if exited_at is None else DRAIN_AFTER_EXIT_S)
        if not poller.poll(max(wait_s, 0.001) * 1000.0):
            continue
        data = os.read(fd, 262144)
        if not data:
            return capture, False
        capture.add(data)


def call_timeout(req, args):
    """The call's timeout: the worker's (which already weighed the call's own
    ``timeout_s`` against every cap), never longer."""
    asked = [float(t) for t in (req.get("timeout_s"), args.get("timeout_s")) if t is not None]
    timeout = min(asked) if asked else 60.0
    if timeout <= 0:
        raise ValueError("timeout_s must be > 0")
    return timeout


def max_output_of(req):
    return int(req.get("max_output_bytes") or DEFAULT_MAX_OUTPUT)


# --------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------


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


def process_reply(code, capture, timed_out, timeout_s):
    reply = {
        "ok": code == 0 and not timed_out,
        "output": capture.text(),
        "exit_code": code,
        "truncated": capture.truncated,
        "output_bytes": capture.total,
        "timed_out": timed_out,
    }
    if timed_out:
        reply["error_code"] = "timeout"
        reply["error"] = "command timed out after %gs; partial output returned" % timeout_s
    elif code != 0:
        reply["error_code"] = "exit_status"
        reply["error"] = describe_exit(code)
    return reply


def describe_exit(code):
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return "command killed by signal %s" % name
    if code == 137:
        return "command exited with status 137 (killed: SIGKILL, often out of memory)"
    return "command exited with status %d" % code


def tool_read_file(slot, args, req):
    """Read a file (text or base64), optionally a byte range, optionally its sha256."""
    path = resolve_path(slot, args["path"])
    offset = int(args.get("offset", 0))
    limit = args.get("limit")
    encoding = args.get("encoding", "text")
    if encoding not in ("text", "base64"):
        raise ValueError("encoding must be 'text' or 'base64'")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    if not os.path.exists(path):
        raise ToolError("not_found", "no such file: %s" % args["path"])
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % args["path"])
    size = os.path.getsize(path)
    cap = max_output_of(req) if encoding == "text" else MAX_FILE_BYTES
    want = cap if limit is None else min(int(limit), cap)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(want)
    data_out = {"size": size, "offset": offset, "length": len(data), "encoding": encoding}
    if args.get("sha256"):
        data_out["sha256"] = file_sha256(path)
    text = (
        data.decode("utf-8", "replace")
        if encoding == "text"
        else base64.b64encode(data).decode("ascii")
    )
    # Cut short by the cap: fewer bytes than asked for, although more remain.
    truncated = offset + len(data) < size and (limit is None or len(data) < int(limit))
    return {"output": text, "output_bytes": size, "truncated": truncated, "data": data_out}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_write_file(slot, args, req):
    """Write (or append) text or base64 content; parent directories are created."""
    path = resolve_path(slot, args["path"])
    content = args["content"]
    if not isinstance(content, str):
        raise TypeError("content must be a string")
    encoding = args.get("encoding", "text")
    if encoding == "text":
        data = content.encode("utf-8")
    elif encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError as exc:
            raise ValueError("content is not valid base64: %s" % exc) from None
    else:
        raise ValueError("encoding must be 'text' or 'base64'")
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % args["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab" if args.get("append") else "wb") as fh:
        fh.write(data)
    if "mode" in args:
        os.chmod(path, int(str(args["mode"]), 8))
    rel = os.path.relpath(path, slot.root)
    return {"output": "wrote %d bytes to %s" % (len(data), rel), "data": {"bytes": len(data)}}


# --------------------------------------------------------------------------
# process trees (Linux /proc): what a timeout or a stop must reach
# --------------------------------------------------------------------------


def proc_table():
    """Every visible process: ``{pid: (ppid, pgid, state, start_ticks)}``; {} without /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as fh:
                raw = fh.read()
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = raw[raw.rfind(b")") + 2 :].split()
            table[int(name)] = (
                int(fields[1]),
                int(fields[2]),
                fields[0].decode("ascii", "replace"),
                int(fields[19]),
            )
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(table, root_pid):
    """Pids below ``root_pid`` in ``table`` (children, grandchildren, ...)."""
    children = {}
    for pid, info in table.items():
        children.setdefault(info[0], []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def signal_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def ignores_sigint(pid):
    """True if ``pid`` ignores SIGINT (how bash starts ``cmd &`` without job control)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def now_ms():
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# shell: persistent interactive bash sessions
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# background tasks: state and output go to the worker as "bg" events
# --------------------------------------------------------------------------

BG_EVENT_INTERVAL_S = 0.5  # at most this often while a task's output grows
BG_TAIL_BYTES = 8192  # per stream, in each event (the Redis hash's tails)
BG_POLL_S = 0.2
BG_DRAIN_S = 0.2  # after the task's shell exits, leftovers may hold its pipes
DROP_GRACE_S = 0.5  # SIGTERM -> SIGKILL when a trajectory ends (blocks the agent)
MAX_BG_RUNNING = 32
MAX_BG_KEPT = 100  # ended tasks beyond this are forgotten (their hash stays in Redis)
BG_FINAL = ("completed", "failed", "stopped")


def safe_emit(message):
    try:
        emit(message)
    except (OSError, ValueError):  # the worker went away; nobody to tell
        pass


def capture_tail(capture, limit):
    """The last ``limit`` bytes a Capture saw (as far as it kept them)."""
    kept = bytes(capture.tail) if capture.truncated else bytes(capture.head + capture.tail)
    return kept[-limit:]


class BgTask:
    """A command running in its own process group, reporting as it goes."""

    def __init__(self, slot, task_id, command, name, max_output):
        self.slot_name = slot.name
        self.id = task_id
        self.command = command
        self.name = name or ""
        self.out = Capture(max_output)
        self.err = Capture(max_output)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.status = "running"
        self.exit_code = None
        self.stop_requested = False
        self.started_ms = now_ms()
        self.started = time.monotonic()
        self.ended_ms = None
        self.ended = None
        self.proc = subprocess.Popen(
            [SHELL, "-c", command],
            cwd=slot.cwd,
            env=base_env(slot),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.report()  # before bg_start's reply: the hash exists once the id is known
        threading.Thread(target=self._pump, name="bg-" + task_id, daemon=True).start()

    def duration_s(self):
        return round((self.ended or time.monotonic()) - self.started, 3)

    def state(self):
        """The task as the worker writes it to Redis (schemas.BgTask fields)."""
        out_tail = capture_tail(self.out, BG_TAIL_BYTES)
        err_tail = capture_tail(self.err, BG_TAIL_BYTES)
        return {
            "task_id": self.id,
            "name": self.name,
            "command": self.command,
            "status": self.status,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
            "stdout_tail": out_tail.decode("utf-8", "replace"),
            "stderr_tail": err_tail.decode("utf-8", "replace"),
            "stdout_bytes": self.out.total,
            "stderr_bytes": self.err.total,
            "truncated": self.out.total > len(out_tail) or self.err.total > len(err_tail),
        }

    def report(self):
        with self.lock:
            safe_emit({"event": "bg", "slot": self.slot_name, "task": self.state()})

    def _pump(self):
        streams = {self.proc.stdout.fileno(): self.out, self.proc.stderr.fileno(): self.err}
        poller = select.poll()
        for fd in streams:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        last_report, dirty, exited_at = time.monotonic(), False, None
        while streams:
            now = time.monotonic()
            if exited_at is None and self.proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > BG_DRAIN_S:
                break
            if dirty and now - last_report >= BG_EVENT_INTERVAL_S:
                self.report()
                last_report, dirty = now, False
            for fd, _mask in poller.poll(BG_POLL_S * 1000.0):
                data = os.read(fd, 262144)
                if not data:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                with self.lock:
                    streams[fd].add(data)
                dirty = True
        self._finish(self.proc.wait())

    def _finish(self, code):
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        with self.lock:
            self.exit_code = code
            if self.stop_requested:  # a stopped task never reports completed
                self.status = "stopped"
            else:
                self.status = "completed" if code == 0 else "failed"
            self.ended_ms = now_ms()
            self.ended = time.monotonic()
        self.report()
        self.done.set()

    def request_stop(self):
        """Mark the task as being stopped; False if it has already ended."""
        with self.lock:
            if self.status != "running":
                return False
            self.stop_requested = True
            return True

    def processes(self, known):
        """Live processes of the task: its group, its descendants, and ``known`` ones
        (pid -> start ticks) still alive. ``None`` without /proc."""
        table = proc_table()
        if not table:
            return None
        found = {}
        for pid, (_ppid, pgid, state, start) in table.items():
            if state != "Z" and (pgid == self.pid or known.get(pid) == start):
                found[pid] = start
        for pid in descendants(table, self.pid):
            if table[pid][2] != "Z":
                found[pid] = table[pid][3]
        return found

    def signal_all(self, known, sig):
        """Signal the group and every known process; returns the processes still alive."""
        found = self.processes(known)
        kill_group(self.pid, sig)
        if found is None:  # no /proc: the process group is all we can reach
            return {self.pid: 0} if group_exists(self.pid) else {}
        signal_pids(found, sig)
        return found


def group_exists(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def task_alive(task, known):
    found = task.processes(known)
    return bool(found) if found is not None else not task.done.is_set()


def stop_tasks(tasks, force, grace_s):
    """Stop tasks together: SIGTERM (SIGKILL if ``force``), SIGKILL after ``grace_s``.

    Returns ``{task_id: "SIGTERM" | "SIGKILL" | None}`` (None: it had ended already).
    Waits for each stopped task to report its final state.
    """
    sent, known = {}, {}
    first = signal.SIGKILL if force else signal.SIGTERM
    for task in tasks:
        if task.request_stop():
            known[task.id] = task.signal_all({}, first)
            sent[task.id] = signal.Signals(first).name
        else:
            sent[task.id] = None
    deadline = time.monotonic() + (0 if force else grace_s)
    alive = [t for t in tasks if sent[t.id] and task_alive(t, known[t.id])]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        alive = [t for t in alive if task_alive(t, known[t.id])]
    for task in alive:
        known[task.id] = task.signal_all(known[task.id], signal.SIGKILL)
        sent[task.id] = "SIGKILL"
    for task in tasks:
        if sent[task.id]:
            task.done.wait(KILL_GRACE_S + BG_DRAIN_S)
    return sent


def new_task_id(slot):
    slot.bg_seq += 1
    return "bg%d-%s" % (slot.bg_seq, binascii.hexlify(os.urandom(2)).decode("ascii"))


def start_bg(slot, command, name, req):
    """Start a background task; the reply carries its id at once."""
    if not isinstance(command, str) or not command:
        raise ValueError("command must be a non-empty string")
    if name is not None and not isinstance(name, str):
        raise TypeError("name must be a string")
    running = [t for t in slot.bg.values() if t.status == "running"]
    if len(running) >= MAX_BG_RUNNING:
        raise ToolError(
            "limit_exceeded", "at most %d background tasks may run at once" % MAX_BG_RUNNING
        )
    forget_old_tasks(slot)
    task = BgTask(slot, new_task_id(slot), command, name, max_output_of(req))
    slot.bg[task.id] = task
    label = " (%s)" % task.name if task.name else ""
    return {
        "output": "started background task %s%s, pid %d" % (task.id, label, task.pid),
        "data": {"task_id": task.id, "pid": task.pid, "name": task.name},
    }


def forget_old_tasks(slot):
    ended = [t for t in slot.bg.values() if t.status != "running"]
    for task in ended[: max(0, len(slot.bg) - MAX_BG_KEPT + 1)]:
        del slot.bg[task.id]


def find_task(slot, args):
    task_id = args["task_id"]
    task = slot.bg.get(task_id)
    if task is None:
        raise ToolError("not_found", "no background task %r in this slot" % task_id)
    return task


def task_summary(task):
    return {
        "task_id": task.id,
        "name": task.name,
        "command": task.command,
        "status": task.status,
        "pid": task.pid,
        "exit_code": task.exit_code,
        "duration_s": task.duration_s(),
        "stdout_bytes": task.out.total,
        "stderr_bytes": task.err.total,
    }


def describe_task(task):
    if task.status == "running":
        return "%s is running (%.1fs)" % (task.id, task.duration_s())
    return "%s %s after %.1fs (exit code %s)" % (
        task.id,
        task.status,
        task.duration_s(),
        task.exit_code,
    )


def tool_bg_start(slot, args, req):
    """Start ``command`` in the background; returns ``data.task_id`` at once."""
    return start_bg(slot, args["command"], args.get("name"), req)


def tool_bg_list(slot, args, req):
    """The slot's background tasks with status and duration."""
    tasks = [task_summary(t) for t in slot.bg.values()]
    lines = [
        "%-12s %-9s %8.1fs  %s%s"
        % (
            t["task_id"],
            t["status"],
            t["duration_s"],
            "[%s] " % t["name"] if t["name"] else "",
            t["command"][:80],
        )
        for t in tasks
    ]
    return {"output": "\n".join(lines) or "no background tasks", "data": {"tasks": tasks}}


def tool_bg_output(slot, args, req):
    """A task's output so far; with ``block``, wait up to ``timeout_s`` for its end."""
    task = find_task(slot, args)
    if args.get("block"):
        task.done.wait(call_timeout(req, args))
    with task.lock:
        out, err = task.out.text(), task.err.text()
        summary = task_summary(task)
        truncated = task.out.truncated or task.err.truncated
    text = out
    if err:
        text += ("" if not out or out.endswith("\n") else "\n") + "--- stderr ---\n" + err
    if text and not text.endswith("\n"):
        text += "\n"
    text += "[%s]" % describe_task(task)
    summary["running"] = summary["status"] == "running"
    reply = {
        "output": text,
        "truncated": truncated,
        "output_bytes": summary["stdout_bytes"] + summary["stderr_bytes"],
        "data": summary,
    }
    if summary["exit_code"] is not None:
        reply["exit_code"] = summary["exit_code"]
    return reply


def tool_bg_stop(slot, args, req):
    """SIGTERM the task's process group (SIGKILL with ``force``), SIGKILL after a grace."""
    task = find_task(slot, args)
    sent = stop_tasks([task], bool(args.get("force")), KILL_GRACE_S)[task.id]
    summary = task_summary(task)
    summary["signal"] = sent
    summary["was_running"] = sent is not None
    if sent is None:
        text = "%s had already ended: %s" % (task.id, describe_task(task))
    else:
        text = "stopped %s with %s: %s" % (task.id, sent, describe_task(task))
    return {"output": text, "data": summary}


def stop_slot_tasks(slot):
    """Stop the slot's background tasks and shell sessions (cancel, drop, agent exit).

    Tasks get SIGTERM together and SIGKILL after DROP_GRACE_S. Returns once each
    has reported its final state, so the worker records it before the
    trajectory ends.
    """
    stop_tasks(list(slot.bg.values()), False, DROP_GRACE_S)
    shells = list(slot.shells.values())
    slot.shells.clear()
    for session in shells:
        session.kill()
    for session in shells:
        session.close()
    close_terminals(slot)


# --------------------------------------------------------------------------
# file tools: edit_file, list_files, archive, and the str_replace_editor
# --------------------------------------------------------------------------

MAX_EDIT_BYTES = 16 * 1024 * 1024
MAX_UNDO = 10
MAX_UNDO_BYTES = 1024 * 1024
DEFAULT_ARCHIVE_BYTES = 8 * 1024 * 1024
# An archive over its cap is still measured (without keeping it) up to this
# many times the cap, so the error can say how big it is.
ARCHIVE_MEASURE_FACTOR = 16
SNIPPET_LINES = 4
MAX_WALK_DEPTH = 64


def rel_path(slot, path):
    return clean(os.path.relpath(path, slot.root))


def clean(text):
    """Text safe to put in a reply: undecodable bytes (surrogates) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def split_lines(text):
    """(lines, ends_with_newline): the lines ``cat -n`` would number."""
    lines = text.split("\n")
    trailing = text.endswith("\n") or not text
    if trailing:
        lines.pop()
    return lines, trailing


def join_lines(lines, trailing):
    return "\n".join(lines) + ("\n" if trailing and lines else "")


def read_text(slot, path, shown):
    """A workspace file's text; bytes that are not UTF-8 survive a write back."""
    if not os.path.exists(path):
        raise ToolError("not_found", "no such file: %s" % shown)
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % shown)
    if os.path.getsize(path) > MAX_EDIT_BYTES:
        raise ToolError("io_error", "%s is larger than %d bytes" % (shown, MAX_EDIT_BYTES))
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", "surrogateescape")


def write_text(slot, path, text, before=None):
    """Write text (mode kept); remember ``before`` for undo_edit."""
    if before is not None and len(before) <= MAX_UNDO_BYTES:
        history = slot.edit_history.setdefault(path, [])
        history.append(before)
        del history[:-MAX_UNDO]
    with open(path, "wb") as fh:
        fh.write(text.encode("utf-8", "surrogateescape"))


def line_of(text, index):
    return text.count("\n", 0, index) + 1


def replace_text(text, old, new, count, replace_all, shown):
    """Exact replacement of ``old``; returns (new_text, replacements, first_line).

    ``old`` must occur exactly once, or exactly ``count`` times, or (with
    ``replace_all``) at least once.
    """
    if not isinstance(old, str) or not old:
        raise ValueError("old must be a non-empty string")
    if not isinstance(new, str):
        raise TypeError("new must be a string")
    found = text.count(old)
    if found == 0:
        raise ToolError("not_found", "the old text was not found in %s" % shown)
    expected = found if replace_all else (1 if count is None else int(count))
    if found != expected:
        lines, start = [], text.find(old)
        while start >= 0 and len(lines) < 10:
            lines.append(str(line_of(text, start)))
            start = text.find(old, start + 1)
        hint = (
            "add surrounding lines to make it unique, or pass count=%d" % found
            if count is None
            else "expected count=%d" % expected
        )
        raise ToolError(
            "invalid_args",
            "the old text occurs %d times in %s (lines %s); %s"
            % (found, shown, ", ".join(lines), hint),
        )
    return text.replace(old, new), found, line_of(text, text.find(old))


def tool_edit_file(slot, args, req):
    """Replace exact text in a file: ``old`` must match once (or ``count`` times)."""
    path = resolve_path(slot, args["path"])
    text = read_text(slot, path, args["path"])
    new_text, n, first = replace_text(
        text, args["old"], args["new"], args.get("count"), args.get("replace_all"), args["path"]
    )
    write_text(slot, path, new_text, before=text)
    return {
        "output": "edited %s: %d replacement%s (first at line %d)"
        % (rel_path(slot, path), n, "" if n == 1 else "s", first),
        "data": {
            "replacements": n,
            "line": first,
            "size": len(new_text.encode("utf-8", "surrogateescape")),
        },
    }


def entry_info(path, shown):
    st = os.lstat(path)
    if os.path.islink(path):
        kind = "symlink"
    elif os.path.isdir(path):
        kind = "dir"
    elif os.path.isfile(path):
        kind = "file"
    else:
        kind = "other"
    info = {
        "path": clean(shown),
        "type": kind,
        "size": st.st_size,
        "mtime_ms": int(st.st_mtime * 1000),
    }
    if kind == "symlink":
        try:
            info["target"] = clean(os.readlink(path))
        except OSError:
            pass
    return info


def walk_entries(top, max_depth, max_entries, hidden=True):
    """Sorted entries under ``top``, depth first, ``max_depth`` levels (1: ``top``'s own).

    Returns (entries, truncated, errors).
    """
    entries, errors = [], 0
    stack = [(top, "", 1)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            errors += 1
            continue
        subdirs = []
        for name in names:
            if not hidden and name.startswith("."):
                continue
            if len(entries) >= max_entries:
                return entries, True, errors
            full = os.path.join(directory, name)
            try:
                info = entry_info(full, prefix + name)
            except OSError:
                errors += 1
                continue
            entries.append(info)
            if depth < max_depth and info["type"] == "dir":
                subdirs.append((full, prefix + name + "/", depth + 1))
        stack.extend(reversed(subdirs))
    return entries, False, errors


def tool_list_files(slot, args, req):
    """List a directory (or ``recursive``ly a tree): type, size, mtime of each entry."""
    shown = args.get("path") or "."
    path = resolve_path(slot, shown)
    max_entries = int(args.get("max_entries") or 1000)
    if max_entries < 1:
        raise ValueError("max_entries must be >= 1")
    if not os.path.lexists(path):
        raise ToolError("not_found", "no such file or directory: %s" % shown)
    if os.path.isdir(path):
        depth = MAX_WALK_DEPTH if args.get("recursive") else 1
        entries, truncated, errors = walk_entries(path, depth, max_entries)
    else:
        entries, truncated, errors = [entry_info(path, os.path.basename(path))], False, 0
    lines = [
        "%-7s %10s  %s%s"
        % (
            e["type"],
            e["size"] if e["type"] == "file" else "-",
            e["path"],
            "/"
            if e["type"] == "dir"
            else (" -> " + e.get("target", "?") if e["type"] == "symlink" else ""),
        )
        for e in entries
    ]
    if truncated:
        lines.append("[listing truncated at max_entries=%d]" % max_entries)
    capture = Capture(max_output_of(req))
    capture.add("\n".join(lines).encode("utf-8", "surrogateescape"))
    data = {"path": rel_path(slot, path), "entries": entries, "truncated": truncated}
    if errors:
        data["unreadable"] = errors
    return {
        "output": capture.text(),
        "truncated": truncated or capture.truncated,
        "output_bytes": capture.total,
        "data": data,
    }


class ArchiveTooLarge(Exception):
    pass


class ArchiveSink(object):
    """Keeps the compressed bytes up to ``cap``; past it only counts, up to ``measure_cap``."""

    def __init__(self, cap, measure_cap):
        self.cap = cap
        self.measure_cap = measure_cap
        self.buf = io.BytesIO()
        self.total = 0

    def write(self, data):
        self.total += len(data)
        if self.total <= self.cap:
            self.buf.write(data)
        elif self.buf is not None:
            self.buf = None  # over the cap: keep measuring, stop keeping
        if self.total > self.measure_cap:
            raise ArchiveTooLarge()
        return len(data)

    def flush(self):
        pass


def tool_archive(slot, args, req):
    """A tar.gz of a file or directory, base64 in ``output``; over ``max_bytes`` is an error."""
    path = resolve_path(slot, args["path"])
    cap = int(args.get("max_bytes") or DEFAULT_ARCHIVE_BYTES)
    if cap < 1 or cap > MAX_FILE_BYTES:
        raise ValueError("max_bytes must be between 1 and %d" % MAX_FILE_BYTES)
    if not os.path.lexists(path):
        raise ToolError("not_found", "no such file or directory: %s" % args["path"])
    counts = {"entries": 0, "bytes": 0}

    def count(info):
        counts["entries"] += 1
        counts["bytes"] += info.size if info.isfile() else 0
        return info

    sink = ArchiveSink(cap, cap * ARCHIVE_MEASURE_FACTOR)
    finished = True
    try:
        with tarfile.open(fileobj=sink, mode="w:gz") as tar:
            tar.add(path, arcname=rel_path(slot, path), recursive=True, filter=count)
    except ArchiveTooLarge:
        finished = False
    if sink.buf is None:
        return archive_too_large(args["path"], cap, sink.total, finished, counts)
    data = sink.buf.getvalue()
    return {
        "output": base64.b64encode(data).decode("ascii"),
        "output_bytes": len(data),
        "data": {
            "encoding": "base64",
            "format": "tar.gz",
            "bytes": len(data),
            "entries": counts["entries"],
            "uncompressed_bytes": counts["bytes"],
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }


def archive_too_large(shown, cap, size, finished, counts):
    size_text = "%d bytes" % size if finished else "more than %d bytes" % size
    return {
        "ok": False,
        "error_code": "limit_exceeded",
        "error": "the archive of %s is %s compressed (%d entries%s); max_bytes is %d"
        % (shown, size_text, counts["entries"], "" if finished else " so far", cap),
        "data": {
            "bytes": size if finished else None,
            "at_least_bytes": size,
            "entries": counts["entries"],
            "complete_count": finished,
            "max_bytes": cap,
        },
    }


# -- unpack: a tar.gz into the workspace; snapshots pack and unpack with it --

DEFAULT_UNPACK_BYTES = 1024 * 1024 * 1024
MAX_UNPACK_ENTRIES = 200000
# Snapshots compress for speed: a workspace is packed while its trajectory waits.
PACK_COMPRESSLEVEL = 1
PACK_BUFSIZE = 64 * 1024


def decode_base64(text, what):
    if not isinstance(text, str):
        raise TypeError("%s must be a base64 string" % what)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("%s is not valid base64: %s" % (what, exc)) from None


def entry_parts(name, what):
    """The path parts of an archive name; ToolError for absolute names and ``..``."""
    if name.startswith("/") or "\x00" in name:
        raise ToolError("path_outside_workspace", "%s %r is an absolute path" % (what, name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ToolError("path_outside_workspace", "%s %r climbs out with '..'" % (what, name))
    return parts


def check_member(member, links, seen, total, max_bytes):
    """Refuse a member that may not be unpacked; returns the bytes unpacked so far.

    ``links`` allows symlinks and hard links (a snapshot's own workspace);
    uploads may not carry them. A tar bomb stops at the first header past a cap.
    """
    entry_parts(member.name, "archive entry")
    if member.issym() or member.islnk():
        if not links:
            kind = "symlink" if member.issym() else "hard link"
            raise ToolError(
                "invalid_args",
                "archive entry %r is a %s; uploads may not contain links" % (member.name, kind),
            )
        if member.islnk():
            entry_parts(member.linkname, "hard link target")
    elif not (member.isfile() or member.isdir()):
        what = "a device, FIFO or other special file"
        raise ToolError("invalid_args", "archive entry %r is %s" % (member.name, what))
    total += member.size if member.isfile() else 0
    if total > max_bytes or seen >= MAX_UNPACK_ENTRIES:
        raise ToolError(
            "limit_exceeded",
            "the archive unpacks to more than %d bytes or %d entries (at %r)"
            % (max_bytes, MAX_UNPACK_ENTRIES, member.name),
        )
    return total


def check_members(tar, links, max_bytes):
    """Every member checked before anything is written: (members, bytes)."""
    members, total = [], 0
    for member in tar:
        total = check_member(member, links, len(members), total, max_bytes)
        members.append(member)
    verify_trailer(tar)
    return members, total


def verify_trailer(tar):
    """Read a gzip stream to its end, so that its CRC and length are checked (tar
    stops reading at its end marker): a corrupted archive is refused, not landed."""
    if not isinstance(tar.fileobj, gzip.GzipFile):
        return
    try:
        while tar.fileobj.read(1 << 20):
            pass
    except (OSError, EOFError) as exc:
        raise ToolError("invalid_args", "the archive is damaged: %s" % exc) from None


def inside(root, path):
    return path == root or path.startswith(root + os.sep)


def ensure_dirs(root, path):
    """Create the missing directories of ``path`` (under ``root``) one by one, so
    that none is ever made through a symlink that leads out of the workspace."""
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            current = os.path.realpath(current)
            if not inside(root, current):
                raise ToolError("path_outside_workspace", "%s leads outside the workspace" % path)
        elif not os.path.lexists(current):
            os.mkdir(current, 0o700)
        elif not os.path.isdir(current):
            raise ToolError("io_error", "%s is not a directory" % current)
    return current


def check_targets(root, dest, members):
    """Refuse, before anything is written, a member that would land through a
    symlink leading out of the workspace (one already there, or one the archive
    makes first) or below something that is not a directory: with the checks of
    ``check_members``, unpack writes all of an archive or nothing. An entry
    replaces what is at its own name (a symlink, a file), as ``unpack_member``
    does."""
    made = {}  # path -> what the archive put there so far: "dir", "file" or a link target
    for member in members:
        target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
        walk_existing(root, os.path.dirname(target) if target != dest else dest, made)
        in_the_way = (
            target not in made
            and os.path.isdir(target)
            and not os.path.islink(target)
            and os.listdir(target)
        )
        if not member.isdir() and in_the_way:  # an empty one gives way (unpack_member)
            raise ToolError("io_error", "%s is a directory in the workspace" % member.name)
        if member.isdir():
            made[target] = "dir"
        elif member.issym():
            made[target] = ("link", member.linkname)
        else:
            made[target] = "file"


def walk_existing(root, path, made):
    """``ensure_dirs`` without writing: each part of ``path`` is a directory, a
    symlink that stays in the workspace, or missing (it will be made), counting
    what the archive's earlier entries ``made``."""
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        kind = made.get(current)
        if kind == "dir":
            continue
        if kind == "file" or (
            kind is None
            and os.path.lexists(current)
            and not os.path.islink(current)
            and not os.path.isdir(current)
        ):
            raise ToolError("io_error", "%s is not a directory" % current)
        if kind is not None:
            current = os.path.normpath(os.path.join(os.path.dirname(current), kind[1]))
        elif os.path.islink(current):
            current = os.path.realpath(current)
        else:
            continue
        if not inside(root, current):
            raise ToolError("path_outside_workspace", "%s leads outside the workspace" % path)


def make_room(root, target):
    """The parent of ``target`` exists in the workspace (no symlink leads out),
    and nothing but a directory stays at ``target`` itself."""
    ensure_dirs(root, os.path.dirname(target))
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        os.unlink(target)


def unpack_member(tar, root, dest, member):
    target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
    if target == dest:
        return
    make_room(root, target)
    if not member.isdir() and os.path.isdir(target) and not os.path.islink(target):
        try:  # an empty directory (the spec's workdir, made at init) gives way
            os.rmdir(target)
        except OSError:
            raise ToolError(
                "io_error", "%s is a directory in the workspace" % member.name
            ) from None
    if member.isdir():
        if not os.path.isdir(target):
            os.mkdir(target, 0o700)
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = os.path.join(dest, *entry_parts(member.linkname, "hard link target"))
        if not inside(root, os.path.realpath(os.path.dirname(source))):
            raise ToolError("path_outside_workspace", "hard link %r leads outside" % member.name)
        os.link(source, target, follow_symlinks=False)
    else:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(tar.extractfile(member), out)
        os.chmod(target, member.mode & 0o777)
        os.utime(target, (member.mtime, member.mtime))


def unpack_into(slot, dest, data, links, max_bytes):
    """Unpack a tar.gz into ``dest`` (a workspace directory), all or nothing: every
    member is checked before the first is written. Returns (entries, bytes)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members, total = check_members(tar, links, max_bytes)
            check_targets(slot.root, dest, members)
            ensure_dirs(slot.root, dest)
            for member in members:
                unpack_member(tar, slot.root, dest, member)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ToolError("invalid_args", "not a readable tar.gz archive: %s" % exc) from None
    set_dir_modes(dest, members)
    return len(members), total


def restore_into(slot, source):
    """A snapshot's tar.gz (or plain tar; its bytes, or a binary file) into a new
    workspace in one streaming pass, each member checked as it comes (the worker
    checked the files' sha256; a refused member fails the trajectory anyway).
    Returns (entries, bytes)."""
    members, total = [], 0
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    mode = "r|gz" if fileobj.read(2) == b"\x1f\x8b" else "r|"
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode=mode, bufsize=PACK_BUFSIZE) as tar:
            for member in tar:
                total = check_member(member, True, len(members), total, DEFAULT_UNPACK_BYTES * 64)
                unpack_member(tar, slot.root, slot.root, member)
                members.append(member)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ToolError("invalid_args", "not a readable tar.gz archive: %s" % exc) from None
    set_dir_modes(slot.root, members)
    return len(members), total


def set_dir_modes(dest, members):
    for member in reversed(members):  # modes last: a read-only directory is filled first
        if member.isdir():
            target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
            os.chmod(target, (member.mode & 0o777) | 0o700)


def tool_unpack(slot, args, req):
    """Unpack a tar.gz (base64) into a workspace directory; links and escapes are refused."""
    dest = resolve_path(slot, args.get("path") or ".")
    data = decode_base64(args["data"], "data")
    cap = int(args.get("max_bytes") or DEFAULT_UNPACK_BYTES)
    entries, total = unpack_into(slot, dest, data, False, cap)
    shown = rel_path(slot, dest)
    return {
        "output": "unpacked %d entries (%d bytes) into %s" % (entries, total, shown),
        "data": {"path": shown, "entries": entries, "bytes": total},
    }


class GzipSink(object):
    """Compresses what a streaming tar writes (zlib level 1, gzip framing) into ``sink``."""

    def __init__(self, sink):
        self.sink = sink
        self.zlib = zlib.compressobj(PACK_COMPRESSLEVEL, zlib.DEFLATED, 31)

    def write(self, data):
        self.sink.write(self.zlib.compress(data))
        return len(data)

    def close(self):
        self.sink.write(self.zlib.flush())


def workspace_entries(root):
    """(path, archive name) of the workspace and everything in it, parents first;
    symlinks are entries, never followed. Iterative (a workspace may nest deeper
    than Python recurses); an unreadable directory is an error."""
    yield root, "."
    stack = [root]
    while stack:
        directory = stack.pop()
        below = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            yield path, "./" + os.path.relpath(path, root)
            if os.path.isdir(path) and not os.path.islink(path):
                below.append(path)
        stack.extend(reversed(below))


def tool_snapshot_pack(slot, args, req):
    """The whole workspace as a tar.gz (the reply's blob), links kept, special files
    left out. ``"compress": "auto"`` (a fork's) makes it a plain tar, packed two to
    three times faster, unless that passes the cap: then a tar.gz after all."""
    if args.get("compress") == "auto":
        plain = native_tar(slot, int(args["max_bytes"]))
        if plain is None:
            plain = pack_workspace(slot, dict(args, compress=False), req)
        if plain.get("error_code") != "limit_exceeded":
            return plain
    return pack_workspace(slot, args, req)


def native_tar(slot, cap):
    """The workspace as a plain tar made by the image's ``tar`` (C: several times
    faster than tarfile), from the same list of entries ``pack_workspace`` takes
    (special files left out, links kept); None when there is no tar or it failed."""
    tar = shutil.which("tar")
    if tar is None:
        return None
    counts = {"entries": 0, "bytes": 0, "skipped": 0}
    names = []
    for path, name in workspace_entries(slot.root):
        try:
            mode = os.lstat(path)
        except FileNotFoundError:
            counts["vanished"] = counts.get("vanished", 0) + 1
            continue
        kind = stat.S_IFMT(mode.st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            counts["skipped"] += 1
            continue
        counts["entries"] += 1
        counts["bytes"] += mode.st_size if kind == stat.S_IFREG else 0
        names.append(os.fsencode(name))
    command = [tar, "-c", "-f", "-", "--null", "--no-recursion", "--numeric-owner"]
    try:
        done = subprocess.run(
            [*command, "-C", slot.root, "-T", "-"],
            input=b"\0".join(names) + b"\0",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    if done.returncode != 0:  # a file gone meanwhile, a busybox tar: tarfile does it
        return None
    if len(done.stdout) > cap:
        message = "the workspace is more than %d bytes uncompressed (the snapshot cap)" % cap
        return {"ok": False, "error_code": "limit_exceeded", "error": message}
    return {"blob": done.stdout, "data": counts}


def pack_workspace(slot, args, req):
    cap = int(args["max_bytes"])
    compress = args.get("compress", True)
    counts = {"entries": 0, "bytes": 0, "skipped": 0}

    def keep(info):
        if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
            counts["skipped"] += 1
            return None
        counts["entries"] += 1
        counts["bytes"] += info.size if info.isfile() else 0
        return info

    sink = ArchiveSink(cap, cap)
    gz = GzipSink(sink) if compress else None
    try:
        # A stream (mode "w|") into zlib: a third faster than tarfile's GzipFile.
        with tarfile.open(fileobj=gz or sink, mode="w|", bufsize=PACK_BUFSIZE) as tar:
            for path, name in workspace_entries(slot.root):
                if req.get("_gen", 0) != slot.generation:  # a cancel stops the pack
                    raise ToolError("cancelled", "snapshot cancelled")
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):  # tar would skip it unseen
                        counts["skipped"] += 1
                        continue
                    tar.add(path, arcname=name, recursive=False, filter=keep)
                except FileNotFoundError:  # deleted while we packed: as at that moment
                    counts["vanished"] = counts.get("vanished", 0) + 1
        if gz is not None:
            gz.close()
    except ArchiveTooLarge:
        sink.buf = None
    if sink.buf is None:
        how = "compressed" if compress else "uncompressed"
        message = "the workspace is more than %d bytes %s (the snapshot cap)" % (cap, how)
        return {"ok": False, "error_code": "limit_exceeded", "error": message}
    return {"blob": sink.buf.getvalue(), "data": counts}


def native_untar(slot, source):
    """A plain tar (our own pack of a workspace) into the new workspace with the
    image's ``tar``: a fork's copies unpack several times faster than with tarfile
    (measured: bench/RESULTS.md, issue 31). Directories are made owner-writable,
    as ``set_dir_modes`` does. None when the image has no tar or it failed (the
    caller unpacks with tarfile then, over what is there)."""
    tar = shutil.which("tar")
    if isinstance(source, str):  # a file the worker staged
        with open(source, "rb") as fh:
            head, data, name = fh.read(2), None, source
    else:
        head, data, name = source[:2], source, "-"
    if tar is None or head == b"\x1f\x8b":
        return None
    try:
        done = subprocess.run(
            [tar, "-x", "-p", "-f", name, "-C", slot.root],
            input=data,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    entries, total = 0, 0
    for top, dirs, files in os.walk(slot.root):
        mode = stat.S_IMODE(os.lstat(top).st_mode)
        if mode & 0o700 != 0o700:
            os.chmod(top, mode | 0o700)
        entries += len(dirs) + len(files)
        for name in files:
            info = os.lstat(os.path.join(top, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return entries, total


def tool_snapshot_unpack(slot, args, req):
    """A snapshot's tar.gz (the request's blob, or ``file``: an archive the worker put
    in the container through the engine, removed once read) into the (new)
    workspace, links kept."""
    path = args.get("file")
    # "native": the worker's own pack of a workspace (no crafted archive from Redis)
    native = args.get("native")
    if not path:
        counts = native and native_untar(slot, req["blob"])
        counts = counts or restore_into(slot, req["blob"])
        return {"output": "", "data": {"entries": counts[0], "bytes": counts[1]}}
    if not os.path.isfile(path):  # not where the worker put it: it sends the bytes
        raise ToolError("not_found", "no archive at %s" % path)
    try:
        counts = native and native_untar(slot, path)
        if not counts:
            with open(path, "rb") as fh:
                counts = restore_into(slot, fh)
        entries, total = counts
    finally:
        for remove in (os.unlink, os.rmdir):  # the file, then its own directory
            try:
                remove(path if remove is os.unlink else os.path.dirname(path))
            except OSError:
                pass
    return {"output": "", "data": {"entries": entries, "bytes": total}}


# -- str_replace_editor: the editor tool several agent frameworks emit ------


def numbered(lines, first):
    return "\n".join("%6d\t%s" % (first + i, line) for i, line in enumerate(lines))


def snippet(text, line, added_lines):
    lines = clean(text).split("\n")
    start = max(1, line - SNIPPET_LINES)
    end = min(len(lines), line + added_lines + SNIPPET_LINES)
    return numbered(lines[start - 1 : end], start)


def editor_view(slot, path, args, req):
    shown = args["path"]
    if os.path.isdir(path):
        entries, _truncated, _errors = walk_entries(path, 2, 10000, hidden=False)
        visible = [e["path"] + ("/" if e["type"] == "dir" else "") for e in entries]
        header = "Here's the files and directories up to 2 levels deep in %s, " % shown
        return {"output": header + "excluding hidden items:\n" + "\n".join(visible)}
    lines, _trailing = split_lines(read_text(slot, path, shown))
    first, last = 1, len(lines)
    view_range = args.get("view_range")
    if view_range:
        first, last = int(view_range[0]), int(view_range[1])
        if last == -1:
            last = len(lines)
        if not 1 <= first <= last <= len(lines):
            raise ValueError(
                "view_range %r is outside the file's lines 1..%d" % (view_range, len(lines))
            )
    capture = Capture(max_output_of(req))
    capture.add(numbered(lines[first - 1 : last], first).encode("utf-8", "surrogateescape"))
    return {
        "output": "Here's the result of running `cat -n` on %s:\n%s\n" % (shown, capture.text()),
        "truncated": capture.truncated,
    }


def editor_create(slot, path, args, req):
    if os.path.exists(path):
        raise ToolError(
            "io_error",
            "File already exists at: %s. Cannot overwrite files using command `create`."
            % args["path"],
        )
    if args.get("file_text") is None:
        raise ValueError("file_text is required for command=create")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(slot, path, args["file_text"])
    return {"output": "File created successfully at: %s" % args["path"]}


def editor_str_replace(slot, path, args, req):
    if args.get("old_str") is None:
        raise ValueError("old_str is required for command=str_replace")
    new = args.get("new_str") or ""
    text = read_text(slot, path, args["path"])
    new_text, _n, line = replace_text(text, args["old_str"], new, None, False, args["path"])
    write_text(slot, path, new_text, before=text)
    return {"output": edited_message(args["path"], new_text, line, new.count("\n"))}


def editor_insert(slot, path, args, req):
    if args.get("insert_line") is None or args.get("new_str") is None:
        raise ValueError("insert_line and new_str are required for command=insert")
    text = read_text(slot, path, args["path"])
    lines, trailing = split_lines(text)
    at = int(args["insert_line"])
    if not 0 <= at <= len(lines):
        raise ValueError("insert_line %d is outside 0..%d" % (at, len(lines)))
    new_lines = args["new_str"].split("\n")
    new_text = join_lines(lines[:at] + new_lines + lines[at:], trailing)
    write_text(slot, path, new_text, before=text)
    return {"output": edited_message(args["path"], new_text, at + 1, len(new_lines) - 1)}


def edited_message(shown, text, line, added_lines):
    return (
        "The file %s has been edited. Here's the result of running `cat -n` on a snippet of %s:\n"
        "%s\nReview the changes and make sure they are as expected. Edit the file again if "
        "necessary." % (shown, shown, snippet(text, line, added_lines))
    )


def editor_undo_edit(slot, path, args, req):
    history = slot.edit_history.get(path)
    if not history:
        raise ToolError("not_found", "No edit history found for %s." % args["path"])
    write_text(slot, path, history.pop())
    return {"output": "Last edit to %s undone successfully." % args["path"]}


EDITOR_COMMANDS = {
    "view": editor_view,
    "create": editor_create,
    "str_replace": editor_str_replace,
    "insert": editor_insert,
    "undo_edit": editor_undo_edit,
}


def tool_str_replace_editor(slot, args, req):
    """The view/create/str_replace/insert/undo_edit file editor of agent frameworks."""
    command = args["command"]
    handler = EDITOR_COMMANDS.get(command)
    if handler is None:
        raise ValueError("command must be one of %s" % ", ".join(sorted(EDITOR_COMMANDS)))
    return handler(slot, resolve_path(slot, args["path"]), args, req)


TOOLS = {
    "bash": tool_bash,
    "read_file": tool_read_file,
    "write_file": tool_write_file,
    "shell": tool_shell,
    "bg_start": tool_bg_start,
    "bg_list": tool_bg_list,
    "bg_output": tool_bg_output,
    "bg_stop": tool_bg_stop,
    "edit_file": tool_edit_file,
    "list_files": tool_list_files,
    "archive": tool_archive,
    "unpack": tool_unpack,
    # the worker's own, for snapshots (not registered tools: no call can name them)
    "_snapshot_pack": tool_snapshot_pack,
    "_snapshot_unpack": tool_snapshot_unpack,
    "str_replace_editor": tool_str_replace_editor,
}


# --------------------------------------------------------------------------
# terminals: programs on a pseudo-terminal, driven by keystrokes
# --------------------------------------------------------------------------
# The agent runs the program on a pty and keeps what it prints, raw; the
# worker renders those bytes with a terminal emulator (the screen a user
# would see). A reader thread drains the pty all the time, so a program never
# blocks on a full terminal while nobody reads it.

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
# tmux's key names (send-keys); anything else is sent as text.
TERMINAL_KEYS = {
    "Enter": b"\r",
    "Tab": b"\t",
    "BTab": b"\x1b[Z",
    "Space": b" ",
    "BSpace": b"\x7f",
    "Escape": b"\x1b",
    "Up": b"\x1b[A",
    "Down": b"\x1b[B",
    "Right": b"\x1b[C",
    "Left": b"\x1b[D",
    "Home": b"\x1b[H",
    "End": b"\x1b[F",
    "PageUp": b"\x1b[5~",
    "PPage": b"\x1b[5~",
    "PageDown": b"\x1b[6~",
    "NPage": b"\x1b[6~",
    "IC": b"\x1b[2~",
    "Insert": b"\x1b[2~",
    "DC": b"\x1b[3~",
    "Delete": b"\x1b[3~",
    "F1": b"\x1bOP",
    "F2": b"\x1bOQ",
    "F3": b"\x1bOR",
    "F4": b"\x1bOS",
    "F5": b"\x1b[15~",
    "F6": b"\x1b[17~",
    "F7": b"\x1b[18~",
    "F8": b"\x1b[19~",
    "F9": b"\x1b[20~",
    "F10": b"\x1b[21~",
    "F11": b"\x1b[23~",
    "F12": b"\x1b[24~",
}
# In application cursor mode (``less``, ``vim``, ``top`` set it) these keys say ESC O x.
TERMINAL_APP_CURSOR = {"Up": b"\x1bOA", "Down": b"\x1bOB", "Right": b"\x1bOC", "Left": b"\x1bOD"}
TERMINAL_APP_CURSOR.update(Home=b"\x1bOH", End=b"\x1bOF")
TERMINAL_CTRL = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31, "?": 127, "Space": 0}
# What a pattern is matched against: the output without escape sequences and CRs.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[()*+][0-~]|\x1b[ -/]*[0-~]|\r"
)


def key_bytes(key, app_cursor):
    """The bytes a key name sends (tmux's names: ``Enter``, ``C-c``, ``M-x``, ``F1``);
    None when ``key`` is not a key name."""
    if app_cursor and key in TERMINAL_APP_CURSOR:
        return TERMINAL_APP_CURSOR[key]
    if key in TERMINAL_KEYS:
        return TERMINAL_KEYS[key]
    if (len(key) > 2 and key[:2] in ("C-", "M-")) or (len(key) == 2 and key[0] == "^"):
        rest = key[2:] if key[1] == "-" else key[1:]
        if key[0] == "M":
            inner = key_bytes(rest, app_cursor)
            return b"\x1b" + (inner if inner is not None else rest.encode("utf-8"))
        if rest in TERMINAL_CTRL:
            return bytes([TERMINAL_CTRL[rest]])
        if len(rest) == 1 and rest.isalpha():
            return bytes([ord(rest.lower()) & 0x1F])
    return None


def keys_bytes(keys, literal, app_cursor):
    """What ``keys`` (a string or a list of them) type, key names translated unless ``literal``."""
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TypeError("keys must be a string or a list of strings")
    out = []
    for key in keys:
        named = None if literal else key_bytes(key, app_cursor)
        out.append(named if named is not None else key.encode("utf-8", "surrogateescape"))
    return b"".join(out)


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
TOOLS.update(TERMINAL_TOOLS)


# --------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------


def main():
    # Survive SIGINT: the worker decides when the agent ends (stdin EOF). A
    # handler, not SIG_IGN, so that commands still get the default SIGINT
    # (exec resets handlers, not ignores): shell timeouts interrupt with it.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    emit(
        {
            "event": "ready",
            "version": AGENT_VERSION,
            "pid": os.getpid(),
            "python": "%d.%d" % sys.version_info[:2],
        }
    )
    stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
    for raw in stdin:
        line = raw.strip()
        if not line:
            continue
        try:
            frame = json.loads(line)
        except ValueError as exc:
            emit({"event": "error", "error": "bad frame: %s" % exc})
            continue
        if isinstance(frame, dict):
            frame = [frame]
        for req in frame:  # blobs follow the line raw, in the order of their requests
            if isinstance(req, dict) and isinstance(req.get("blob"), int):
                req["blob"] = stdin.read(req["blob"])
        for req in frame:
            if isinstance(req, dict):
                try:
                    handle(req)
                except Exception as exc:  # one bad request must not end every slot's agent
                    emit(
                        error_reply(
                            req, "internal_error", "agent: %s: %s" % (type(exc).__name__, exc)
                        )
                    )
    for slot in list(SLOTS.values()):
        slot.kill_all()
        stop_slot_tasks(slot)


if __name__ == "__main__":
    main()
