"""Planning a call: which tool, whether policy and limits allow it, its arguments, its timeout.

Pure functions of the trajectory's spec, the registry and the worker's
settings: the runner asks ``plan_call`` before anything runs, and the answer
is either a ``Plan`` or a ``Refusal`` (the error result to give instead).
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass
from typing import Any

from toolq.schemas import CallEntry, ErrorCode, Limits, Policy, TrajectorySpec

from .channel import LINE_LIMIT_BYTES
from .settings import WorkerSettings
from .tools import InvalidArgsError, Registry, Tool

#: No setting may raise the output kept per call above this.
MAX_OUTPUT_CAP_BYTES = LINE_LIMIT_BYTES // 8


@dataclass(frozen=True)
class Refusal:
    """Why a call is answered with an error instead of being run."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Plan:
    """What to run: the canonical tool, validated arguments, the timeout that holds."""

    tool: Tool
    args: dict[str, Any]
    timeout_s: float
    max_output_bytes: int


@dataclass(frozen=True)
class ExitPlan:
    """A call of one of the spec's exit tools: it ends the trajectory ``completed``,
    its arguments recorded as the final result; nothing runs."""

    tool: str
    args: dict[str, Any]


def apply_policy(spec: TrajectorySpec, policy: Policy) -> TrajectorySpec:
    """The spec with ``policy``'s tool lists, step and call timeout in force.

    Raises ValueError when the call timeout passes the spec's ``max_call_timeout_s``.
    """
    limits = spec.limits
    if policy.call_timeout_s is not None:
        if policy.call_timeout_s > limits.max_call_timeout_s:
            raise ValueError(
                f"call_timeout_s {policy.call_timeout_s:g} passes the trajectory's "
                f"max_call_timeout_s ({limits.max_call_timeout_s:g})"
            )
        limits = limits.model_copy(update={"call_timeout_s": policy.call_timeout_s})
    update = {"allowed_tools": policy.allowed_tools, "blocked_tools": policy.blocked_tools}
    return spec.model_copy(update={**update, "step": policy.step, "limits": limits})


@dataclass(frozen=True)
class Recorded:
    """A policy or exit call's reply, and the record fields to write before it."""

    reply: dict[str, Any]
    fields: dict[str, str]


def policy_change(
    spec: TrajectorySpec, policy: Policy | None
) -> tuple[TrajectorySpec, Recorded] | Refusal:
    """A policy entry: the spec it puts in force and what to record, or why not."""
    if policy is None:
        return Refusal(ErrorCode.BAD_REQUEST, "policy entry has no 'policy' field")
    try:
        changed = apply_policy(spec, policy)
    except ValueError as exc:
        return Refusal(ErrorCode.INVALID_ARGS, str(exc))
    fields = {"policy": policy.model_dump_json(exclude_none=True), "step": policy.step or ""}
    reply = {"ok": True, "output": f"policy applied{_step(changed)}", "data": policy.model_dump()}
    return changed, Recorded(reply, fields)


def exit_call(plan: ExitPlan) -> Recorded:
    """An exit tool's call: answered ok, its arguments recorded as the final result."""
    fields = {"exit_tool": plan.tool, "final_result": json.dumps(plan.args, separators=(",", ":"))}
    return Recorded({"ok": True, "output": "the trajectory is complete", "data": plan.args}, fields)


def _step(spec: TrajectorySpec) -> str:
    return f" (step {spec.step!r})" if spec.step else ""


def canonical(registry: Registry, name: str) -> str:
    """The registered tool a name (or alias) runs; unknown names stay as they are."""
    tool = registry.resolve(name)
    return tool.name if tool is not None else name


def policy_refusal(registry: Registry, spec: TrajectorySpec, name: str) -> Refusal | None:
    """Block wins over allow; both lists are compared by canonical tool, so an
    alias is blocked (or allowed) exactly like the tool it runs."""
    tool = canonical(registry, name)
    if tool in {canonical(registry, n) for n in spec.blocked_tools}:
        return Refusal(
            ErrorCode.TOOL_BLOCKED,
            f"tool {name!r} is blocked by the trajectory's policy{_step(spec)}",
        )
    allowed = spec.allowed_tools
    if allowed is not None and tool not in {canonical(registry, n) for n in allowed}:
        return Refusal(
            ErrorCode.TOOL_BLOCKED, f"tool {name!r} is not in the allowed_tools policy{_step(spec)}"
        )
    return None


def deadline_left_s(limits: Limits, started: float) -> float:
    """Seconds left before the trajectory's deadline (``started`` is monotonic)."""
    if limits.deadline_s is None:
        return float("inf")
    return limits.deadline_s - (time.monotonic() - started)


def call_timeout_s(
    tool: Tool,
    asked_s: float | None,
    limits: Limits,
    settings: WorkerSettings,
    deadline_left: float = float("inf"),
) -> float:
    """The one timeout rule, for sandbox and external calls alike.

    The call's own ``timeout_s`` (its argument or the entry's field), else the
    trajectory's ``call_timeout_s``; lowered by an external tool's own
    ``timeout_s``, the trajectory's ``max_call_timeout_s``, the worker's
    ``max_call_timeout_s`` and what is left of the trajectory's deadline.
    """
    timeout_s = asked_s if asked_s is not None else limits.call_timeout_s
    caps = [limits.max_call_timeout_s, settings.max_call_timeout_s, deadline_left]
    if tool.external:
        caps.append(tool.timeout_s)
    return max(0.001, min(float(timeout_s), *caps))


def unknown_tool_text(registry: Registry, name: str) -> str:
    """What a model reads for a tool name no worker knows: the nearest name, and
    the tools there are (``toolq tools`` lists them with their parameters)."""
    names = sorted(registry.tools)
    near = difflib.get_close_matches(name, [*names, *registry.aliases], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown tool {name!r}{hint}; the tools are: {', '.join(names)}"


def plan_call(
    registry: Registry,
    settings: WorkerSettings,
    spec: TrajectorySpec,
    entry: CallEntry,
    calls_so_far: int,
    started: float,
) -> Plan | ExitPlan | Refusal:
    """Check a call against tool registry, policy, limits and argument model."""
    name = entry.tool or ""
    if not name:
        return Refusal(ErrorCode.BAD_REQUEST, "call entry has no 'tool' field")
    if name in spec.exit_tools:
        return policy_refusal(registry, spec, name) or ExitPlan(name, entry.args)
    tool = registry.resolve(name)
    if tool is None:
        return Refusal(ErrorCode.UNKNOWN_TOOL, unknown_tool_text(registry, name))
    refused = policy_refusal(registry, spec, name)
    if refused is not None:
        return refused
    limits = spec.limits
    if limits.max_calls is not None and calls_so_far > limits.max_calls:
        return Refusal(ErrorCode.LIMIT_EXCEEDED, f"max_calls limit ({limits.max_calls}) reached")
    left_s = deadline_left_s(limits, started)
    if left_s <= 0:
        return Refusal(ErrorCode.LIMIT_EXCEEDED, f"deadline_s limit ({limits.deadline_s}s) passed")
    try:
        args = registry.validate(tool, entry.args, name)
    except InvalidArgsError as exc:
        return Refusal(ErrorCode.INVALID_ARGS, str(exc))
    sandbox_arg = None if tool.external else args.get("timeout_s")
    asked = sandbox_arg if sandbox_arg is not None else entry.timeout_s
    timeout_s = call_timeout_s(tool, asked, limits, settings, left_s)
    if sandbox_arg is not None:  # the sandbox sees the timeout that holds, not the one asked
        args["timeout_s"] = timeout_s
    return Plan(tool, args, timeout_s, output_cap(limits, settings))


def output_cap(limits: Limits, settings: WorkerSettings) -> int:
    """Output kept per call: the spec's ``max_output_bytes``, capped by the worker's.

    The worker's cap also stays well under what one agent reply line may
    carry (output escaped as JSON can grow sixfold).
    """
    return min(limits.max_output_bytes, settings.max_output_bytes, MAX_OUTPUT_CAP_BYTES)
