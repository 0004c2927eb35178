"""Tool calls as LLM APIs write them, and tool results as they want them back.

An agent loop gets tool calls from a model (an OpenAI chat-completions
``message.tool_calls`` list, or Anthropic ``tool_use`` content blocks), runs
them, and sends the results back as messages. These pure functions do both
translations; ``Trajectory.run_openai`` / ``run_anthropic`` (``session.py``)
run the calls in between. They read the SDKs' objects or plain dicts alike
and import neither SDK.

Malformed arguments are the model's mistake, not the program's: they are
submitted as they are and come back as an ``invalid_args`` result the model
can read, never as an exception.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from toolq.schemas import Result

from .ops import ToolCall


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
