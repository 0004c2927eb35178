"""Child trajectories: a spec that names a parent (sans-IO ops, like ``ops``), and
the two operations every trajectory goes through that may reach its family:
``open_traj`` (a child when its spec names a parent) and ``cancel`` (its open
children too). This module builds on ``ops``, which never imports it.

On a Redis Cluster a parent and its child live on different hash slots, so no
script can touch both. The parent's slot holds the atomic check: its children
hash (``Keys.children``) has a place per open child, which ``RESERVE_CHILD``
takes only when the parent is open, not being cancelled, not at its
``max_depth`` and below its ``max_children``. The child's own record is
written afterwards, on its slot.

A cancel of the parent races an open of a child; the order of the steps
decides it either way. Cancel runs the cancel script on the parent (which
makes later reservations fail), then cancels the children it finds in the
hash. An open reserves, creates the child's record, then reads the parent
again: if the parent's cancel came after the reservation, either the cancel
found the child's record, or this last read sees the parent cancelled and the
opener cancels the child itself.
"""

from __future__ import annotations

from typing import Any

from toolq.schemas import (
    FINAL_STATUSES,
    Keys,
    TrajectoryRecord,
    TrajectorySpec,
    check_traj_id,
    lua,
)

from .ops import (
    Cmd,
    LimitExceeded,
    Op,
    UnknownTrajectory,
    cancel_each,
    lineage,
    now_ms,
    one,
    open_record,
    s,
    script,
)
from .ops import select_runs as _select_runs

#: A place reserved this long ago for a child that has no record yet is a
#: crashed opener's: the next open frees it.
ORPHAN_AFTER_MS = 60_000


def open_traj(
    keys: Keys,
    traj_id: str,
    spec: TrajectorySpec | None,
    reuse: bool,
    prefer: tuple[str, int] | None = None,
) -> Op[str]:
    """Create the record and enqueue the open request (again, if an earlier
    open died in between). Returns the status (``new`` when just created).

    ``prefer`` (worker id, ms): a fork's copy, for that worker first (see
    ``OpenRequest.prefer``). A spec that names a parent opens a child
    (``open_child``): raises ``LimitExceeded`` when the parent refuses it."""
    check_traj_id(traj_id)
    spec = spec or TrajectorySpec()
    if spec.parent is not None:
        return (yield from open_child(keys, traj_id, spec, reuse))
    extra = lineage(spec, 0, None)
    return (yield from open_record(keys, traj_id, spec, reuse, extra, prefer))


def open_child(keys: Keys, traj_id: str, spec: TrajectorySpec, reuse: bool) -> Op[str]:
    """Open ``traj_id`` as a child of ``spec.parent``; returns its status, or raises
    ``LimitExceeded`` (nothing created) when the parent refuses it."""
    parent = spec.parent
    assert parent is not None
    yield from prune(keys, parent)
    depth, parent_max_depth = yield from reserve(keys, parent, traj_id)
    status = yield from open_record(
        keys, traj_id, spec, reuse, lineage(spec, depth, parent_max_depth)
    )
    yield from recheck_parent(keys, parent, traj_id)
    return status


def prune(keys: Keys, parent: str) -> Op[None]:
    """Free the places of children that have ended, or whose opener died before
    it created their record (reserved over ``ORPHAN_AFTER_MS`` ago)."""
    reserved = yield from one(Cmd("hgetall", (keys.children(parent),)))
    if not reserved:
        return
    since_ms = {s(child): int(s(at)) for child, at in reserved.items()}
    statuses = yield [Cmd("hget", (keys.traj(child), "status")) for child in since_ms]
    cutoff_ms = now_ms() - ORPHAN_AFTER_MS
    gone = [
        child
        for (child, at_ms), status in zip(since_ms.items(), statuses, strict=True)
        if (s(status) in FINAL_STATUSES if status is not None else at_ms < cutoff_ms)
    ]
    if gone:
        yield [Cmd("hdel", (keys.children(parent), *gone))]


def reserve(keys: Keys, parent: str, child: str) -> Op[tuple[int, int]]:
    """RESERVE_CHILD: the child's depth and the parent's effective max_depth."""
    argv = [child, now_ms()]
    reply = yield from one(script(lua.RESERVE_CHILD, _parent_keys(keys, parent), argv))
    if s(reply[0]) != "ok":
        raise LimitExceeded(s(reply[1]))
    return int(reply[1]), int(reply[2])


def recheck_parent(keys: Keys, parent: str, child: str) -> Op[None]:
    """Cancel the child just opened when its parent was cancelled or ended since
    the reservation (a cascading cancel may have looked before its record existed)."""
    status, cancelling = yield from one(
        Cmd("hmget", (keys.traj(parent), "status", "cancel_requested_ms"))
    )
    ended = status is None or s(status) in FINAL_STATUSES
    if not ended and cancelling is None:
        return
    yield from cancel_tree(keys, [child])
    why = "is being cancelled" if not ended else f"has ended ({s(status) if status else 'expired'})"
    raise LimitExceeded(f"parent {parent} {why} while {child} was opening; {child} is cancelled")


def cancel(keys: Keys, traj_id: str) -> Op[str]:
    """The cancel script, then the same for its open children (and theirs);
    returns 'requested', 'cancelled' or 'ended'."""
    check_traj_id(traj_id)
    (outcome,) = yield from cancel_each(keys, [traj_id])
    if outcome == "unknown":
        raise UnknownTrajectory(f"no trajectory {traj_id}")
    if outcome == "cancelled":
        yield [Cmd("zrem", (keys.pending, traj_id))]
    yield from cancel_children(keys, traj_id)
    return outcome


def cancel_children(keys: Keys, traj_id: str) -> Op[None]:
    """Cancel the open children of a trajectory (and theirs, all the way down):
    those never opened or ended already are skipped."""
    kids = yield from one(Cmd("hkeys", (keys.children(traj_id),)))
    yield from cancel_tree(keys, [s(k) for k in kids], seen={traj_id})


def cancel_tree(keys: Keys, roots: list[str], seen: set[str] | None = None) -> Op[None]:
    """Cancel ``roots`` and their descendants, one round trip per generation."""
    seen = set(seen or ()) | set(roots)
    generation = roots
    while generation:
        outcomes = yield from cancel_each(keys, generation)
        by_outcome = dict(zip(generation, outcomes, strict=True))
        done = [t for t, o in by_outcome.items() if o == "cancelled"]
        if done:
            yield [Cmd("zrem", (keys.pending, *done))]
        known = [t for t, o in by_outcome.items() if o != "unknown"]
        kids = yield [Cmd("hkeys", (keys.children(t),)) for t in known] if known else []
        generation = [s(k) for found in kids for k in found if s(k) not in seen]
        seen.update(generation)


def child_runs(
    keys: Keys, parent: str, status: str | None, labels: dict[str, str], limit: int
) -> Op[list[TrajectoryRecord]]:
    """A parent's children that hold a place (open, or ended and not pruned yet),
    newest first, by status and labels."""
    ids: list[Any] = yield from one(Cmd("hkeys", (keys.children(parent),)))
    if not ids:
        return []
    records = yield [Cmd("hgetall", (keys.traj(s(t)),)) for t in ids]
    found, _never_opened = _select_runs(ids, records, status, labels)
    found.sort(key=lambda rec: rec.created_ms or 0, reverse=True)
    return found[:limit]


def _parent_keys(keys: Keys, parent: str) -> list[str]:
    return [keys.traj(parent), keys.children(parent)]
