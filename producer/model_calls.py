"""Tool calls as LLM APIs write them, and tool results as they want them back.

An agent loop gets tool calls from a model (an OpenAI chat-completions
``message.tool_calls`` list, or Anthropic ``tool_use`` content blocks), runs
them, and sends the results back as messages. These pure functions do both
translations; ``Trajectory.run_openai`` / ``run_anthropic`` (``session.py``)
run the calls in between. They read the SDKs' objects or plain dicts alike
and import neither SDK.

Malformed arguments are the model's mistake, not the program's: they are
submitted as they are and come back as an ``invalid_args`` result the model
can read, never as an exception. A call that gets no result at all (the client
gave up waiting, Redis is unreachable, the open was refused) is named the same
way by ``client_failure``, for adapters that answer every call with text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from toolq.schemas import Result

from .drive import REDIS_DOWN
from .ops import (
    LimitExceeded,
    ToolCall,
    ToolqError,
    TrajectoryEnded,
    UnknownTrajectory,
    WaitTimeout,
)


@dataclass(frozen=True)
class ModelCall:
    """One tool call a model asked for: the model's own id for it, and the call."""

    model_id: str
    call: ToolCall


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """An attribute of an SDK object, or a key of the equivalent dict."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def openai_calls(tool_calls: Iterable[Any] | None) -> list[ModelCall]:
    """The calls of an OpenAI chat-completions ``message.tool_calls`` list.

    ``function.arguments`` is JSON text the model wrote; it is passed on as
    text, so text that does not parse becomes an ``invalid_args`` result.
    """
    calls = []
    for tc in tool_calls or []:
        fn = _get(tc, "function")
        if fn is None:  # a custom (free-text) tool call: its input is the arguments
            fn = _get(tc, "custom")
            name, args = _get(fn, "name", ""), _get(fn, "input", "")
        else:
            name, args = _get(fn, "name", ""), _get(fn, "arguments", "")
        calls.append(ModelCall(str(_get(tc, "id", "")), ToolCall(str(name), _as_text(args))))
    return calls


def anthropic_calls(content: Iterable[Any] | None) -> list[ModelCall]:
    """The ``tool_use`` blocks of an Anthropic message's ``content`` (other blocks,
    text or thinking, are skipped)."""
    calls = []
    for block in content or []:
        if _get(block, "type") != "tool_use":
            continue
        args = _get(block, "input", {})
        calls.append(
            ModelCall(
                str(_get(block, "id", "")),
                ToolCall(
                    str(_get(block, "name", "")), args if isinstance(args, dict) else _as_text(args)
                ),
            )
        )
    return calls


def _as_text(args: Any) -> str:
    if isinstance(args, str):
        return args
    return json.dumps(args)  # a dict would not get here; a list or number is invalid_args


def result_text(result: Result) -> str:
    """What the model reads: the output, then what went wrong (``[code] error``)
    and whether the output was cut."""
    parts = [result.output] if result.output else []
    if result.truncated:
        parts.append(f"[output truncated: {result.output_bytes} bytes in all]")
    if not result.ok:
        parts.append(f"[{result.error_code or 'failed'}] {result.error or ''}".rstrip())
    return "\n".join(parts)


def openai_messages(calls: Sequence[ModelCall], results: Sequence[Result]) -> list[dict[str, Any]]:
    """``role: tool`` messages answering ``calls``, in their order (append them to
    the conversation after the assistant message that asked)."""
    return [
        {"role": "tool", "tool_call_id": c.model_id, "content": result_text(r)}
        for c, r in zip(calls, results, strict=True)
    ]


def anthropic_blocks(calls: Sequence[ModelCall], results: Sequence[Result]) -> list[dict[str, Any]]:
    """``tool_result`` blocks answering ``calls``, in their order (the content of
    the next ``role: user`` message)."""
    return [
        {
            "type": "tool_result",
            "tool_use_id": c.model_id,
            "content": result_text(r),
            "is_error": not r.ok,
        }
        for c, r in zip(calls, results, strict=True)
    ]


#: The client's own failures (the worker's codes are ``toolq.schemas.ErrorCode``): exception
#: types, their code, and whether the infrastructure is to blame. The first match wins.
CLIENT_ERRORS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str, bool]] = [
    (WaitTimeout, "wait_timeout", True),
    (TrajectoryEnded, "trajectory_ended", False),
    (LimitExceeded, "limit_exceeded", False),
    (UnknownTrajectory, "unknown_trajectory", False),
    (REDIS_DOWN, "redis_unreachable", True),
    (ToolqError, "client_error", False),
]
#: What a client call may raise that ``client_failure`` names: catch these.
CLIENT_FAILURES: tuple[type[BaseException], ...] = (ToolqError, *REDIS_DOWN)


class ClientFailure(NamedTuple):
    """A call that got no result, as a model or a trainer should see it."""

    code: str  #: ``wait_timeout``, ``redis_unreachable``, ... (see ``CLIENT_ERRORS``)
    message: str
    infra: bool  #: toolq, not the model, is to blame: mask the rollout, don't train on it

    @property
    def text(self) -> str:
        """``[code] message``, as ``result_text`` ends a failed result."""
        return f"[{self.code}] {self.message}".rstrip()


def client_failure(exc: BaseException) -> ClientFailure:
    """The code, message and blame of one of ``CLIENT_FAILURES``; ``TypeError``
    for any other exception (a bug to raise, not a tool result)."""
    for kind, code, infra in CLIENT_ERRORS:
        if isinstance(exc, kind):
            message = exc.reason if isinstance(exc, LimitExceeded) else str(exc)
            return ClientFailure(code, message, infra)
    raise TypeError(f"not a toolq client failure: {exc!r}") from exc
