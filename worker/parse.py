"""Entries as they come off the streams, made into what the worker acts on.

Parsing is total: whatever an entry holds (bad JSON, nesting a thousand
levels deep, fields of the wrong type, a newer protocol version), the result
is an ``Item`` (carrying the error to answer with) or an ``OpenRequest``; it
never raises past these functions, so one poison entry cannot take the rest
of its batch down with it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from toolq.schemas import (
    PROTOCOL_VERSION,
    CallEntry,
    ErrorCode,
    InvalidIdError,
    OpenRequest,
    check_part,
)

from .state import Item

#: Deepest nesting of JSON values (``args``, ``spec``) an entry may carry.
MAX_JSON_DEPTH = 64
CONTROL_TYPES = ("close", "cancel")


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def json_depth_exceeded(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON ``text`` nests objects/arrays deeper than ``limit``.

    Checked before the models parse it: a deeply nested value makes parsers
    and validators recurse until ``RecursionError``. Text with fewer brackets
    than ``limit`` cannot nest that deep and is not parsed here at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    try:
        value = json.loads(text)
    except RecursionError:
        return True
    except ValueError:
        return False  # not JSON: the model says so
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in node)
    return False


def decode_fields(fields: dict[Any, Any] | None) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in (fields or {}).items()}


def parse_call(entry_id: str, fields: dict[Any, Any] | None, max_entry_bytes: int) -> Item:
    """An entry of a calls stream as an ``Item``; never raises."""
    try:
        return _parse_call(entry_id, fields, max_entry_bytes)
    except Exception as exc:
        return Item(entry_id, None, (ErrorCode.BAD_REQUEST, f"malformed call entry: {exc!r}"[:500]))


def _parse_call(entry_id: str, fields: dict[Any, Any] | None, max_entry_bytes: int) -> Item:
    if not fields:  # deleted entry (XDEL/XTRIM) still in the PEL
        return Item(entry_id, None, (ErrorCode.BAD_REQUEST, "entry was deleted"))
    raw = decode_fields(fields)
    size = sum(len(k) + len(v) for k, v in raw.items())
    kind = raw.get("type", "call")
    item = Item(entry_id, None, kind=kind if kind in CONTROL_TYPES else "call", size_bytes=size)
    try:  # the call id first: whatever else is wrong, the answer goes where the client waits
        item.client_call_id = check_part(raw["call_id"], "call_id") if "call_id" in raw else None
    except InvalidIdError as exc:
        item.error = (ErrorCode.BAD_REQUEST, str(exc))
        return item
    if size > max_entry_bytes:
        item.error = (
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"entry is {size} bytes; the limit is {max_entry_bytes}",
        )
        return item
    if json_depth_exceeded(raw.get("args", "")):
        item.error = (ErrorCode.INVALID_ARGS, f"args nest deeper than {MAX_JSON_DEPTH} levels")
        return item
    try:
        entry = CallEntry.from_fields(raw)
    except ValueError as exc:
        if item.kind != "call":  # a control entry's own fields are all it needs
            entry = CallEntry(type=item.kind)
        elif _only_args_wrong(exc):  # e.g. a model's truncated JSON: the model should hear it
            item.error = (ErrorCode.INVALID_ARGS, args_text(exc, raw.get("tool", "")))
            return item
        else:
            item.error = (ErrorCode.BAD_REQUEST, f"malformed call entry: {_short(exc)}")
            return item
    item.entry = entry
    if entry.v > PROTOCOL_VERSION:
        item.error = (
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {entry.v} is newer than this worker's ({PROTOCOL_VERSION})",
        )
    return item


def args_text(exc: ValueError, tool: str) -> str:
    """``args is not valid JSON: ...`` as a model reads it: the problem, then how to
    send arguments; pydantic's wrapping (type, input, URL) left out."""
    problems = []
    for err in exc.errors() if isinstance(exc, ValidationError) else []:
        problems.append(str(err["msg"]).removeprefix("Value error, "))
    problem = "; ".join(problems) or _short(exc)
    named = f" {tool[:100]}" if tool else ""
    return f"{problem[:400]}\nsend the{named} tool's arguments as one JSON object"


def _only_args_wrong(exc: ValueError) -> bool:
    """True when validation failed on the ``args`` field alone."""
    if not isinstance(exc, ValidationError):
        return False
    return all(err["loc"][:1] == ("args",) for err in exc.errors())


def parse_open(fields: dict[Any, Any] | None) -> OpenRequest:
    """An entry of the open stream; raises ValueError (only) when it is not a valid request."""
    try:
        raw = decode_fields(fields)
        if json_depth_exceeded(raw.get("spec", "")):
            raise ValueError(f"spec nests deeper than {MAX_JSON_DEPTH} levels")
        req = OpenRequest.from_fields(raw)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(repr(exc)[:500]) from None
    if req.v > PROTOCOL_VERSION:
        raise ValueError(f"protocol version {req.v} is newer than this worker's")
    return req


def traj_field(fields: dict[Any, Any] | None) -> str:
    """The ``traj`` field of a raw entry, whatever else it holds."""
    try:
        return decode_fields(fields).get("traj", "")
    except Exception:
        return ""


def preview(fields: dict[Any, Any] | None) -> str:
    """A bounded JSON preview of an entry, for the dead-letter stream."""
    try:
        shown = {k[:100]: v[:1000] for k, v in list(decode_fields(fields).items())[:20]}
    except Exception:
        shown = {}
    return json.dumps(shown)


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500]
