"""Waiting for results: one blocking read over the events streams of many waits.

A worker appends ``{type: result, call_id, result?}`` to ``<ns>:{T}:events``
when it writes a call's result; small results ride inline. ``WaitSet`` is the
pure part: which streams to read from which cursors, and what an ``XREAD``
reply resolves. ``wait_op`` drives it for the sync client (one ``XREAD`` over
all the streams a caller waits on); ``hub.EventHub`` drives it for the asyncio
client: one background reader serves every concurrent wait of the client. A
read may not span hash slots on Redis Cluster, so there the streams are read
in groups, one per slot. A wait that joins a blocked read ends it by adding
to the reader's *wake stream* (``Keys.wake``, in the group's slot), which the
read includes, unless the read covers its trajectory already: the asyncio
client keeps a trajectory in its reads for ``LINGER_S`` after its last wait
ended, so an agent loop's next call needs no wake.

Streams are read from the submit's entry id onwards, so no event of the call
can be missed; and every ``LOOK_EVERY_MS`` the result hashes of what is still
awaited are looked at, in case an event was trimmed away.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot

from toolq.schemas import Keys, Result

from .ops import Cmd, Op, UnknownTrajectory, WaitTimeout, result_of, s

Call = tuple[str, str]  # (trajectory id, call id)
#: Longest single blocking read: then result hashes are looked at directly.
LOOK_EVERY_MS = 2000
MAX_U64 = 2**64 - 1
WAKE_TTL_MS = 3600 * 1000  # a gone client's wake streams expire
#: How long the asyncio client reads a trajectory's events after its last wait
#: ended, and at most how many such trajectories: waking a blocked read for each
#: new call cost 3 commands and a read more per call at 16 trajectories.
LINGER_S = 5.0
LINGER_MAX = 1024


def cursor_before(entry_id: str) -> str:
    """An events cursor that sees every event written after entry ``entry_id``.

    Event ids of the same millisecond may sort before the entry's own, so the
    cursor is the end of the previous millisecond (a few older events may be
    read; they are ignored).
    """
    ms = int(entry_id.split("-", 1)[0] or 0)
    return f"{max(ms - 1, 0)}-{MAX_U64}"


def event_field(fields: dict[Any, Any], name: str) -> str:
    return s(fields.get(name.encode(), fields.get(name, b"")))


def inline_result(raw: Any) -> Result | None:
    """The result carried by a result event, if it carries one this client can read."""
    if not raw:
        return None
    try:
        import json

        return Result.from_fields(json.loads(raw))
    except ValueError:  # not what this client understands: read the hash instead
        return None


@dataclass
class WaitSet:
    """Calls being waited for, the events cursor of each of their trajectories."""

    keys: Keys
    cluster: bool = False
    cursors: dict[str, str] = field(default_factory=dict)  # trajectory -> events cursor
    pending: dict[Call, bool] = field(default_factory=dict)
    # Seconds a trajectory stays read after its last wait ended (0: not at all),
    # and those that do, oldest first: trajectory -> until (monotonic).
    linger_s: float = 0.0
    lingering: dict[str, float] = field(default_factory=dict)
    # When to look at the result hashes of what is still awaited (monotonic).
    look_at: float = field(default_factory=lambda: time.monotonic() + LOOK_EVERY_MS / 1000)

    def add(self, traj_id: str, call_id: str, cursor: str) -> None:
        self.pending[(traj_id, call_id)] = True
        self.lingering.pop(traj_id, None)
        known = self.cursors.get(traj_id)
        if known is None or entry_key(cursor) < entry_key(known):
            self.cursors[traj_id] = cursor

    def discard(self, call: Call) -> None:
        self.pending.pop(call, None)
        if not any(t == call[0] for t, _ in self.pending):
            if self.linger_s > 0 and call[0] in self.cursors:
                self.lingering.pop(call[0], None)  # (to the end: the dict is oldest first)
                self.lingering[call[0]] = time.monotonic() + self.linger_s
            else:
                self.cursors.pop(call[0], None)

    def streams(self) -> dict[str, str]:
        self._expire()
        return {self.keys.events(t): c for t, c in self.cursors.items()}

    def _expire(self) -> None:
        """Stop reading the trajectories that lingered long enough (or too many)."""
        now = time.monotonic()
        for traj_id, until in list(self.lingering.items()):
            if until > now and len(self.lingering) <= LINGER_MAX:
                break
            del self.lingering[traj_id]
            self.cursors.pop(traj_id, None)

    def groups(self) -> list[dict[str, str]]:
        """The streams, in reads that never span a hash slot (one read off a cluster)."""
        if not self.cluster:
            return [self.streams()] if self.cursors else []
        by_slot: dict[int, dict[str, str]] = {}
        for traj_id, cursor in self.cursors.items():
            stream = self.keys.events(traj_id)
            by_slot.setdefault(key_slot(stream.encode()), {})[stream] = cursor
        return list(by_slot.values())

    def scan(self, reply: Any) -> tuple[dict[Call, Result], list[Call]]:
        """What an XREAD reply resolves: results carried inline, and calls whose
        event came without one (their hash is read)."""
        found: dict[Call, Result] = {}
        fetch: list[Call] = []
        for stream, entries in reply or []:
            traj_id = traj_of_stream(s(stream))
            for entry_id, fields in entries:
                self.cursors[traj_id] = s(entry_id)
                call = (traj_id, event_field(fields, "call_id"))
                if event_field(fields, "type") != "result" or call not in self.pending:
                    continue
                result = inline_result(fields.get(b"result"))
                if result is not None:
                    found[call] = result
                else:
                    fetch.append(call)
        return found, fetch


def traj_of_stream(stream: str) -> str:
    return stream[stream.index("{") + 1 : stream.rindex("}")]


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def fetch_cmds(keys: Keys, calls: Iterable[Call]) -> list[Cmd]:
    return [Cmd("hgetall", (keys.result(t, c),)) for t, c in calls]


def look_cmds(keys: Keys, calls: list[Call]) -> tuple[list[Cmd], list[str]]:
    """The result hashes of ``calls`` and whether their trajectories' records still
    exist (commands, and the trajectories they ask about, in order)."""
    trajs = sorted({t for t, _ in calls})
    return fetch_cmds(keys, calls) + [Cmd("exists", (keys.traj(t),)) for t in trajs], trajs


def looked(
    calls: list[Call], trajs: list[str], replies: list[Any]
) -> tuple[dict[Call, Result], dict[Call, UnknownTrajectory]]:
    """What a look found: results, and calls that will never get one because
    their trajectory's record is gone (lost in a Redis crash, or expired)."""
    hashes, exists = replies[: len(calls)], replies[len(calls) :]
    gone = {t for t, there in zip(trajs, exists, strict=True) if not there}
    found: dict[Call, Result] = {}
    lost: dict[Call, UnknownTrajectory] = {}
    for call, fields in zip(calls, hashes, strict=True):
        result = result_of(fields)
        if result is not None:
            found[call] = result
        elif call[0] in gone:
            lost[call] = UnknownTrajectory(
                f"trajectory {call[0]} is gone (its record was lost, e.g. by a Redis crash "
                f"that lost its last writes, or expired): call {call[1]} will get no result"
            )
    return found, lost


def wait_op(waits: WaitSet, deadline: float) -> Op[dict[Call, Result]]:
    """Wait (blocking reads) until every call in ``waits`` has a result, or the
    deadline (monotonic) passes: raises WaitTimeout naming the first missing."""
    done: dict[Call, Result] = {}
    while waits.pending:
        done.update((yield from wait_some_op(waits, deadline)))
    return done


def wait_some_op(waits: WaitSet, deadline: float) -> Op[dict[Call, Result]]:
    """Wait until at least one call in ``waits`` has a result (or none is left);
    returns the results found, which leave ``waits``. Raises WaitTimeout after
    the deadline (monotonic).

    Reads spanning several hash slots (a cluster) are sent together without
    blocking, then the first one blocks briefly."""
    found: dict[Call, Result] = {}
    while waits.pending and not found:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            traj_id, call_id = next(iter(waits.pending))
            raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet")
        groups = waits.groups()
        block_ms = max(1, min(left_ms, LOOK_EVERY_MS, 100 if len(groups) > 1 else LOOK_EVERY_MS))
        reads = [Cmd("xread", (g,), {"count": 1000}) for g in groups[1:]]
        reads.insert(0, Cmd("xread", (groups[0],), {"count": 1000, "block": block_ms}))
        replies = yield reads[::-1]  # the blocking read last: the others answer at once
        fetch: list[Call] = []
        for reply in replies:
            got, missing = waits.scan(reply)
            found.update(got)
            fetch += missing
        if time.monotonic() >= waits.look_at:  # an event may have been trimmed: look
            waits.look_at = time.monotonic() + LOOK_EVERY_MS / 1000
            calls = list(waits.pending)
            cmds, trajs = look_cmds(waits.keys, calls)
            got, lost = looked(calls, trajs, (yield cmds))
            if lost:
                raise next(iter(lost.values()))
            found.update(got)
            fetch = []
        if fetch:
            for call, fields in zip(fetch, (yield fetch_cmds(waits.keys, fetch)), strict=True):
                result = result_of(fields)
                if result is not None:
                    found[call] = result
        for call in found:
            waits.discard(call)
    return found


def xread_args(streams: dict[str, str], block_ms: int | None) -> list[Any]:
    """A raw XREAD of ``streams`` (COUNT 1000)."""
    head: list[Any] = ["XREAD", "COUNT", 1000]
    if block_ms is not None:
        head += ["BLOCK", block_ms]
    return [*head, "STREAMS", *streams, *streams.values()]


def xread_route(redis: Any, streams: dict[str, str]) -> dict[str, Any]:
    """On a cluster, the node of the streams' slot, named outright (else redis-py
    asks the server for the keys of every read, one more round trip)."""
    node_of = getattr(redis, "get_node_from_key", None)
    return {"target_nodes": node_of(next(iter(streams)))} if node_of else {}
