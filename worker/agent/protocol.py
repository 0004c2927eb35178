"""The channel to the worker: JSON lines in and out, raw blobs after them.

- worker -> agent: one line per frame, a JSON array of requests
  ``{"id", "op", "slot", ...}``; a request with ``"blob": N`` is followed by N
  raw bytes (after the frame's line, the blobs of its requests in order).
- agent -> worker: one JSON object per line, a reply ``{"id": ..., ...}`` or an
  event ``{"event": ..., ...}``; a reply's ``blob`` (bytes) goes raw right after
  its line, which says its length: no base64, no JSON escaping.

Also what every tool shares about a request: ``ToolError``, error replies, the
call's timeout and output cap.
"""

from __future__ import annotations

import json
import select
import sys
import threading

AGENT_VERSION = "1"
DEFAULT_MAX_OUTPUT = 65536


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


def read_frames(stdin):
    """The frames the worker sends, each a list of requests with their blobs read;
    a line that is not JSON is answered with an error event and skipped."""
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
        yield frame


def safe_emit(message):
    try:
        emit(message)
    except (OSError, ValueError):  # the worker went away; nobody to tell
        pass


class ToolError(Exception):
    """A tool failed in an expected way; becomes an error result."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def cancelled_reply(req):
    return error_reply(req, "cancelled", "call cancelled")


def error_reply(req, code, message, **extra):
    reply = {"id": req.get("id"), "ok": False, "error_code": code, "error": message}
    reply.update(extra)
    return reply


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
