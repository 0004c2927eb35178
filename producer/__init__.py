"""toolq producer: clients that enqueue tool calls and read results.

Needs only redis, pydantic and click: no docker, rq or prometheus-client.
"""

from toolq.schemas import Result, TrajectoryRecord, TrajectorySpec

from .aclient import AsyncClient
from .client import (
    Client,
    LimitExceeded,
    ToolCall,
    ToolqError,
    Trajectory,
    TrajectoryEnded,
    UnknownTrajectory,
    WaitTimeout,
)
from .config import NoRedisError, resolve_redis_url
from .drive import spec_wait_s
from .session import AsyncTrajectory
from .snapshots import SnapshotFailed

__all__ = [
    "AsyncClient",
    "AsyncTrajectory",
    "Client",
    "LimitExceeded",
    "NoRedisError",
    "Result",
    "SnapshotFailed",
    "ToolCall",
    "ToolqError",
    "Trajectory",
    "TrajectoryEnded",
    "TrajectoryRecord",
    "TrajectorySpec",
    "UnknownTrajectory",
    "WaitTimeout",
    "resolve_redis_url",
    "spec_wait_s",
]
