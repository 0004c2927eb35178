"""``toolq upload|download`` (directories in and out of a workspace) and
``toolq snapshot take|ls|rm`` and ``toolq fork`` (workspaces saved and copied).

Uploads travel as one ``unpack`` call (a tar.gz, base64, under the worker's
entry cap); downloads as one ``archive`` call. Both refuse links and paths
that would land outside the directory they unpack into.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
from datetime import datetime, timezone

import click

from toolq.schemas import Result, SnapshotInfo, TrajectorySpec

from .cli_common import client_of
from .cli_errors import EXIT_USAGE, CliError

#: The most an upload may unpack to (the ``unpack`` tool's default ``max_bytes``).
UPLOAD_MAX_BYTES = 256 * 1024**2


def check_size(path: str, max_bytes: int = UPLOAD_MAX_BYTES) -> None:
    """Refuse a tree whose files add up to more than ``max_bytes`` (their apparent
    size, which a tar carries: a sparse file counts in full) before packing it."""
    total, largest = 0, ("", 0)
    for parent, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(parent, name)
            size = os.lstat(full).st_size
            total += size
            largest = max(largest, (full, size), key=lambda x: x[1])
            if total > max_bytes:
                raise CliError(
                    f"{path} holds more than {max_bytes} bytes (at least {total}; "
                    f"{largest[0]}: {largest[1]} bytes): an upload unpacks to at most that",
                    EXIT_USAGE,
                )


def pack_dir(path: str) -> bytes:
    """``path``'s contents as a tar.gz; a link in it is an error (uploads carry none),
    and so is a tree larger than ``UPLOAD_MAX_BYTES`` (checked before packing)."""
    check_size(path)
    buf = io.BytesIO()

    def no_links(info: tarfile.TarInfo) -> tarfile.TarInfo:
        if not (info.isfile() or info.isdir()):
            raise CliError(f"{info.name} is a link or special file; uploads carry none", EXIT_USAGE)
        return info

    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(path, arcname=".", recursive=True, filter=no_links)
    return buf.getvalue()


def unpack_here(data: bytes, dest: str) -> tuple[int, list[str]]:
    """Unpack a downloaded tar.gz into ``dest`` with tarfile's ``data`` filter: an
    entry it refuses (an absolute or escaping path or link, a device) is left out
    and named, the rest lands. Returns (entries unpacked, refused entries)."""
    if not hasattr(tarfile, "data_filter"):
        raise CliError("this Python has no tarfile data filter (3.10.12+/3.11.4+ has)")
    os.makedirs(dest, exist_ok=True)
    refused: list[str] = []

    def data_only(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            refused.append(f"{member.name} ({exc})")
            return None

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        tar.extractall(dest, filter=data_only)
    return len(members) - len(refused), refused


def _done(result: Result) -> None:
    click.echo(result.model_dump_json(exclude={"output"} if result.ok else set()))
    sys.exit(0 if result.ok else 1)


@click.command("upload")
@click.argument("traj")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "dest", default=".", show_default=True, help="Workspace directory.")
@click.pass_context
def upload(ctx: click.Context, traj: str, directory: str, dest: str) -> None:
    """Copy DIRECTORY's contents into TRAJ's workspace (one `unpack` call).

    Prints the result as JSON; exit status 1 when it failed (e.g. the archive
    passes the worker's entry cap: payload_too_large).
    """
    data = base64.b64encode(pack_dir(directory)).decode("ascii")
    client = client_of(ctx)
    client.open(traj)
    _done(client.call(traj, "unpack", {"path": dest, "data": data}))


@click.command("download")
@click.argument("traj")
@click.argument("path")
@click.option("--to", "dest", default=".", show_default=True, help="Local directory.")
@click.option("--max-bytes", type=int, default=64 * 1024 * 1024, show_default=True)
@click.pass_context
def download(ctx: click.Context, traj: str, path: str, dest: str, max_bytes: int) -> None:
    """Copy PATH (a file or directory of TRAJ's workspace) into a local directory.

    Entries that could land outside it (absolute or escaping paths and links,
    devices) are left out and named on stderr; the rest is unpacked.
    """
    result = client_of(ctx).call(traj, "archive", {"path": path, "max_bytes": max_bytes})
    if not result.ok:
        _done(result)
    entries, refused = unpack_here(base64.b64decode(result.output), dest)
    for name in refused:
        click.echo(f"toolq: left out {name}", err=True)
    shown = {"traj": traj, "path": path, "to": dest, "entries": entries, "left_out": refused}
    click.echo(json.dumps(shown))


@click.group("snapshot")
def snapshot() -> None:
    """Snapshots: a workspace's files and spec saved in Redis, to open new
    trajectories from (spec field `snapshot`)."""


@snapshot.command("take")
@click.argument("traj")
@click.argument("name")
@click.option("--ttl", "ttl_s", type=float, default=None, help="Keep it this long (s).")
@click.pass_context
def take(ctx: click.Context, traj: str, name: str, ttl_s: float | None) -> None:
    """Save TRAJ's workspace and spec as NAME, after its submitted calls."""
    _done(client_of(ctx).snapshot(traj, name, ttl_s=ttl_s))


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _row(info: SnapshotInfo) -> str:
    return (
        f"{info.name:<40} {info.source[:30]:<30} {info.bytes:>12} {info.entries:>8} "
        f"{_when(info.created_ms):<19}  {_when(info.expires_ms)}"
    )


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool) -> None:
    """List the snapshots kept: size (compressed bytes), entries, created, expires."""
    found = client_of(ctx).snapshots()
    if as_json:
        for info in found:
            click.echo(info.model_dump_json())
        return
    head = f"{'NAME':<40} {'SOURCE':<30} {'BYTES':>12} {'ENTRIES':>8} {'CREATED (UTC)':<19}"
    click.echo(f"{head}  EXPIRES (UTC)")
    for info in found:
        click.echo(_row(info))


@snapshot.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Delete snapshots; exit status 1 when one of them did not exist."""
    client = client_of(ctx)
    missing = [name for name in names if not client.delete_snapshot(name)]
    if missing:
        raise CliError(f"no snapshot named {', '.join(missing)}")


@click.command("fork")
@click.argument("traj")
@click.argument("new_ids", nargs=-1, required=True)
@click.option("--spec", "spec_json", default=None, help="Spec (JSON) over the source's.")
@click.option("--ttl", "ttl_s", type=float, default=None, help="Keep the snapshot this long.")
@click.pass_context
def fork(
    ctx: click.Context,
    traj: str,
    new_ids: tuple[str, ...],
    spec_json: str | None,
    ttl_s: float | None,
) -> None:
    """Open NEW_IDS as copies of TRAJ's workspace and spec (a snapshot, then opens)."""
    spec = TrajectorySpec.model_validate_json(spec_json) if spec_json else None
    taken = client_of(ctx).fork(traj, list(new_ids), spec, ttl_s=ttl_s)
    click.echo(json.dumps({"snapshot": (taken.data or {}).get("name"), "opened": list(new_ids)}))
