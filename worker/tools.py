"""The tool registry: names, argument models, aliases.

Tool *semantics* live in the in-sandbox agent; this module only decides what a
valid call looks like, so bad arguments are refused before anything runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)


class ToolArgs(BaseModel):
    """Base of argument models: unknown arguments are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class BashArgs(ToolArgs):
    """Run a command with bash in a fresh shell, in the workspace."""

    command: str = Field(description="The shell command to run.")
    timeout_s: float | None = Field(None, gt=0, description="Kill the command after this long.")
    background: bool = Field(
        False, description="Start it as a background task instead; returns data.task_id at once."
    )


class ShellArgs(ToolArgs):
    """Run a command in a persistent shell session: cwd, env, functions survive calls."""

    command: str = Field(description="The shell command to run.")
    session: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Session name; each name is its own shell (at most 8 per trajectory).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Interrupt the command after this long; the session survives."
    )
    restart: bool = Field(False, description="Start the session afresh before the command.")


TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"


class BgStartArgs(ToolArgs):
    """Start a command as a background task; its output and state go to Redis as it runs."""

    command: str = Field(min_length=1, description="The shell command to run.")
    name: str | None = Field(None, max_length=200, description="A label shown in listings.")


class BgListArgs(ToolArgs):
    """List the trajectory's background tasks."""


class BgOutputArgs(ToolArgs):
    """A background task's output so far (stdout, then stderr)."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    block: bool = Field(False, description="Wait for the task to end (up to timeout_s).")
    timeout_s: float | None = Field(None, gt=0, description="With block: wait at most this long.")


class BgStopArgs(ToolArgs):
    """Stop a background task: SIGTERM to its process group, SIGKILL after a grace period."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    force: bool = Field(False, description="SIGKILL at once.")


class ReadFileArgs(ToolArgs):
    """Read a file of the workspace."""

    path: str = Field(description="Path, relative to the workspace.")
    offset: int = Field(0, ge=0, description="Byte offset to start at.")
    limit: int | None = Field(None, ge=0, description="Bytes to read at most.")
    encoding: Literal["text", "base64"] = "text"
    sha256: bool = Field(False, description="Also return the sha256 of the whole file.")


class WriteFileArgs(ToolArgs):
    """Write a file of the workspace (parent directories are created)."""

    path: str = Field(description="Path, relative to the workspace.")
    content: str = Field(description="The content (text, or base64 with encoding=base64).")
    encoding: Literal["text", "base64"] = "text"
    append: bool = False
    mode: str | None = Field(None, pattern=r"^[0-7]{3,4}$", description="Octal file mode.")


class EditFileArgs(ToolArgs):
    """Replace exact text in a file; ``old`` must occur exactly once unless told otherwise."""

    path: str = Field(description="Path, relative to the workspace.")
    old: str = Field(min_length=1, description="The exact text to replace.")
    new: str = Field(description="The replacement text.")
    count: int | None = Field(
        None, ge=1, description="Replace all occurrences, which must number exactly this many."
    )
    replace_all: bool = Field(False, description="Replace every occurrence (at least one).")

    @model_validator(mode="after")
    def _one_mode(self) -> EditFileArgs:
        if self.count is not None and self.replace_all:
            raise ValueError("give count or replace_all, not both")
        return self


class ListFilesArgs(ToolArgs):
    """List a directory of the workspace: type, size and mtime of each entry."""

    path: str = Field(".", description="Directory (or file), relative to the workspace.")
    recursive: bool = Field(False, description="Descend into subdirectories (symlinks not).")
    max_entries: int = Field(1000, ge=1, le=100_000, description="List at most this many.")


class ArchiveArgs(ToolArgs):
    """A tar.gz of a file or directory of the workspace, base64 in the output."""

    path: str = Field(description="File or directory, relative to the workspace.")
    max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        le=64 * 1024 * 1024,
        description="Largest compressed size returned; a larger archive is an error.",
    )


class UnpackArgs(ToolArgs):
    """Unpack a tar.gz (base64) into a directory of the workspace.

    Every entry is checked before anything is written: absolute paths, ``..``,
    symlinks, hard links and special files are refused, and so is an archive
    that unpacks to more than ``max_bytes``.
    """

    data: str = Field(description="The tar.gz, base64 (the whole call is under the entry cap).")
    path: str = Field(".", description="Directory to unpack into, relative to the workspace.")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        le=4 * 1024 * 1024 * 1024,
        description="Largest unpacked size; a larger archive is refused before it is written.",
    )


class StrReplaceEditorArgs(ToolArgs):
    """The file editor agent frameworks emit (Anthropic, OpenHands, SWE-agent)."""

    command: Literal["view", "create", "str_replace", "insert", "undo_edit"]
    path: str = Field(description="File or directory (absolute paths must be in the workspace).")
    file_text: str | None = Field(None, description="command=create: the file's content.")
    old_str: str | None = Field(None, description="command=str_replace: exact, unique text.")
    new_str: str | None = Field(None, description="str_replace: replacement; insert: new text.")
    insert_line: int | None = Field(None, ge=0, description="command=insert: insert after it.")
    view_range: list[int] | None = Field(
        None, min_length=2, max_length=2, description="command=view: [first, last] (-1: end)."
    )


TERMINAL_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class TerminalWaitArgs(ToolArgs):
    """How long a terminal call waits before it reads the screen."""

    terminal: str = Field(
        "default",
        pattern=TERMINAL_PATTERN,
        description="Terminal name; each name is its own (at most 8 per trajectory).",
    )
    quiet_s: float | None = Field(
        None,
        ge=0,
        le=600,
        description="Return once the output has been quiet this long (default 0.5; 0: at once).",
    )
    wait_for: str | None = Field(
        None,
        max_length=4096,
        description="A regular expression: return once it appears in the new output "
        "(escape sequences removed); not appearing within timeout_s is a timeout error.",
    )
    timeout_s: float | None = Field(None, gt=0, description="Wait at most this long.")
    view: Literal["screen", "text"] = Field(
        "screen",
        description="screen: the scrollback since the last read, then the screen; text: "
        "the output since the last read as a log (escape sequences and CRs removed).",
    )

    @model_validator(mode="after")
    def _pattern_compiles(self) -> TerminalWaitArgs:
        if self.wait_for is not None:
            try:
                re.compile(self.wait_for)
            except re.error as exc:
                raise ValueError(f"wait_for is not a regular expression: {exc}") from None
        return self


class TerminalOpenArgs(TerminalWaitArgs):
    """Open a terminal (a pseudo-terminal running a shell, or ``command``); an open one
    is resized, or started afresh with ``restart``."""

    rows: int = Field(24, ge=2, le=500, description="Screen height.")
    cols: int = Field(80, ge=10, le=1000, description="Screen width.")
    command: str | None = Field(
        None, min_length=1, description="Run this (bash -c) instead of an interactive bash."
    )
    restart: bool = Field(False, description="End the open one first and start afresh.")


class TerminalSendArgs(TerminalWaitArgs):
    """Type into a terminal (tmux send-keys style), then wait and read its screen."""

    keys: str | list[str] = Field(
        description="Text, or a list of items; an item that is a key name (Enter, Tab, "
        "Escape, BSpace, Up, Down, Left, Right, Home, End, PageUp, PageDown, F1-F12, "
        "C-c, C-d, M-x, ...) sends that key, anything else is typed as text."
    )
    literal: bool = Field(False, description="Type every item as text, key names too.")


class TerminalReadArgs(TerminalWaitArgs):
    """Wait and read a terminal's screen without typing anything."""


class TerminalCloseArgs(ToolArgs):
    """End a terminal's program and everything it started."""

    terminal: str = Field("default", pattern=TERMINAL_PATTERN)


@dataclass
class Tool:
    """A tool: a name, a description and a pydantic model of its arguments.

    ``func`` set means an external tool (a Python callable run on RQ); unset
    means a sandbox tool implemented by the in-sandbox agent.
    """

    name: str
    description: str
    args_model: type[BaseModel]
    func: Callable[..., Any] | None = None
    timeout_s: float = 60.0
    retries: int = 0
    retry_interval_s: int = 0  # pause between RQ retries (needs the RQ scheduler)
    queue: str = "toolq"

    @property
    def external(self) -> bool:
        return self.func is not None

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()


class InvalidArgsError(ValueError):
    """Arguments failed validation; ``str()`` lists the field errors."""


ArgsTransform = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Registry:
    """Known tools and aliases. Only registered tools can ever run."""

    tools: dict[str, Tool] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, ArgsTransform] = field(default_factory=dict)
    _adapted: dict[str, Tool] = field(default_factory=dict, repr=False)

    def register(self, tool: Tool) -> Tool:
        self.tools[tool.name] = tool
        self._adapted.clear()
        return tool

    def alias(self, name: str, target: str, transform: ArgsTransform | None = None) -> None:
        """Make ``name`` call ``target``; ``transform`` maps the alias's arguments onto
        the target's (it may raise ValueError, which becomes an invalid-arguments error)."""
        if target not in self.tools:
            raise KeyError(f"alias {name!r} targets unknown tool {target!r}")
        self.aliases[name] = target
        self._adapted.pop(name, None)
        if transform is None:
            self.transforms.pop(name, None)
        else:
            self.transforms[name] = transform

    def resolve(self, name: str) -> Tool | None:
        """The tool a (possibly aliased) name refers to, or None.

        For an alias with a transform this is the target tool with an argument
        model that transforms first, so validation yields the target's arguments.
        """
        tool = self.tools.get(self.aliases.get(name, name))
        transform = self.transforms.get(name) if name in self.aliases else None
        if tool is None or transform is None:
            return tool
        if name not in self._adapted:
            self._adapted[name] = _adapt(tool, name, transform)
        return self._adapted[name]

    def validate(self, tool: Tool, args: dict[str, Any], name: str = "") -> dict[str, Any]:
        """Validated arguments as plain JSON values; raises InvalidArgsError.

        Strict: arguments must have the JSON types the published schema names
        (``"3"`` is not an integer, ``true`` is not a number).
        """
        try:
            model = tool.args_model.model_validate(args, strict=True)
        except ValidationError as exc:
            raise InvalidArgsError(format_validation_error(tool, exc, name)) from None
        return model.model_dump(mode="json", exclude_none=True)


#: How a model hears of a kind of pydantic error (the others: pydantic's own short text).
_PROBLEMS = {"missing": "missing", "extra_forbidden": "not a parameter"}


def format_validation_error(tool: Tool, exc: ValidationError, name: str = "") -> str:
    """What a model reads when its arguments are wrong: what is wrong, then how to
    call the tool (its parameters), two lines with no library boilerplate."""
    called = name or tool.name
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(args)"
        problem = _PROBLEMS.get(err["type"], err["msg"].removeprefix("Value error, "))
        parts.append(f"{loc}: {problem}")
    return f"invalid arguments for {called}: " + "; ".join(parts) + "\n" + usage(tool, called)


def usage(tool: Tool, name: str = "") -> str:
    """``call bash with {"command": string, "timeout_s"?: number}`` (``?``: optional)."""
    schema = tool.json_schema()
    required = set(schema.get("required", []))
    params = []
    for key, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") or "/".join(
            str(p.get("type")) for p in prop.get("anyOf", []) if p.get("type") not in (None, "null")
        )
        params.append(f'"{key}"{"" if key in required else "?"}: {kind or "any"}')
    return f"call {name or tool.name} with {{{', '.join(params)}}} (? marks optional)"


def _adapt(tool: Tool, alias: str, transform: ArgsTransform) -> Tool:
    """``tool`` whose argument model first applies ``transform`` to the raw arguments."""

    def before(cls: type[BaseModel], data: Any) -> Any:
        return transform(data) if isinstance(data, dict) else data

    validator = model_validator(mode="before")(before)
    model = create_model(
        f"{alias}_args",
        __base__=tool.args_model,
        __validators__={"_from_alias": validator},  # type: ignore[dict-item]
    )
    return replace(tool, args_model=model)


def renamed(names: dict[str, str], drop: tuple[str, ...] = ()) -> ArgsTransform:
    """A transform that renames arguments and drops advisory ones (descriptions)."""

    def transform(args: dict[str, Any]) -> dict[str, Any]:
        return {names.get(k, k): v for k, v in args.items() if k not in drop}

    return transform


def _openhands_execute_bash(args: dict[str, Any]) -> dict[str, Any]:
    """OpenHands ``execute_bash {command, is_input?, timeout?, security_risk?}``."""
    args = renamed({"timeout": "timeout_s"}, drop=("security_risk",))(args)
    if str(args.pop("is_input", False)).lower() == "true":
        raise ValueError("is_input (typing into a running command) is not supported")
    return args


def _gemini_run_shell_command(args: dict[str, Any]) -> dict[str, Any]:
    """Gemini CLI ``run_shell_command {command, description?, directory?}``."""
    args = renamed({}, drop=("description",))(args)
    directory = args.pop("directory", None)
    if directory is not None and isinstance(args.get("command"), str):
        if not isinstance(directory, str):
            raise ValueError("directory must be a string")
        args["command"] = f"cd -- {shlex.quote(directory)} || exit 1\n{args['command']}"
    return args


def _terminus_send_keys(args: dict[str, Any]) -> dict[str, Any]:
    """Terminal-Bench Terminus's command ``{keystrokes, is_blocking?, timeout_sec?}``."""
    args = renamed({"keystrokes": "keys", "timeout_sec": "timeout_s"})(args)
    if args.pop("is_blocking", False) is True:
        args.setdefault("quiet_s", 1.0)  # blocking: until the command has gone quiet
    return args


# Tool names agent frameworks already emit -> (built-in tool, argument transform).
FRAMEWORK_ALIASES: dict[str, tuple[str, ArgsTransform | None]] = {
    "terminal": ("bash", None),
    "terminal_stateful": ("shell", None),
    "execute_bash": ("shell", _openhands_execute_bash),
    "run_shell_command": ("bash", _gemini_run_shell_command),
    "run_terminal_cmd": (
        "bash",
        renamed({"is_background": "background"}, drop=("explanation", "require_user_approval")),
    ),
    "str_replace_based_edit_tool": ("str_replace_editor", None),
    "replace": (
        "edit_file",
        renamed(
            {
                "file_path": "path",
                "old_string": "old",
                "new_string": "new",
                "expected_replacements": "count",
            }
        ),
    ),
    "list_dir": ("list_files", renamed({"relative_workspace_path": "path"}, drop=("explanation",))),
    "send_keys": ("terminal_send", _terminus_send_keys),
}


def builtin_registry() -> Registry:
    """The registry of built-in sandbox tools and their aliases."""
    reg = Registry()
    for name, description, args in (
        ("bash", "Run a shell command in a fresh bash.", BashArgs),
        ("shell", "Run a command in a persistent shell session.", ShellArgs),
        ("read_file", "Read a file of the workspace.", ReadFileArgs),
        ("write_file", "Write a file of the workspace.", WriteFileArgs),
        ("edit_file", "Replace exact text in a file of the workspace.", EditFileArgs),
        ("list_files", "List a directory of the workspace.", ListFilesArgs),
        ("archive", "A tar.gz (base64) of a file or directory of the workspace.", ArchiveArgs),
        ("unpack", "Unpack a tar.gz (base64) into a directory of the workspace.", UnpackArgs),
        ("bg_start", "Start a background task.", BgStartArgs),
        ("bg_list", "List the background tasks.", BgListArgs),
        ("bg_output", "A background task's output, optionally waiting for its end.", BgOutputArgs),
        ("bg_stop", "Stop a background task and its process group.", BgStopArgs),
        ("str_replace_editor", "View, create and edit files.", StrReplaceEditorArgs),
        ("terminal_open", "Open a terminal (a shell on a pseudo-terminal).", TerminalOpenArgs),
        ("terminal_send", "Type keys into a terminal; returns its screen.", TerminalSendArgs),
        ("terminal_read", "Wait for a terminal's output; returns its screen.", TerminalReadArgs),
        ("terminal_close", "End a terminal's program.", TerminalCloseArgs),
    ):
        reg.register(Tool(name, description, args))
    for alias, (target, transform) in FRAMEWORK_ALIASES.items():
        reg.alias(alias, target, transform)
    return reg
