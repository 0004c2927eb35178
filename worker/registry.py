"""Registering tools: the ``@tool`` decorator, tool modules, publishing to Redis.

A tools module is a plain Python module named on the command line
(``toolq worker --tools mypkg.tools`` and ``toolq rq-worker --tools mypkg.tools``)::

    from pydantic import Field
    from toolq.worker import ToolArgs, tool

    class WeatherArgs(ToolArgs):
        city: str = Field(description="City name.")

    @tool("weather", args=WeatherArgs, timeout_s=10, retries=2)
    def weather(city: str) -> dict:
        \"\"\"Current weather for a city.\"\"\"
        return {"city": city, "temp_c": 21}

Loading scans the module for decorated functions and calls its optional
``toolq_register(registry)`` hook (for aliases, e.g. ``registry.alias("shell_exec",
"bash")``). The built-in sandbox tools are in every registry; a loaded registry
is the only way a name becomes runnable: nothing in a stream names an import path.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from pydantic import BaseModel, create_model
from redis.asyncio import Redis

from toolq.schemas import Keys, ToolInfo

from .tools import Registry, Tool, ToolArgs, builtin_registry

F = TypeVar("F", bound=Callable[..., Any])

# OpenAI function names allow these only; a tool must be callable by a model.
TOOL_NAME_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
_MARK = "__toolq_tool__"
_HOOK = "toolq_register"


class ToolDefinitionError(ValueError):
    """A tool or tools module is declared wrongly (bad name, duplicate, no description)."""


@dataclass(frozen=True)
class ToolDecl:
    """What ``@tool`` attaches to a function: the tool and its extra names."""

    tool: Tool
    aliases: tuple[str, ...] = ()


def tool(
    name: str | None = None,
    description: str | None = None,
    *,
    args: type[BaseModel] | None = None,
    external: bool = True,
    timeout_s: float = 60.0,
    retries: int = 0,
    retry_interval_s: int = 0,
    queue: str = "toolq",
    aliases: Iterable[str] = (),
) -> Callable[[F], F]:
    """Declare a Python function as an external tool, run as an RQ job.

    ``name`` defaults to the function's name, ``description`` to its docstring,
    ``args`` to a model built from its signature. The function is called with
    the validated arguments as keyword arguments; it returns a ``str`` (the
    output), a ``dict`` or pydantic model (``data``, and its JSON as output) or
    ``None``; an exception is an error result. ``timeout_s`` and ``retries``
    (with ``retry_interval_s`` between attempts) are the RQ job's.
    """
    if not external:
        raise ToolDefinitionError(
            "a Python function is always an external tool: sandbox tools are "
            "implemented by the in-sandbox agent"
        )

    def decorate(func: F) -> F:
        tool_name = name or func.__name__
        doc = description or _first_paragraph(inspect.getdoc(func))
        model = args or model_from_signature(tool_name, func)
        decl = ToolDecl(
            Tool(
                tool_name,
                doc,
                model,
                func=func,
                timeout_s=timeout_s,
                retries=retries,
                retry_interval_s=retry_interval_s,
                queue=queue,
            ),
            tuple(aliases),
        )
        check_decl(decl)
        setattr(func, _MARK, decl)
        return func

    return decorate


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n", 1)[0].replace("\n", " ").strip()


def model_from_signature(tool_name: str, func: Callable[..., Any]) -> type[BaseModel]:
    """An argument model from a function's parameters (annotations and defaults)."""
    hints = get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue  # *args / **kwargs cannot be described by a schema
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    model_name = "".join(p.capitalize() for p in re.split(r"[_-]", tool_name)) + "Args"
    return create_model(model_name, __base__=ToolArgs, **fields)


def check_decl(decl: ToolDecl) -> None:
    """Refuse names a model cannot call, tools without a description, bad settings."""
    t = decl.tool
    for name in (t.name, *decl.aliases):
        if not TOOL_NAME_RE.match(name):
            raise ToolDefinitionError(f"tool name {name!r} must match {TOOL_NAME_RE.pattern}")
    if not t.description:
        raise ToolDefinitionError(f"tool {t.name!r} needs a description (argument or docstring)")
    if t.timeout_s <= 0 or t.retries < 0 or t.retry_interval_s < 0:
        raise ToolDefinitionError(f"tool {t.name!r}: timeout_s > 0, retries >= 0 please")


# ------------------------------------------------------------------ loading
def load_registry(modules: Iterable[str] = ()) -> Registry:
    """The built-in sandbox tools plus every tool the named modules declare."""
    registry = builtin_registry()
    for module in modules:
        add_module(registry, module)
    return registry


def add_module(registry: Registry, module_name: str) -> int:
    """Import a tools module and register its tools; returns how many it added."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolDefinitionError(f"cannot import tools module {module_name!r}: {exc}") from exc
    before = len(registry.tools) + len(registry.aliases)
    for decl in _decls_of(module):
        add_decl(registry, decl)
    hook = getattr(module, _HOOK, None)
    if callable(hook):
        hook(registry)
    added = len(registry.tools) + len(registry.aliases) - before
    if added == 0:
        raise ToolDefinitionError(
            f"tools module {module_name!r} registers nothing: decorate functions with "
            f"@toolq.worker.tool or define {_HOOK}(registry)"
        )
    return added


def _decls_of(module: Any) -> list[ToolDecl]:
    found: dict[str, ToolDecl] = {}  # a function exported under two names counts once
    for value in vars(module).values():
        decl = getattr(value, _MARK, None) if callable(value) else None
        if isinstance(decl, ToolDecl):
            found[decl.tool.name] = decl
    return list(found.values())


def add_decl(registry: Registry, decl: ToolDecl) -> None:
    """Register one declared tool; a name already taken by another tool is an error."""
    for name in (decl.tool.name, *decl.aliases):
        taken = registry.resolve(name)
        if taken is not None and taken.func is not decl.tool.func:
            raise ToolDefinitionError(f"tool name {name!r} is already registered")
    registry.register(decl.tool)
    for alias in decl.aliases:
        registry.alias(alias, decl.tool.name)


# --------------------------------------------------------------- publishing
def tool_infos(registry: Registry) -> list[ToolInfo]:
    """How the registry's tools are described to clients (``<ns>:tools``)."""
    aliases: dict[str, list[str]] = {}
    for alias, target in registry.aliases.items():
        aliases.setdefault(target, []).append(alias)
    return [
        ToolInfo(
            name=t.name,
            description=t.description,
            parameters=t.json_schema(),
            external=t.external,
            aliases=sorted(aliases.get(t.name, [])),
        )
        for t in sorted(registry.tools.values(), key=lambda t: t.name)
    ]


async def publish_registry(redis: Redis, keys: Keys, registry: Registry) -> None:
    """Write every tool to ``<ns>:tools`` (workers with other tools add theirs)."""
    docs = {i.name: i.model_dump_json() for i in tool_infos(registry)}
    if docs:
        await redis.hset(keys.tools, mapping=docs)  # type: ignore[arg-type]
