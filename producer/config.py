"""How a client finds Redis (see ``toolq.schemas.local``)."""

from __future__ import annotations

from toolq.schemas.local import NoRedisError, resolve_redis_url

__all__ = ["NoRedisError", "resolve_redis_url"]
