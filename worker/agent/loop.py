"""The main loop: read frames, dispatch requests (calls to their slot's queue),
end every slot's processes when the worker closes the channel."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time

from .background import DROP_GRACE_S, stop_tasks
from .protocol import AGENT_VERSION, ToolError, emit, error_reply, read_frames
from .slot import Slot
from .terminals import close_terminals
from .tools import TOOLS

SLOTS = {}  # slot name -> Slot


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
        SLOTS[name] = Slot(name, root, req.get("env") or {}, req.get("workdir"), run_call)
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
    for frame in read_frames(stdin):
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
