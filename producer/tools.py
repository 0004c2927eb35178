"""The tools workers publish (hash ``<ns>:tools``), as clients and models see them.

``openai_spec`` turns one into an OpenAI function-calling spec that an agent loop
hands to its model unchanged (``Client.tool_specs`` gives them all)::

    specs = client.tool_specs()          # [{"type": "function", "function": {...}}, ...]
    reply = openai.chat.completions.create(model=..., messages=..., tools=specs)

``anthropic_spec`` and ``mcp_spec`` give the same tool in Anthropic's and MCP's
shapes (``SPEC_FORMATS`` names all three). They are plain dicts: the producer
imports none of those SDKs; the tests validate the dicts with the SDKs' own types.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from toolq.schemas import Policy, ToolInfo, TrajectoryRecord, TrajectorySpec


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


def anthropic_spec(tool: ToolInfo) -> dict[str, Any]:
    """One Anthropic Messages API tool (``anthropic.types.ToolParam``)."""
    return {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}


def mcp_spec(tool: ToolInfo) -> dict[str, Any]:
    """One MCP tool (``mcp.types.Tool``, as on the wire: camelCase keys)."""
    return {"name": tool.name, "description": tool.description, "inputSchema": tool.parameters}


#: The tool spec shapes toolq can print, by format name.
SPEC_FORMATS: dict[str, Callable[[ToolInfo], dict[str, Any]]] = {
    "openai": openai_spec,
    "anthropic": anthropic_spec,
    "mcp": mcp_spec,
}


def permitted(tools: Iterable[ToolInfo], policy: TrajectorySpec | Policy) -> list[ToolInfo]:
    """The tools a trajectory's policy lets it call, decided as the worker decides
    (``worker/plan.policy_refusal``): blocked wins over allowed, and a name in
    either list counts for the tool it runs, so blocking an alias blocks its tool."""
    tools = list(tools)
    runs = {name: t.name for t in tools for name in (t.name, *t.aliases)}
    blocked = {runs.get(n, n) for n in policy.blocked_tools}
    allowed = (
        None if policy.allowed_tools is None else {runs.get(n, n) for n in policy.allowed_tools}
    )
    return [t for t in tools if t.name not in blocked and (allowed is None or t.name in allowed)]


def policy_in_force(
    record: TrajectoryRecord | None, spec: TrajectorySpec | None
) -> TrajectorySpec | Policy:
    """The trajectory's last policy entry, else the spec it was opened with, else
    (not opened yet) the spec it will open with."""
    if record is not None and record.policy is not None:
        return record.policy
    if record is not None and record.spec is not None:
        return record.spec
    return spec or TrajectorySpec()


def tools_json(tools: Iterable[ToolInfo]) -> str:
    """The tool documents as one JSON array."""
    return json.dumps([t.model_dump() for t in tools], indent=2)
