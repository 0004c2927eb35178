"""Every Redis key toolq uses, in one place.

Keys of one trajectory carry the trajectory id inside a Redis Cluster hash tag
(``{T}``), so all of a trajectory's keys live on one cluster slot and can be
written atomically by one Lua script or MULTI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Consumer group every stream toolq reads with XREADGROUP uses.
GROUP = "workers"

TRAJ_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
_TRAJ_ID_RE = re.compile(rf"\A{TRAJ_ID_PATTERN}\Z")
_PART_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,200}\Z")

#: Upper bounds (ms) of the call-latency buckets in ``Keys.minute_stats``: field
#: ``lat_ms:<bound>`` counts the minute's calls whose latency (``queued_ms`` +
#: ``run_ms``) was above the previous bound and at most this one; ``lat_ms:inf``
#: counts the slower ones. Counts are per bucket, not cumulative.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000)


def latency_field(latency_ms: float) -> str:
    """The ``minute_stats`` field that counts a call of this latency."""
    for bound in LATENCY_BUCKETS_MS:
        if latency_ms <= bound:
            return f"lat_ms:{bound}"
    return "lat_ms:inf"


class InvalidIdError(ValueError):
    """An id that would break key naming (or is simply not allowed)."""


#: An invalid id is quoted in its error up to this many characters.
QUOTED_ID_MAX_CHARS = 100


def _quoted(value: object) -> str:
    text = repr(value)
    if len(text) <= QUOTED_ID_MAX_CHARS:
        return text
    return f"{text[:QUOTED_ID_MAX_CHARS]}... ({len(text) - QUOTED_ID_MAX_CHARS} chars cut)"


def check_traj_id(traj_id: str) -> str:
    """Return ``traj_id`` if it matches ``[A-Za-z0-9._:-]{1,128}``, else raise."""
    if not isinstance(traj_id, str) or not _TRAJ_ID_RE.match(traj_id):
        raise InvalidIdError(
            f"invalid trajectory id {_quoted(traj_id)}: must match {TRAJ_ID_PATTERN}"
        )
    return traj_id


def check_part(value: str, what: str = "id") -> str:
    """Check a call id, task id or worker id used inside a key."""
    if not isinstance(value, str) or not _PART_RE.match(value):
        pattern = "[A-Za-z0-9._:-]{1,200}"
        raise InvalidIdError(f"invalid {what} {_quoted(value)}: must match {pattern}")
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def stream_call_id(fields: Mapping[Any, Any], entry_id: Any) -> str | None:
    """The id a calls-stream entry is answered under, as the scripts' ``call_id_of``
    names it: its ``call_id`` when that is a valid id, else its entry id; None for
    a control entry (close, cancel), which gets no result. ``fields`` as a Redis
    client parses an entry (str or bytes)."""
    flat = {_text(k): _text(v) for k, v in fields.items()}
    if flat.get("type") in ("close", "cancel"):
        return None
    call_id = flat.get("call_id")
    if call_id is not None and _PART_RE.match(call_id):
        return call_id
    return _text(entry_id)


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace (default ``toolq``)."""

    ns: str = "toolq"

    # -- global keys ------------------------------------------------------
    @property
    def open(self) -> str:
        """Stream (group ``workers``): requests to open trajectories."""
        return f"{self.ns}:open"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> last heartbeat (unix ms)."""
        return f"{self.ns}:workers"

    def worker(self, worker_id: str) -> str:
        """Hash: one worker's capacity, usage, backend, version."""
        return f"{self.ns}:worker:{worker_id}"

    def worker_trajs(self, worker_id: str) -> str:
        """Set: trajectories a worker owns, so that a survivor can take them over."""
        return f"{self.ns}:worker:{worker_id}:trajs"

    def worker_inbox(self, worker_id: str) -> str:
        """List, short TTL: open requests (JSON) of fork copies meant for this worker,
        which holds their snapshot's files; copies of the ones on ``open`` (the worker
        claims whichever it reads first, the other is a duplicate)."""
        return f"{self.ns}:worker:{worker_id}:inbox"

    def worker_images(self, worker_id: str) -> str:
        """Hash, TTL: the images a worker's engine holds (``held``) or is pulling
        (``pulling``), image reference -> state; rewritten by the worker as that
        changes (``worker/images.py``), so an open goes first to a holder."""
        return f"{self.ns}:worker:{worker_id}:images"

    def engine_images(self, engine_id: str) -> str:
        """Hash: task images toolq put on one Docker engine (pulled, or started a
        container of) -> when last used (unix ms); the image budget removes the least
        recently used of these, and only these (``worker/image_budget.py``)."""
        return f"{self.ns}:engine:{engine_id}:images"

    @property
    def tools(self) -> str:
        """Hash: tool name -> JSON document describing the tool."""
        return f"{self.ns}:tools"

    def external_done(self, worker_id: str) -> str:
        """List: completion notices of one worker's external (RQ) tool calls."""
        return f"{self.ns}:xdone:{worker_id}"

    @property
    def dead(self) -> str:
        """Stream: entries that could not be processed, with the reason."""
        return f"{self.ns}:dead"

    @property
    def runs(self) -> str:
        """Sorted set: trajectory id -> created time (unix ms), for listing runs."""
        return f"{self.ns}:runs"

    @property
    def pending(self) -> str:
        """Sorted set: trajectory id -> open time (unix ms) while it waits for a slot."""
        return f"{self.ns}:pending"

    def minute_stats(self, minute: int) -> str:
        """Hash, 2 h TTL: calls answered in one unix minute (``calls``, ``failed``,
        ``error:<code>``, ``lat_ms:<bound>``: see ``LATENCY_BUCKETS_MS``), summed over
        workers; ``toolq status`` reads it."""
        return f"{self.ns}:stats:{minute}"

    @property
    def snapshots(self) -> str:
        """Hash: snapshot name -> its ``SnapshotInfo`` as JSON (expired ones are
        pruned by whoever lists them)."""
        return f"{self.ns}:snapshots"

    def snapshot_data(self, name: str) -> str:
        """String with TTL: a snapshot's workspace files, a tar.gz."""
        return f"{self.ns}:snap:{{{name}}}"

    def snapshot_writing(self, name: str) -> str:
        """String with TTL, while a fork's snapshot is written after its result: its
        copies on other workers wait for the index entry while this exists."""
        return f"{self.ns}:snapwriting:{{{name}}}"

    # -- per-trajectory keys (hash-tagged) ---------------------------------
    def traj(self, traj_id: str) -> str:
        """Hash: the trajectory record (status, owner, slot, times, counts, spec)."""
        return f"{self.ns}:{{{traj_id}}}"

    def calls(self, traj_id: str) -> str:
        """Stream (group ``workers``): tool calls and control entries, in order."""
        return f"{self.ns}:{{{traj_id}}}:calls"

    def events(self, traj_id: str) -> str:
        """Stream, capped: result and background-task notifications."""
        return f"{self.ns}:{{{traj_id}}}:events"

    def result(self, traj_id: str, call_id: str) -> str:
        """Hash with TTL: one call's final result."""
        return f"{self.ns}:{{{traj_id}}}:result:{call_id}"

    def staged_output(self, traj_id: str, call_id: str, worker_id: str) -> str:
        """Hash with TTL: a large output on its way into its result hash, which the
        worker's FINISH script renames it to (named per worker: a worker fenced
        off mid-write must not stage over its successor's)."""
        return f"{self.ns}:{{{traj_id}}}:staged:{call_id}:{worker_id}"

    def bg(self, traj_id: str, task_id: str) -> str:
        """Hash: one background task's state and output tails."""
        return f"{self.ns}:{{{traj_id}}}:bg:{task_id}"

    def bg_index(self, traj_id: str) -> str:
        """Sorted set: the trajectory's background task ids -> start time (ms)."""
        return f"{self.ns}:{{{traj_id}}}:bg"

    def children(self, traj_id: str) -> str:
        """Hash: the trajectory's child ids -> when each was reserved (unix ms); its
        open children (ended ones are pruned by the next child's open)."""
        return f"{self.ns}:{{{traj_id}}}:children"

    def wake(self, reader: str, tag: str = "") -> str:
        """Stream: wakes one blocked reader (a worker's call reader, a client's event
        reader) when what it should read changes. ``tag`` puts it in the hash slot
        of the streams it is read with (``{tag}``) on Redis Cluster."""
        return f"{self.ns}:{{{tag}}}:wake:{reader}" if tag else f"{self.ns}:wake:{reader}"

    def traj_pattern(self) -> str:
        """SCAN pattern that matches every trajectory record hash."""
        return f"{self.ns}:{{*}}"
