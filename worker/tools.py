"""The tool registry: names, argument models, aliases.

Tool *semantics* live in the in-sandbox agent; this module only decides what a
valid call looks like, so bad arguments are refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ToolArgs(BaseModel):
    """Base of argument models: unknown arguments are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class BashArgs(ToolArgs):
    """Run a command with bash in a fresh shell, in the workspace."""

    command: str = Field(description="The shell command to run.")
    timeout_s: float | None = Field(None, gt=0, description="Kill the command after this long.")


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
    queue: str = "toolq"

    @property
    def external(self) -> bool:
        return self.func is not None

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()


class InvalidArgsError(ValueError):
    """Arguments failed validation; ``str()`` lists the field errors."""


@dataclass
class Registry:
    """Known tools and aliases. Only registered tools can ever run."""

    tools: dict[str, Tool] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def register(self, tool: Tool) -> Tool:
        self.tools[tool.name] = tool
        return tool

    def alias(self, name: str, target: str) -> None:
        if target not in self.tools:
            raise KeyError(f"alias {name!r} targets unknown tool {target!r}")
        self.aliases[name] = target

    def resolve(self, name: str) -> Tool | None:
        """The tool a (possibly aliased) name refers to, or None."""
        return self.tools.get(self.aliases.get(name, name))

    def validate(self, tool: Tool, args: dict[str, Any]) -> dict[str, Any]:
        """Validated arguments as plain JSON values; raises InvalidArgsError."""
        try:
            model = tool.args_model.model_validate(args)
        except ValidationError as exc:
            raise InvalidArgsError(format_validation_error(tool.name, exc)) from None
        return model.model_dump(mode="json", exclude_none=True)


def format_validation_error(tool: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(args)"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid arguments for {tool}: " + "; ".join(parts)


def builtin_registry() -> Registry:
    """The registry of built-in sandbox tools and their aliases."""
    reg = Registry()
    reg.register(Tool("bash", "Run a shell command in a fresh bash.", BashArgs))
    reg.register(Tool("read_file", "Read a file of the workspace.", ReadFileArgs))
    reg.register(Tool("write_file", "Write a file of the workspace.", WriteFileArgs))
    reg.alias("terminal", "bash")
    return reg
