"""Snapshots and forks, as sans-IO operations the sync and async clients drive.

A snapshot is a ``snapshot`` entry in the trajectory's calls stream: it runs
after the calls submitted before it, and its result says what was saved (or
why not). Forking takes a snapshot and opens each new trajectory from it.
"""

from __future__ import annotations

import time
import uuid

from toolq.schemas import (
    CallEntry,
    Keys,
    Result,
    SnapshotArgs,
    SnapshotInfo,
    TrajectorySpec,
    check_traj_id,
)

from . import children, ops
from .drive import await_op
from .ops import Cmd, Op, ToolqError


class SnapshotFailed(ToolqError):
    """A snapshot was not taken (its result, ``result``, says why)."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"snapshot failed: {result.error_code}: {result.error}")
        self.result = result


#: How long other workers leave a fork's copies to the worker that took its
#: snapshot (it copies the files in-host; see ``OpenRequest.prefer``). That worker
#: claims at once when it has room; a dead or full one costs the copies this wait.
PREFER_SOURCE_MS = 2000


def snapshot_entry(name: str, ttl_s: float | None, copies: int | None = None) -> CallEntry:
    """The entry that saves the workspace and spec under ``name`` (``copies``: a
    fork's, that many copies open next)."""
    args = SnapshotArgs(name=name, ttl_s=ttl_s, copies=copies).model_dump(exclude_none=True)
    # Idempotent: taken again (same name, same files) when its worker died mid-way.
    return CallEntry(type="snapshot", args=args, call_id=ops.new_call_id(), idempotent=True)


def take_op(
    keys: Keys,
    traj_id: str,
    name: str,
    ttl_s: float | None,
    wait_s: float,
    cluster: bool,
    copies: int | None = None,
) -> Op[Result]:
    """Submit a snapshot entry and wait for its result."""
    done = yield from ops.submit(keys, traj_id, snapshot_entry(name, ttl_s, copies))
    return (yield from await_op(keys, [done], wait_s, False, cluster))[0]


def fork_name(traj_id: str) -> str:
    return f"{traj_id[:100]}.fork-{uuid.uuid4().hex[:12]}"


def fork_op(
    keys: Keys,
    traj_id: str,
    new_ids: list[str],
    spec: TrajectorySpec | None,
    ttl_s: float | None,
    wait_s: float,
    cluster: bool,
) -> Op[Result]:
    """Snapshot ``traj_id``, then open each of ``new_ids`` from it; the snapshot's
    result. Raises ``SnapshotFailed`` (nothing opened) when it was not taken.

    The copies' open requests prefer the worker that took the snapshot (it holds
    the files: an in-host copy, no Redis read); others claim them after
    ``PREFER_SOURCE_MS``, so a copy opens even when that worker is full or dead."""
    for new_id in new_ids:
        check_traj_id(new_id)
    in_use = yield [Cmd("exists", (keys.traj(new_id),)) for new_id in new_ids]
    taken_ids = [new_id for new_id, used in zip(new_ids, in_use, strict=True) if used]
    if taken_ids:  # a copy must be a new trajectory, not one that exists already
        raise ToolqError(f"cannot fork into trajectories that exist: {', '.join(taken_ids)}")
    record = yield from ops.get_record(keys, traj_id)
    if record is None:
        raise ops.UnknownTrajectory(f"no trajectory {traj_id}: nothing to fork")
    name = fork_name(traj_id)
    taken = yield from take_op(keys, traj_id, name, ttl_s, wait_s, cluster, len(new_ids) or None)
    if not taken.ok:
        raise SnapshotFailed(taken)
    name = str((taken.data or {})["name"])
    holder = str((taken.data or {}).get("worker") or "") or None
    start = (spec or TrajectorySpec()).model_copy(update={"snapshot": name})
    prefer = (holder, PREFER_SOURCE_MS) if holder else None
    for new_id in new_ids:
        if (yield from children.open_traj(keys, new_id, start, False, prefer)) != "new":
            raise ToolqError(f"{new_id} was opened by someone else while the fork ran")
    return taken


def list_op(keys: Keys) -> Op[list[SnapshotInfo]]:
    """The snapshots kept, oldest first (expired ones left out)."""
    raw = yield from ops.one(Cmd("hgetall", (keys.snapshots,)))
    now_ms = time.time() * 1000
    found = []
    for value in (raw or {}).values():
        try:
            info = SnapshotInfo.model_validate_json(value)
        except ValueError:
            continue
        if info.expires_ms > now_ms:
            found.append(info)
    # An index entry whose files are gone (deleted by hand, evicted) is no snapshot.
    exist = (yield [Cmd("exists", (keys.snapshot_data(i.name),)) for i in found]) if found else []
    kept = [info for info, there in zip(found, exist, strict=True) if there]
    return sorted(kept, key=lambda i: (i.created_ms, i.name))


def delete_op(keys: Keys, name: str) -> Op[bool]:
    """Delete a snapshot; False when there was none of that name."""
    replies = yield [
        Cmd("delete", (keys.snapshot_data(name),)),
        Cmd("hdel", (keys.snapshots, name)),
        # a fork's still being written: not kept once written (lua.SNAPSHOT_KEPT)
        Cmd("delete", (keys.snapshot_writing(name),)),
    ]
    return bool(replies[0] or replies[1] or replies[2])
