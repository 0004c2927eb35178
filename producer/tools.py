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
