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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

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
    """Write one reply or event line (thread-safe)."""
    line = json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n"
    data = line.encode("utf-8", "surrogateescape")
    with _write_lock:
        _out.write(data)
        _out.flush()


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
        self.lock = threading.Lock()
        self.generation = 0  # bumped by cancel: queued calls of older generations are dropped
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

    def untrack(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def kill_all(self):
        """Kill every process group this slot started (running calls)."""
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            kill_group(proc.pid, signal.SIGKILL)


SLOTS = {}


def base_env(slot):
    env = dict(os.environ)
    env.pop("TOOLQ_AGENT", None)
    env.update(slot.env)
    env["PWD"] = slot.cwd
    env.setdefault("HOME", slot.root)
    return env


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
    except (OSError, ToolError) as exc:
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


def stop_slot_tasks(slot):
    """Hook for background tasks (none in the core tool set)."""


def run_call(slot, req):
    started = time.monotonic()
    tool = req.get("tool")
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
            reply = error_reply(req, "io_error", "%s: %s" % (type(exc).__name__, exc))
        except Exception as exc:  # a tool bug must not kill the agent
            reply = error_reply(req, "tool_error", "%s: %s" % (type(exc).__name__, exc))
    reply["run_ms"] = round((time.monotonic() - started) * 1000.0, 3)
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
    timeout = args.get("timeout_s", req.get("timeout_s"))
    if timeout is None:
        timeout = 60.0
    timeout = float(timeout)
    if timeout <= 0:
        raise ValueError("timeout_s must be > 0")
    cap = req.get("max_timeout_s")
    return min(timeout, float(cap)) if cap else timeout


def max_output_of(req):
    return int(req.get("max_output_bytes") or DEFAULT_MAX_OUTPUT)


# --------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------


def tool_bash(slot, args, req):
    """Run a command in a fresh shell in the workspace."""
    command = args["command"]
    if not isinstance(command, str):
        raise TypeError("command must be a string")
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


TOOLS = {
    "bash": tool_bash,
    "read_file": tool_read_file,
    "write_file": tool_write_file,
}


# --------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------


def main():
    # Ignore SIGINT: the worker decides when the agent ends (stdin EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        for req in frame:
            if isinstance(req, dict):
                handle(req)
    for slot in list(SLOTS.values()):
        slot.kill_all()
        stop_slot_tasks(slot)


if __name__ == "__main__":
    main()
