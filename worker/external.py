"""External tools, the RQ worker's half: the job function and its callbacks.

``run_tool`` is the one job function toolq ever enqueues (RQ imports it by
this module's path). It looks the tool up *by name* in the registry loaded
from the RQ worker's own ``--tools`` modules (``TOOLQ_TOOLS``), so a message
can never name an import path. RQ callbacks (``on_success`` / ``on_failure``
/ ``on_stopped``) push the final reply to the owning toolq worker, whose half
is ``external_runner.ExternalRunner``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import traceback
from typing import Any

from pydantic import BaseModel
from redis import Redis as SyncRedis
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException

from toolq.schemas import ErrorCode

from .registry import load_registry
from .results import error_reply
from .tools import InvalidArgsError, Registry

log = logging.getLogger("toolq.external")

POLL_S = 1.0  # status read of outstanding jobs (fallback path only)
RESULT_TTL_S = 600  # RQ keeps a job's return value this long (read by the fallback)
FAILURE_TTL_S = 24 * 3600  # failed jobs stay inspectable in RQ's failed registry
NOTICE_TTL_MS = 24 * 3600 * 1000  # notices for a worker that died expire
_FINAL = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
# How RQ records a job whose worker died under it (not the tool's failure).
RQ_SIDE_FAILURES = ("Work-horse terminated unexpectedly", "AbandonedJobError")
WAITING_STATUSES = {s.value for s in JobStatus} - {s.value for s in _FINAL}
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def job_id_for(namespace: str, traj_id: str, call_id: str) -> str:
    """The RQ job id of a call: readable, unique across namespaces and trajectories.

    RQ allows ``[A-Za-z0-9_-]``; ids may hold ``.`` and ``:``, so every other
    byte becomes ``_xx`` (hex). ``__`` never appears inside an escaped part,
    which makes it a safe separator.
    """
    return "tq__" + "__".join(_escape(p) for p in (namespace, traj_id, call_id))


def _escape(part: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode()), part)


_registry: Registry | None = None


def set_registry(registry: Registry) -> None:
    """Use this registry in this process (``toolq rq-worker`` loads it before forking)."""
    global _registry
    _registry = registry


def rq_registry() -> Registry:
    """The RQ worker's registry; a plain ``rq worker`` loads it from ``TOOLQ_TOOLS``."""
    global _registry
    if _registry is None:
        _registry = load_registry(tools_from_env())
    return _registry


def tools_from_env() -> list[str]:
    """Module names in ``TOOLQ_TOOLS`` (separated by spaces or commas)."""
    return [m for m in re.split(r"[\s,]+", os.environ.get("TOOLQ_TOOLS", "")) if m]


def run_tool(
    tool: str, args: dict[str, Any], max_output_bytes: int = 65536, timeout_s: float | None = None
) -> dict[str, Any]:
    """The RQ job function: run registered external tool ``tool`` with ``args``.

    Returns the reply (a dict like the sandbox agent's). Exceptions and
    timeouts propagate so that RQ retries them; the failure callback turns the
    last one into the error reply. ``timeout_s`` holds to the fraction of a
    second (RQ's own job timeout counts whole seconds).
    """
    registry = rq_registry()
    found = registry.resolve(tool)
    if found is None or not found.external:
        return error_reply(
            ErrorCode.UNKNOWN_TOOL,
            f"{tool!r} is not an external tool of this RQ worker "
            f"(tools modules: {', '.join(tools_from_env()) or 'none'})",
        )
    try:
        valid = registry.validate(found, args)
    except InvalidArgsError as exc:
        return error_reply(ErrorCode.INVALID_ARGS, str(exc))
    assert found.func is not None
    _precise_alarm(timeout_s)
    started = time.perf_counter()
    value = found.func(**dict(found.args_model.model_validate(valid)))
    return success_reply(value, (time.perf_counter() - started) * 1000, max_output_bytes)


def _precise_alarm(timeout_s: float | None) -> None:
    """Move RQ's whole-second job alarm to ``timeout_s`` (same timer, same handler).

    Only where RQ set one up: in the work horse's main thread, with its SIGALRM
    handler installed (without a handler, SIGALRM would kill the process).
    """
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        return
    if callable(signal.getsignal(signal.SIGALRM)):
        signal.setitimer(signal.ITIMER_REAL, timeout_s)


def success_reply(value: Any, run_ms: float, max_output_bytes: int) -> dict[str, Any]:
    """A tool's return value as a reply: text output, plus ``data`` for a dict."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    data = None
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
        if isinstance(value, dict) and len(text) <= max_output_bytes:
            data = json.loads(text)  # plain JSON values, whatever the dict held
    output, truncated, total = cap_text(text, max_output_bytes)
    return {
        "ok": True,
        "output": output,
        "truncated": truncated,
        "output_bytes": total,
        "run_ms": run_ms,
        "data": data,
    }


def cap_text(text: str, max_bytes: int) -> tuple[str, bool, int]:
    """Keep the head and tail of ``text`` (like the agent does); (text, truncated, bytes)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text, False, len(raw)
    half = max(max_bytes // 2, 64)
    head = raw[:half].decode("utf-8", "ignore")
    tail = raw[-half:].decode("utf-8", "ignore")
    omitted = len(raw) - 2 * half
    return f"{head}\n[... {omitted} bytes omitted ...]\n{tail}", True, len(raw)


def failure_reply(job: Job, exc_type: Any, exc_value: Any, tb: Any) -> dict[str, Any]:
    """The reply for a job whose last attempt raised (or timed out)."""
    cap = int(job.kwargs.get("max_output_bytes", 65536))
    trace = "".join(traceback.format_exception(exc_type, exc_value, tb))
    output, truncated, total = cap_text(trace, cap)
    extra = {"truncated": truncated, "output_bytes": total, "run_ms": _run_ms(job)}
    tool = job.kwargs.get("tool", "?")
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        message = f"external tool {tool} timed out after {timeout_text(job)}"
        return error_reply(ErrorCode.TIMEOUT, message, output, timed_out=True, **extra)
    name = getattr(exc_type, "__name__", "Error")
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        message = "the RQ worker running the job died (RQ abandoned it); the tool did not fail"
        return error_reply(ErrorCode.EXTERNAL_LOST, message, output, **extra)
    return error_reply(ErrorCode.TOOL_ERROR, f"{name}: {exc_value}", output, **extra)


def timeout_text(job: Job) -> str:
    """The timeout the call asked for (``1.2s``), not RQ's whole-second job timeout."""
    asked: Any = (job.kwargs or {}).get("timeout_s") or job.timeout
    try:
        return f"{float(asked):g}s"
    except (TypeError, ValueError):
        return f"{asked}s"


def _run_ms(job: Job) -> float:
    if job.started_at and job.ended_at:
        return (job.ended_at - job.started_at).total_seconds() * 1000
    return 0.0


def cancelled_reply() -> dict[str, Any]:
    return error_reply(ErrorCode.CANCELLED, "trajectory cancelled")


def on_success(job: Job, connection: SyncRedis, result: Any) -> None:
    """RQ success callback: report the reply ``run_tool`` returned."""
    reply = (
        result if isinstance(result, dict) else error_reply(ErrorCode.INTERNAL_ERROR, repr(result))
    )
    notify(job, connection, reply)


def on_failure(job: Job, connection: SyncRedis, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback: report the last attempt's error (RQ calls it on every attempt)."""
    if job.should_retry:  # RQ runs it again: only the final outcome is an answer
        return
    notify(job, connection, failure_reply(job, exc_type, exc_value, tb))


def on_stopped(job: Job, connection: SyncRedis) -> None:
    """RQ stopped callback: the job was stopped because its trajectory was cancelled."""
    notify(job, connection, cancelled_reply())


def notify(job: Job, connection: SyncRedis, reply: dict[str, Any]) -> None:
    """Push the reply to the worker waiting for it (meta is re-read: owners change)."""
    key = job.get_meta(refresh=True).get("toolq_notify")
    if not key:
        return
    pipe = connection.pipeline(transaction=False)
    pipe.rpush(key, json.dumps({"job": job.id, "reply": reply}, default=str))
    pipe.pexpire(key, NOTICE_TTL_MS)
    pipe.execute()


def outcome_of(connection: SyncRedis, job_id: str, queue: str) -> dict[str, Any]:
    """Read a job's final outcome back from RQ (the fallback when no notice came)."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return error_reply(
            ErrorCode.TIMEOUT,
            f"the RQ job expired before an RQ worker ran it (is one serving queue {queue!r}?)",
        )
    status = job.get_status()
    if status == JobStatus.FINISHED:
        value = job.return_value()
        if isinstance(value, dict):
            return value
    if status in (JobStatus.STOPPED, JobStatus.CANCELED):
        return cancelled_reply()
    latest = job.latest_result()
    trace = (latest.exc_string if latest else None) or ""
    if "JobTimeoutException" in trace:
        return error_reply(ErrorCode.TIMEOUT, f"external tool timed out after {timeout_text(job)}")
    if any(sign in trace for sign in RQ_SIDE_FAILURES):
        message = f"the RQ side failed, not the tool: {trace.strip().splitlines()[0][:300]}"
        return error_reply(ErrorCode.EXTERNAL_LOST, message, trace, run_ms=_run_ms(job))
    last = trace.strip().splitlines()[-1] if trace.strip() else f"RQ job ended: {status}"
    return error_reply(ErrorCode.TOOL_ERROR, last, trace, run_ms=_run_ms(job))
