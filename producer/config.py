"""How a client finds Redis (see ``toolq.schemas.local``)."""

from __future__ import annotations

from toolq.schemas.local import (
    ClusterNodeError,
    NoRedisError,
    redis_target,
    resolve_namespace,
    resolve_redis_url,
)

__all__ = [
    "ClusterNodeError",
    "NoRedisError",
    "redis_target",
    "resolve_namespace",
    "resolve_redis_url",
]
