"""The tools workers publish (hash ``<ns>:tools``), as clients and models see them.

``tool_specs`` turns them into OpenAI function-calling specs that an agent loop
hands to its model unchanged::

    specs = client.tool_specs()          # [{"type": "function", "function": {...}}, ...]
    reply = openai.chat.completions.create(model=..., messages=..., tools=specs)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from toolq.schemas import ToolInfo


def parse_tools(raw: Mapping[Any, Any]) -> list[ToolInfo]:
    """The tools in an ``HGETALL <ns>:tools`` reply, by name (unreadable entries skipped)."""
    found: list[ToolInfo] = []
    for value in raw.values():
        try:
            found.append(ToolInfo.model_validate_json(value))
        except (ValidationError, ValueError):
            continue  # a newer worker's entry this client cannot read: leave it out
    return sorted(found, key=lambda t: t.name)


def select(tools: Iterable[ToolInfo], names: Iterable[str] | None) -> list[ToolInfo]:
    """Only the tools called (or aliased) ``names``; all of them when ``names`` is None."""
    if names is None:
        return list(tools)
    wanted = set(names)
    return [t for t in tools if t.name in wanted or wanted.intersection(t.aliases)]


def permitted(
    tools: Iterable[ToolInfo], allowed_tools: Iterable[str] | None, blocked_tools: Iterable[str]
) -> list[ToolInfo]:
    """The tools a trajectory's policy lets it call, as the worker decides: block wins
    over allow, and a name in either list stands for its tool (an alias for its target)."""
    tools = list(tools)
    canonical = {n: t.name for t in tools for n in (t.name, *t.aliases)}
    blocked = {canonical.get(n, n) for n in blocked_tools}
    allowed = None if allowed_tools is None else {canonical.get(n, n) for n in allowed_tools}
    return [t for t in tools if t.name not in blocked and (allowed is None or t.name in allowed)]


def openai_spec(tool: ToolInfo) -> dict[str, Any]:
    """One OpenAI function-calling tool spec."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def tool_specs(raw: Mapping[Any, Any], names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """OpenAI specs of the published tools (optionally only ``names``)."""
    return [openai_spec(t) for t in select(parse_tools(raw), names)]


def tools_json(tools: Iterable[ToolInfo]) -> str:
    """The tool documents as one JSON array."""
    return json.dumps([t.model_dump() for t in tools], indent=2)
