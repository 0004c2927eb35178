"""What a worker knows about the trajectories it owns, and the entries it read.

Plain data shared by the stages: intake creates ``Item``s and ``Traj``s,
the runner consumes them, the writer and the fleet look them up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from toolq.schemas import CallEntry, ErrorCode, TrajectorySpec, TrajStatus

from .backends.base import Slot


def now_ms() -> int:
    return int(time.time() * 1000)


def wall_ms() -> float:
    """Unix time in milliseconds, to the microsecond: a result's stage times."""
    return round(time.time() * 1000, 3)


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair (``"0-0"`` for anything unparsable)."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def entry_ms(entry_id: str) -> int:
    """When an entry was added (its id's milliseconds), or now."""
    ms = entry_key(entry_id)[0]
    return ms if ms else now_ms()


@dataclass
class Item:
    """One entry read from a trajectory's calls stream.

    ``entry`` is None when the entry could not be parsed; ``error`` then says
    why, and the call is answered under ``call_id`` (the entry's own
    ``call_id`` field when it carried a valid one, else the entry id).
    """

    entry_id: str
    entry: CallEntry | None
    error: tuple[ErrorCode, str] | None = None
    client_call_id: str | None = None
    kind: str = "call"  # call | close | cancel
    size_bytes: int = 0
    read_at_ms: float = 0.0  # when this worker read it (Unix ms): the result's stages.read

    @property
    def call_id(self) -> str:
        return self.client_call_id or self.entry_id

    @property
    def idempotent(self) -> bool:
        return bool(self.entry and self.entry.idempotent)


@dataclass
class Traj:
    """A trajectory this worker owns (for one ownership ``epoch``)."""

    traj_id: str
    spec: TrajectorySpec
    epoch: str
    previous_owner: str | None = None  # set when taken over or handed over
    items: deque[Item] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    slot: Slot | None = None
    task: asyncio.Task[None] | None = None
    ending: tuple[TrajStatus, str] | None = None  # status, reason
    # The error code of the calls still in its stream at the end ('': trajectory_ended);
    # a failed slot start (snapshot_not_found, sandbox_error) answers them with its own.
    end_code: str = ""
    current: Item | None = None  # the call being run
    slot_reset: bool = False  # the next result says the workspace was lost
    slot_lost: bool = False  # the slot died during a call: the next one starts a fresh one
    spec_resolved: bool = False  # spec.snapshot's spec is merged in (once per ownership)
    last_activity: float = field(default_factory=time.monotonic)
    confirmed_at: float = field(default_factory=time.monotonic)  # ownership last confirmed
    started: float = field(default_factory=time.monotonic)
    calls: int = 0
    # When its latest call finished here (unix ms, worker clock; 0: none yet). Its
    # calls run one at a time, so a call submitted before then waited its turn.
    free_since_ms: int = 0
    last_entry_id: str = "0-0"  # newest entry dispatched (re-deliveries are skipped)
    claimed_ms: int = 0  # when this ownership began, by Redis's clock
    seen_call_ids: set[str] = field(default_factory=set)  # client call ids run here
    dropped: bool = False  # another worker owns it now: do nothing more for it
    unflushed: int = 0  # results handed to the writer, not yet in Redis
    flushed: asyncio.Event = field(default_factory=asyncio.Event)  # set while unflushed == 0

    def __post_init__(self) -> None:
        self.flushed.set()

    @property
    def busy(self) -> bool:
        return self.current is not None

    @property
    def queued_bytes(self) -> int:
        return sum(item.size_bytes for item in self.items)

    def in_flight(self) -> set[str]:
        """Entry ids dispatched here and not answered yet."""
        ids = {item.entry_id for item in self.items}
        if self.current is not None:
            ids.add(self.current.entry_id)
        return ids

    def behind_ms(self, item: Item, started_ms: int) -> float:
        """The part of ``item``'s queue wait (its XADD to ``started_ms``) spent behind
        this trajectory's earlier calls; the rest was the wait for toolq itself."""
        running_other = self.current is not None and self.current is not item
        # While an earlier call still runs (a cancel answering queued calls), the
        # whole wait is behind it; otherwise, up to the end of the latest call.
        busy_until_ms = started_ms if running_other else min(self.free_since_ms, started_ms)
        return float(max(0, busy_until_ms - entry_ms(item.entry_id)))

    def push(self, item: Item) -> None:
        self.items.append(item)
        if entry_key(item.entry_id) > entry_key(self.last_entry_id):
            self.last_entry_id = item.entry_id
        self.wakeup.set()

    def request_end(self, status: TrajStatus, reason: str) -> None:
        if self.ending is None:
            self.ending = (status, reason)
        self.wakeup.set()

    def result_queued(self) -> None:
        self.unflushed += 1
        self.flushed.clear()

    def result_written(self) -> None:
        self.unflushed -= 1
        if self.unflushed <= 0:
            self.flushed.set()

    def ended_message(self) -> str:
        if self.ending is None:
            return "the trajectory has ended"
        status, reason = self.ending
        return f"the trajectory has ended ({status.value}: {reason})"
