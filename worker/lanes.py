"""The writer's lanes on Redis Cluster: one flush in flight per node.

On one Redis the writer flushes one batch at a time. On a cluster a batch
spans nodes, and one node that stops answering (frozen, or failing over)
would hold every trajectory's writes behind its own: the whole fleet stalls
for a failover it has no part in. So there the writer keeps a lane per node:
each lane has at most one flush in flight, the lanes flush concurrently, and
an op waits while an earlier op of its trajectory is in flight anywhere (a
slot that moved to another node must not reorder a trajectory's writes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol


class LaneOp(Protocol):
    traj_id: str


class Lanes:
    """Ops not yet sent, in order, and which lanes and trajectories are in flight."""

    def __init__(self, lane_of: Callable[[LaneOp], str]) -> None:
        self.lane_of = lane_of  # an op's lane: the node that serves its keys
        self.pending: deque[LaneOp] = deque()
        self.busy_lanes: set[str] = set()
        self.in_flight: dict[str, int] = {}  # trajectory -> its ops in flight

    def add(self, op: LaneOp) -> None:
        self.pending.append(op)

    def add_first(self, ops: Iterable[LaneOp]) -> None:
        """Ops that go before everything pending (a replay of earlier writes)."""
        self.pending.extendleft(reversed(list(ops)))

    def take(self) -> dict[str, list[LaneOp]]:
        """Remove the ops that can go now and mark them in flight; by lane, in order.

        An op stays while its lane is in flight or an earlier op of its
        trajectory is (in flight, or staying): a trajectory's writes leave in
        the order they were sent.
        """
        out: dict[str, list[LaneOp]] = {}
        keep: deque[LaneOp] = deque()
        held: set[str] = set()
        for op in self.pending:
            traj = op.traj_id
            lane = "" if traj in held or traj in self.in_flight else self.lane_of(op)
            if traj in held or traj in self.in_flight or lane in self.busy_lanes:
                held.add(traj)
                keep.append(op)
                continue
            out.setdefault(lane, []).append(op)
        self.pending = keep
        for lane, ops in out.items():
            self.busy_lanes.add(lane)
            for op in ops:
                self.in_flight[op.traj_id] = self.in_flight.get(op.traj_id, 0) + 1
        return out

    def done(self, lane: str, ops: Iterable[LaneOp]) -> None:
        """A lane's flush ended (written, or failed for good)."""
        self.busy_lanes.discard(lane)
        for op in ops:
            left = self.in_flight.get(op.traj_id, 0) - 1
            if left > 0:
                self.in_flight[op.traj_id] = left
            else:
                self.in_flight.pop(op.traj_id, None)
