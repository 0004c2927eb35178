"""Pydantic models of every message on the wire.

Entries are flat string fields so that ``redis-cli`` can speak the protocol;
nested values (``spec``, ``args``, ``data``) are JSON strings. Every message
carries ``v`` (protocol major version); unknown fields are ignored, so an old
worker reads a newer client's messages.
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .keys import TRAJ_ID_PATTERN

PROTOCOL_VERSION = 1
#: A result's ``error`` is cut to this many characters (a message that echoes
#: hostile input, e.g. a 1 MB tool name, does not make a 1 MB result).
ERROR_MAX_CHARS = 4096
#: A result's ``tool`` (the name asked for, when refused) is cut to this many.
ECHO_MAX_CHARS = 256


def cut_text(text: str, max_chars: int) -> str:
    """``text``, or its first characters with how many were cut, in ``max_chars``."""
    if len(text) <= max_chars:
        return text
    note = f"... ({len(text) - max_chars} chars cut)"
    return text[: max(0, max_chars - len(note))] + note


#: The sandbox image of a spec that names none (a worker may set another).
DEFAULT_IMAGE = "toolq-sandbox:latest"

_M = TypeVar("_M", bound="WireModel")


class ErrorCode(str, Enum):
    """Every ``error_code`` a result can carry (documented in PROTOCOL.md)."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGS = "invalid_args"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOOL_BLOCKED = "tool_blocked"
    PATH_OUTSIDE_WORKSPACE = "path_outside_workspace"
    NOT_FOUND = "not_found"
    IO_ERROR = "io_error"
    EXIT_STATUS = "exit_status"
    TIMEOUT = "timeout"
    TOOL_ERROR = "tool_error"
    CANCELLED = "cancelled"
    TRAJECTORY_ENDED = "trajectory_ended"
    LIMIT_EXCEEDED = "limit_exceeded"
    SANDBOX_ERROR = "sandbox_error"
    SANDBOX_LOST = "sandbox_lost"
    WORKER_LOST = "worker_lost"
    EXTERNAL_LOST = "external_lost"
    INTERNAL_ERROR = "internal_error"
    SNAPSHOT_NOT_FOUND = "snapshot_not_found"


#: Failures of the infrastructure, not of the call: a trainer masks rollouts with
#: such results (``Result.infra``) instead of training on them.
INFRA_ERROR_CODES = frozenset(
    code.value
    for code in (
        ErrorCode.SANDBOX_ERROR,
        ErrorCode.SANDBOX_LOST,
        ErrorCode.WORKER_LOST,
        ErrorCode.EXTERNAL_LOST,
        ErrorCode.INTERNAL_ERROR,
    )
)


class TrajStatus(str, Enum):
    """Trajectory lifecycle states; the last four are final."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True for states a trajectory never leaves."""
        return self not in (TrajStatus.PENDING, TrajStatus.RUNNING)


#: Trajectory statuses a trajectory never leaves.
FINAL_STATUSES = frozenset(s.value for s in TrajStatus if s.final)
#: The ``reason`` of a trajectory that its client's close ended.
CLOSED_REASON = "closed by client"

BgStatus = Literal["running", "completed", "failed", "stopped", "lost"]
#: Every background-task status, and the final ones (a final one is never overwritten).
BG_STATUSES: tuple[str, ...] = get_args(BgStatus)
BG_FINAL_STATUSES = frozenset(BG_STATUSES) - {"running"}


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_none=True)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # "52", not "52.0": Redis stores it as a small integer
    return str(value)


class WireModel(BaseModel):
    """Base of wire messages: ignores unknown fields, encodes to flat strings."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def to_fields(self) -> dict[Any, Any]:
        """Encode as flat string fields (``None`` omitted) for XADD / HSET.

        Typed loosely on purpose: redis-py's invariant dict parameters reject
        ``dict[str, str]`` even though every key and value is a ``str``.
        """
        return {k: _to_str(v) for k, v in self.model_dump(exclude_none=True).items()}

    def compact_fields(self) -> dict[str, str]:
        """``to_fields`` without the fields at their default (readers fill them in):
        what a stored result holds, to keep Redis small. (Read from the instance
        directly: it runs once per call, and ``model_dump`` costs several times more.)"""
        defaults = _defaults(type(self))
        return {
            k: _to_str(v)
            for k, v in self.__dict__.items()
            if v is not None and not (k in defaults and v == defaults[k])
        }

    @classmethod
    def from_fields(cls: type[_M], fields: dict[Any, Any]) -> _M:
        """Decode flat fields (bytes or str) as read from Redis."""
        decoded = {_s(k): _s(v) for k, v in fields.items()}
        return cls.model_validate(decoded)


@functools.cache
def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields that have a plain default, with it."""
    return {
        name: info.get_default(call_default_factory=True)
        for name, info in model.model_fields.items()
        if not info.is_required()
    }


def _s(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _json_object(value: Any, what: str) -> Any:
    """Parse a JSON-object field that may arrive as a string."""
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is not valid JSON: {exc.msg} (char {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


class Limits(BaseModel):
    """Resource and time limits of one trajectory (the worker caps each one)."""

    model_config = ConfigDict(extra="ignore")

    call_timeout_s: float = Field(60.0, gt=0, description="Default per-call timeout.")
    max_call_timeout_s: float = Field(600.0, gt=0, description="Largest timeout a call may ask.")
    idle_timeout_s: float = Field(
        900.0, gt=0, description="No call for this long: the trajectory times out."
    )
    deadline_s: float | None = Field(None, gt=0, description="Wall time since start.")
    max_calls: int | None = Field(None, ge=1, description="Calls allowed in the trajectory.")
    cpus: float | None = Field(1.0, gt=0, description="CPU cores (Docker backend).")
    memory_mb: int | None = Field(1024, ge=16, description="Memory limit (Docker backend).")
    pids: int | None = Field(256, ge=8, description="Process limit (Docker backend).")
    disk_mb: int | None = Field(
        None,
        ge=1,
        description="Workspace size cap: /workspace is a tmpfs of this size, charged as "
        "memory on top of memory_mb (Docker backend; the worker's default_disk_mb, 2048, "
        "when unset).",
    )
    network: bool = Field(False, description="Network access from the sandbox.")
    max_output_bytes: int = Field(
        65536, ge=256, description="Output kept per call (head and tail)."
    )
    max_children: int = Field(
        16, ge=0, description="Children (specs naming it as parent) open at once."
    )
    max_depth: int = Field(
        3,
        ge=0,
        description="How deep children may nest below it (a root is depth 0); a child's "
        "effective max_depth is the smaller of its own and its parent's.",
    )


class TrajectorySpec(BaseModel):
    """What a trajectory runs in: image, environment, limits, tool policy, labels."""

    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(None, description="Sandbox image; worker default when absent.")
    runtime: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Docker runtime of the sandbox (e.g. runsc: gVisor), one the worker "
        "allows (allowed_runtimes); the worker's default (runtime) when absent. A runtime "
        "the worker does not allow fails the trajectory at open (bad_request).",
    )
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = Field(None, description="Working directory inside the workspace.")
    limits: Limits = Field(default_factory=Limits)
    allowed_tools: list[str] | None = Field(None, description="Only these tools, if set.")
    blocked_tools: list[str] = Field(default_factory=list, description="Never these tools.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free key/values.")
    step: str | None = Field(
        None, description="Workflow step the tool policy belongs to (policy entries change it)."
    )
    exit_tools: list[str] = Field(
        default_factory=list,
        description="Tools whose call ends the trajectory completed, its arguments recorded "
        "as the final result (not run: they need not be registered tools).",
    )

    parent: str | None = Field(
        None,
        pattern=rf"^{TRAJ_ID_PATTERN}$",
        description="The trajectory this one is a child of: opening it is refused "
        "(limit_exceeded) when the parent has ended or would pass its limits.",
    )
    snapshot: str | None = Field(
        None,
        pattern=rf"^{TRAJ_ID_PATTERN}$",
        description="Start from this snapshot: its workspace files, and its spec under the "
        "fields this spec sets (snapshot_not_found if gone).",
    )


class Policy(BaseModel):
    """A ``policy`` entry's new tool policy: it replaces the allowed and blocked
    tools for every call after it in the stream."""

    model_config = ConfigDict(extra="forbid")

    step: str | None = Field(None, max_length=200, description="The workflow step it belongs to.")
    allowed_tools: list[str] | None = Field(None, description="Only these tools, if set.")
    blocked_tools: list[str] = Field(default_factory=list, description="Never these tools.")
    call_timeout_s: float | None = Field(
        None, gt=0, description="New default call timeout (capped by max_call_timeout_s)."
    )


class OpenRequest(WireModel):
    """Entry on ``<ns>:open``: a request to open one trajectory."""

    v: int = PROTOCOL_VERSION
    traj: str = Field(pattern=rf"^{TRAJ_ID_PATTERN}$")
    spec: TrajectorySpec = Field(default_factory=TrajectorySpec)
    previous_owner: str | None = Field(
        None, description="Set by workers when re-queueing another worker's trajectory."
    )
    previous_epoch: int | None = Field(
        None,
        description="With previous_owner: the ownership it displaces (a newer one stays).",
    )
    graceful: bool = Field(
        False, description="The previous owner handed it back cleanly (nothing was running)."
    )
    prefer: str | None = Field(
        None,
        description="A fork's copy: the worker that holds its snapshot's files (it copies "
        "them in-host); other workers leave it to that worker for prefer_ms.",
    )
    prefer_ms: int | None = Field(
        None, ge=0, le=60_000, description="With prefer: how long others leave it (ms)."
    )

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, value: Any) -> Any:
        return _json_object(value, "spec")


CallType = Literal["call", "close", "cancel", "policy", "snapshot"]


class CallEntry(WireModel):
    """Entry on ``<ns>:{T}:calls``: a tool call or a control operation."""

    v: int = PROTOCOL_VERSION
    type: CallType = "call"
    tool: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    call_id: str | None = Field(
        None, description="Client id for idempotent resubmission; default: the entry id."
    )
    timeout_s: float | None = Field(None, gt=0)
    idempotent: bool = Field(False, description="Safe to re-run if its worker dies mid-call.")
    policy: Policy | None = Field(None, description="A policy entry's new tool policy.")

    @field_validator("args", mode="before")
    @classmethod
    def _parse_args(cls, value: Any) -> Any:
        return _json_object(value, "args")

    @field_validator("policy", mode="before")
    @classmethod
    def _parse_policy(cls, value: Any) -> Any:
        return None if value in (None, "") else _json_object(value, "policy")


class SnapshotArgs(BaseModel):
    """A ``snapshot`` entry's ``args``: save the workspace and spec under ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=rf"^{TRAJ_ID_PATTERN}$", description="Replaces one of that name.")
    ttl_s: float | None = Field(
        None, gt=0, description="Kept this long (default and cap: the worker's settings)."
    )
    copies: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="A fork's snapshot: this many copies open next, so the worker starts "
        "their sandboxes while it packs.",
    )


class SnapshotInfo(BaseModel):
    """What is known of a snapshot (``<ns>:snapshots``); its files are apart."""

    model_config = ConfigDict(extra="ignore")

    name: str
    source: str = Field("", description="The trajectory it was taken of.")
    bytes: int = Field(
        0, description="Stored size: a tar.gz (a fork's: a plain tar when that fits the cap)."
    )
    uncompressed_bytes: int = 0
    entries: int = 0
    created_ms: int = 0
    expires_ms: int = 0
    worker: str = ""
    sha256: str = ""
    spec: TrajectorySpec = Field(default_factory=TrajectorySpec)


class Result(WireModel):
    """Hash ``<ns>:{T}:result:<id>``: one call's final result."""

    v: int = PROTOCOL_VERSION
    call_id: str
    traj: str
    tool: str = ""
    ok: bool
    output: str = ""
    exit_code: int | None = None
    error_code: str | None = None
    error: str | None = None
    truncated: bool = False
    output_bytes: int = 0
    timed_out: bool = False
    slot_reset: bool = False
    infra: bool = Field(
        False,
        description="The infrastructure, not the call, is to blame: it failed with one of "
        "INFRA_ERROR_CODES, or ran in a fresh sandbox after the old one was lost (slot_reset).",
    )
    queued_ms: float = 0.0
    behind_ms: float = Field(
        0.0,
        description="The part of queued_ms spent behind this trajectory's earlier calls (they "
        "run one at a time) or behind the start of its slot (a sandbox starting); "
        "queued_ms - behind_ms is the wait for a worker to read and start the call.",
    )
    run_ms: float = 0.0
    worker: str = ""
    slot: str = ""
    finished_ms: int = 0
    data: dict[str, Any] | None = Field(None, description="Structured tool output.")
    stages: dict[str, float] | None = Field(
        None,
        description="When the call passed each stage, as Unix time in milliseconds (fractions "
        "for microseconds), by the clock of the host that saw it: `read` (the worker read the "
        "entry), `sent` (it left for the sandbox), `tool_started` and `tool_ended` (the tool "
        "in the sandbox), `replied` (the sandbox's reply was back in the worker), `made` (the "
        "result was made and queued for writing). Stages a call did not pass are absent (a "
        "refused call has `read` and `made`). With the client's own submit time and the time "
        "it got the result, they split a call's latency into queue, toolq and tool time.",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _parse_data(cls, value: Any) -> Any:
        return None if value in (None, "") else _json_object(value, "data")

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, value: Any) -> Any:
        return None if value in (None, "") else _json_object(value, "stages")


EventType = Literal["result", "bg", "state"]


class Event(WireModel):
    """Entry on ``<ns>:{T}:events``: something finished or changed."""

    v: int = PROTOCOL_VERSION
    type: EventType
    call_id: str | None = None
    ok: bool | None = None
    error_code: str | None = None
    task_id: str | None = None
    status: str | None = None
    result: str | None = Field(
        None,
        description="`result` events of small results (fields + values up to 4096 bytes): "
        "the result hash's fields as one JSON object of strings, identical to the hash.",
    )


class BgTask(WireModel):
    """Hash ``<ns>:{T}:bg:<task>``: one background task."""

    v: int = PROTOCOL_VERSION
    task_id: str
    traj: str
    name: str = ""
    command: str = ""
    status: BgStatus = "running"
    pid: int | None = None
    exit_code: int | None = None
    started_ms: int = 0
    ended_ms: int | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False


class TrajectoryRecord(WireModel):
    """Hash ``<ns>:{T}``: the trajectory record."""

    v: int = PROTOCOL_VERSION
    traj: str
    status: TrajStatus = TrajStatus.PENDING
    owner: str | None = None
    epoch: int = Field(0, description="Ownership epoch: incremented by every claim.")
    slot: str | None = None
    host: str | None = Field(None, description="Host name of the worker that serves it now.")
    sandbox: str | None = Field(
        None, description="What serves it: the Docker container id, or the local agent's pid."
    )
    unenforced: list[str] | None = Field(
        None,
        description="Spec fields the backend serving it does not enforce (the local backend "
        "is no sandbox: e.g. limits.network, limits.memory_mb); absent when all are.",
    )
    created_ms: int | None = None
    enqueued_ms: int | None = Field(
        None,
        description="When its open request went onto <ns>:open (set by the opener after the "
        "XADD); a pending record without it is an open that died half done, which the next "
        "open enqueues again.",
    )
    cancel_requested_ms: int | None = Field(
        None,
        description="When a cancel of it was requested while a worker owned it: the worker "
        "acts on it even while the cancel entry waits behind a full read-ahead, and no new "
        "child may be opened under it.",
    )
    started_ms: int | None = None
    claimed_ms: int | None = Field(
        None, description="When the current owner claimed it (Redis's clock)."
    )
    ended_ms: int | None = None
    last_activity_ms: int | None = None
    calls_total: int = Field(
        0, description="Calls answered (a final result written), by a worker or a script."
    )
    calls_failed: int = Field(0, description="Calls answered with ok=0.")
    calls_submitted: int = Field(0, description="Calls submitted while the trajectory was open.")
    calls_infra: int = Field(0, description="Calls answered with infra = 1.")
    last_call_id: str | None = None
    reason: str | None = None
    parent: str | None = Field(None, description="The parent trajectory (spec.parent).")
    depth: int = Field(0, description="How deep it nests: 0 for a root, parent's + 1.")
    max_depth: int | None = Field(
        None, description="Effective max_depth: its own, capped by its parent's."
    )
    max_children: int | None = Field(None, description="Children it may have open at once.")
    spec: TrajectorySpec | None = None
    step: str | None = Field(None, description="The step of the policy in force.")
    policy: Policy | None = Field(None, description="The last policy entry applied.")
    exit_tool: str | None = Field(None, description="The exit tool whose call ended it.")
    final_result: dict[str, Any] | None = Field(
        None, description="The arguments of that exit-tool call."
    )
    copied_via: str | None = Field(
        None,
        description="Opened from a snapshot: how its files came, 'host' (from the memory "
        "of the worker that took it, on its host) or 'redis' (read from Redis).",
    )

    @property
    def infra_affected(self) -> bool:
        """The infrastructure failed some of its calls: mask the rollout, don't train on it."""
        return self.calls_infra > 0

    @field_validator("policy", mode="before")
    @classmethod
    def _parse_policy(cls, value: Any) -> Any:
        return None if value in (None, "") else _json_object(value, "policy")

    @field_validator("final_result", mode="before")
    @classmethod
    def _parse_final_result(cls, value: Any) -> Any:
        return None if value in (None, "") else _json_object(value, "final_result")

    @field_validator("unenforced", mode="before")
    @classmethod
    def _parse_unenforced(cls, value: Any) -> Any:
        if value in (None, ""):  # written empty by a backend that enforces everything
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return [value]  # keep the record readable, and the text visible
        return value if isinstance(value, list) else [str(value)]

    @property
    def calls_in_flight(self) -> int:
        """Calls submitted but not answered yet (queued or running)."""
        return max(0, self.calls_submitted - self.calls_total)

    @field_validator("spec", mode="before")
    @classmethod
    def _parse_spec(cls, value: Any) -> Any:
        # A record must stay readable even when the spec it stores never validated
        # (that is why such a trajectory failed): then ``spec`` is None.
        if value in (None, ""):
            return None
        try:
            return TrajectorySpec.model_validate(_json_object(value, "spec"))
        except ValueError:
            return None


class WorkerInfo(WireModel):
    """Hash ``<ns>:worker:<W>``: a worker's heartbeat record."""

    v: int = PROTOCOL_VERSION
    worker: str
    host: str = ""
    pid: int = 0
    backend: str = ""
    version: str = ""
    slots_total: int = 0
    slots_used: int = 0
    started_ms: int = 0
    heartbeat_ms: int = 0
    dead_after_s: float = Field(
        0.0,
        description="Its dead_after_s: a heartbeat (the <ns>:workers score) older than this "
        "means it is dead and its trajectories are taken over (0: not published).",
    )


class ToolInfo(BaseModel):
    """Value of one field of hash ``<ns>:tools``: a tool as workers publish it (JSON).

    ``parameters`` is the JSON Schema (Draft 2020-12) of the tool's arguments;
    ``external`` tools run as RQ jobs, the others in the trajectory's sandbox.
    """

    model_config = ConfigDict(extra="ignore")

    v: int = PROTOCOL_VERSION
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    external: bool = False
    aliases: list[str] = Field(default_factory=list, description="Other names that run it.")
