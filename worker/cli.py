"""``toolq worker`` (added to the ``toolq`` group)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import click

from .settings import WorkerSettings

_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool}


def _settings_options(func: Any) -> Any:
    """One ``--flag`` / ``TOOLQ_*`` option per WorkerSettings field.

    Defaults stay in WorkerSettings (the options default to None = not given),
    so there is one place that says what a worker does by default.
    """
    for f in reversed(dataclasses.fields(WorkerSettings)):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        base = str(f.type).split("|")[0].strip()
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        env = meta.get("env", "TOOLQ_" + f.name.upper())
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"envvar": env, "default": None, "show_envvar": True}
        if base == "bool":
            flag = f"{flag}/--no-{flag[2:]}"
        elif base.startswith("tuple"):
            kwargs["multiple"] = True
            kwargs["default"] = ()
        else:
            kwargs["type"] = click.Choice(meta["choices"]) if "choices" in meta else _TYPES[base]
        shown = "" if default in (None, ()) else f" [default: {default}]"
        func = click.option(flag, f.name, help=meta["help"] + shown, **kwargs)(func)
    return func


@click.command("worker")
@click.option(
    "--redis-url",
    envvar="TOOLQ_REDIS_URL",
    show_envvar=True,
    help="Redis URL (redis://, rediss://, redis+cluster://) [default: an embedded Redis].",
)
@click.option(
    "--namespace",
    envvar="TOOLQ_NAMESPACE",
    show_envvar=True,
    help="Key prefix; producers must use the same. [default: toolq]",
)
@_settings_options
@click.option(
    "--log-level",
    envvar="TOOLQ_LOG_LEVEL",
    show_envvar=True,
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.pass_context
def worker(
    ctx: click.Context,
    /,
    redis_url: str | None,
    namespace: str | None,
    log_level: str,
    **opts: Any,
) -> None:
    """Run a worker until SIGTERM/SIGINT.

    Without TOOLQ_REDIS_URL it starts an embedded Redis that local `toolq`
    commands find on their own. Every flag is also a TOOLQ_* environment
    variable, named after each option below ([env var: ...]).
    """
    from .service import run_worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    obj = ctx.find_root().obj or {}
    given = {k: v for k, v in opts.items() if v is not None and v != ()}
    if "tools_modules" in given:
        given["tools_modules"] = tuple(given["tools_modules"])
    settings = WorkerSettings(
        redis_url=redis_url or obj.get("redis_url"),
        namespace=namespace or obj.get("namespace") or "toolq",
        **given,
    )
    run_worker(settings)
