"""What the ``toolq`` commands share: the client of a command's context, and the
spec and JSON arguments they parse. It imports no command module, so that each
of them (``cli.py``, ``cli_*.py``) can import it."""

from __future__ import annotations

import json
from typing import Any

import click

from toolq.schemas import Limits, TrajectorySpec

from .cli_errors import EXIT_USAGE, CliError
from .client import Client
from .liveness import workers_alive_op


def json_arg(value: str, what: str) -> Any:
    """``value`` parsed as JSON; a usage error naming ``what`` when it is not."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:  # bad JSON, a 5,000-digit number, deep nesting
        raise click.UsageError(f"{what} is not valid JSON: {exc}") from None


def client_of(ctx: click.Context) -> Client:
    """The command's client (one per invocation), for ``--redis-url`` and ``--namespace``."""
    obj = ctx.ensure_object(dict)
    if "client" not in obj:
        # A command gives up on an unreachable Redis after a few seconds (exit 3).
        obj["client"] = Client(obj.get("redis_url"), obj.get("namespace", "toolq"), retries=2)
    client: Client = obj["client"]
    return client


def spec_of(spec_json: str) -> TrajectorySpec:
    """A spec from the command line: a field it does not know is a typo, named."""
    data = json_arg(spec_json, "--spec")
    if not isinstance(data, dict):
        raise click.UsageError("--spec must be a JSON object")
    unknown = sorted(set(data) - set(TrajectorySpec.model_fields))
    limits = data.get("limits")
    if isinstance(limits, dict):
        unknown += sorted(f"limits.{k}" for k in set(limits) - set(Limits.model_fields))
    if unknown:
        raise CliError(f"unknown spec field(s): {', '.join(unknown)}", EXIT_USAGE)
    return TrajectorySpec.model_validate(data)


def workers_alive(client: Client) -> bool:
    """Has any worker of the namespace beaten within the last 30 s (Redis's clock)?"""
    return client._drive(workers_alive_op(client.keys))
