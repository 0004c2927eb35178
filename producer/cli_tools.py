"""``toolq tools``: list the tools workers published."""

from __future__ import annotations

import json

import click

from .cli_common import client_of
from .tools import SPEC_FORMATS, select, tools_json


@click.command("tools")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", *SPEC_FORMATS]),
    default="table",
    show_default=True,
    help="table: one line per tool; json: the published documents; openai, anthropic, "
    "mcp: a JSON array of tool specs in that API's shape.",
)
@click.option("--only", "names", multiple=True, help="Only this tool (repeatable).")
@click.pass_context
def tools_cmd(ctx: click.Context, fmt: str, names: tuple[str, ...]) -> None:
    """List the tools workers published (run a worker first)."""
    client = client_of(ctx)
    published = client.tools()
    if not published:  # say why the list is empty: the list itself stays valid output
        click.echo(
            f"toolq: no tools published in namespace {client.keys.ns!r}: no worker has "
            "started there (start one with `toolq worker`)",
            err=True,
        )
    unknown = sorted(set(names) - {n for t in published for n in (t.name, *t.aliases)})
    if published and unknown:
        raise click.BadParameter(f"no such tool: {', '.join(unknown)}", param_hint="--only")
    tools = select(published, names or None)
    if fmt in SPEC_FORMATS:
        click.echo(json.dumps([SPEC_FORMATS[fmt](t) for t in tools], indent=2))
    elif fmt == "json":
        click.echo(tools_json(tools))
    else:
        for t in tools:
            kind = "external" if t.external else "sandbox"
            aliases = f" (aliases: {', '.join(t.aliases)})" if t.aliases else ""
            click.echo(f"{t.name:<16} {kind:<8} {t.description}{aliases}")
