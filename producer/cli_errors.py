"""How the ``toolq`` command fails: one line, a documented exit status.

| status | meaning |
|--:|---|
| 0 | done (for ``call``: the tool succeeded) |
| 1 | the tool failed, what was asked for does not exist, or a limit refused it |
| 2 | usage: a bad option, argument, URL or spec field (named) |
| 3 | infrastructure: Redis or the Docker engine cannot be reached |
| 124 | a wait timed out |
| 130 | interrupted (Ctrl-C); ``call`` says how to get the result of the call it left running |

Errors print as ``Error: ...`` on stderr without a traceback; ``toolq --debug``
(or ``TOOLQ_DEBUG=1``) prints the traceback too, with the same exit status.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click
from pydantic import ValidationError
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import InvalidIdError

from .config import NoRedisError
from .ops import ToolqError, WaitTimeout

EXIT_FAILED, EXIT_USAGE, EXIT_INFRA, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 124, 130


class CliError(click.ClickException):
    """A one-line error with its exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        # An instance attribute as click reads it; click >= 8.5 declares the class's
        # a ClassVar, which mypy will not let an instance assign.
        vars(self)["exit_code"] = exit_code


def classify(exc: BaseException) -> CliError | None:
    """The one-line error for an exception, or None for one that is a bug."""
    if isinstance(exc, WaitTimeout):
        return CliError(str(exc), EXIT_TIMEOUT)
    if isinstance(exc, (InvalidIdError, NoRedisError)):
        return CliError(str(exc), EXIT_USAGE)
    if isinstance(exc, ValidationError):
        return CliError(validation_message(exc), EXIT_USAGE)
    if isinstance(exc, ToolqError):
        return CliError(str(exc), EXIT_FAILED)
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, AuthenticationError)):
        return CliError(f"cannot reach Redis: {exc}", EXIT_INFRA)
    if isinstance(exc, ResponseError) and "DB index" in str(exc):  # redis://host/99
        return CliError(f"bad Redis URL: {exc} (the /N after the host)", EXIT_USAGE)
    if isinstance(exc, RedisError):
        return CliError(f"Redis refused: {exc}", EXIT_INFRA)
    if _is_docker_error(exc):
        return CliError(f"cannot use the Docker engine: {exc}", EXIT_INFRA)
    if isinstance(exc, ValueError) and "redis" in str(exc).lower():  # a URL redis-py refused
        return CliError(str(exc), EXIT_USAGE)
    return None


def validation_message(exc: ValidationError) -> str:
    """``field.path: problem`` for each error, on one line."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or exc.title
        parts.append(f"{where}: {err['msg']}")
    return f"invalid {exc.title}: " + "; ".join(parts)


def _is_docker_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith("docker.") or "DockerException" in type(exc).__name__


class ToolqGroup(click.Group):
    """A click group whose commands fail with one line and a documented status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("toolq: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            debug = bool(ctx.obj and ctx.obj.get("debug"))
            if debug:  # the traceback, then the same line and status as without --debug
                traceback.print_exc()
            found = classify(exc)
            if found is not None:
                raise found from None
            hint = "" if debug else " (run with --debug for details)"
            click.echo(f"Error: unexpected {type(exc).__name__}: {exc}{hint}", err=True)
            sys.exit(EXIT_FAILED)
