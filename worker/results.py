"""Replies and results: every call's result is made by ``make_result``.

A *reply* is what ran the call said (the in-sandbox agent, an RQ job, or the
worker refusing it): a dict with ``ok``, ``output``, ``error_code``, ... A
*result* is the wire record (``toolq.schemas.Result``) the writer stores.
"""

from __future__ import annotations

from typing import Any

from toolq.schemas import (
    ECHO_MAX_CHARS,
    ERROR_MAX_CHARS,
    INFRA_ERROR_CODES,
    ErrorCode,
    Result,
    cut_text,
)

from .state import Item, entry_ms, now_ms, wall_ms


def error_reply(code: ErrorCode, message: str, output: str = "", **extra: Any) -> dict[str, Any]:
    """A failed call's reply."""
    return {"ok": False, "error_code": code.value, "error": message, "output": output, **extra}


def make_result(
    traj_id: str,
    item: Item,
    reply: dict[str, Any],
    *,
    tool: str,
    worker_id: str,
    slot_id: str = "",
    slot_reset: bool = False,
    started_ms: int | None = None,
    behind_ms: float = 0.0,
) -> Result:
    """The one result of ``item``, from the reply of whatever ran (or refused) it.

    ``started_ms`` is when the worker started it (now, for a refusal): the
    time from the entry's XADD to then is its ``queued_ms``, of which
    ``behind_ms`` was spent behind the trajectory's earlier calls.
    """
    output = str(reply.get("output", ""))
    data = reply.get("data")
    started = now_ms() if started_ms is None else started_ms
    queued_ms = max(0.0, float(started - entry_ms(item.entry_id)))
    error = reply.get("error")
    return Result(
        call_id=item.call_id,
        traj=traj_id,
        tool=cut_text(tool, ECHO_MAX_CHARS),
        ok=bool(reply.get("ok")),
        output=output,
        exit_code=reply.get("exit_code"),
        error_code=reply.get("error_code"),
        error=cut_text(str(error), ERROR_MAX_CHARS) if error is not None else None,
        truncated=bool(reply.get("truncated")),
        output_bytes=int(reply.get("output_bytes") or len(output)),
        timed_out=bool(reply.get("timed_out")),
        slot_reset=slot_reset,
        infra=slot_reset or reply.get("error_code") in INFRA_ERROR_CODES,
        queued_ms=queued_ms,
        behind_ms=min(behind_ms, queued_ms),
        run_ms=float(reply.get("run_ms") or 0.0),
        worker=worker_id,
        slot=slot_id,
        finished_ms=now_ms(),
        data=data if isinstance(data, dict) else None,
        stages=stages_of(item, reply),
    )


#: Reply fields that carry stage times (Unix ms), and the stage each one names.
REPLY_STAGES = (
    ("sent_at_ms", "sent"),  # set by the runner around the sandbox call
    ("started_at_ms", "tool_started"),  # set by the agent
    ("ended_at_ms", "tool_ended"),
    ("replied_at_ms", "replied"),
)


def stages_of(item: Item, reply: dict[str, Any]) -> dict[str, float]:
    """The call's stage times (``Result.stages``): those it passed, then ``made``."""
    stages = {"read": item.read_at_ms} if item.read_at_ms else {}
    for field, stage in REPLY_STAGES:
        value = reply.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            stages[stage] = float(value)
    stages["made"] = wall_ms()
    return stages


def requested_tool(item: Item) -> str:
    """The tool name the call asked for ('' when the entry could not be parsed)."""
    return (item.entry.tool or "") if item.entry else ""
