"""toolq producer: clients that enqueue tool calls and read results.

Needs only redis, pydantic and click: no docker, rq or prometheus-client.
"""

from toolq.schemas import Result, TrajectoryRecord, TrajectorySpec

from .client import AsyncClient, Client, ToolqError, TrajectoryEnded, WaitTimeout
from .config import NoRedisError, resolve_redis_url

__all__ = [
    "AsyncClient",
    "Client",
    "NoRedisError",
    "Result",
    "ToolqError",
    "TrajectoryEnded",
    "TrajectoryRecord",
    "TrajectorySpec",
    "WaitTimeout",
    "resolve_redis_url",
]
