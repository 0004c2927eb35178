"""How a client finds Redis: the argument, ``TOOLQ_REDIS_URL``, or the embedded one."""

from __future__ import annotations

import os

from toolq.schemas.local import read_embedded_url


class NoRedisError(RuntimeError):
    """No Redis URL was given and no embedded Redis is running."""


def resolve_redis_url(url: str | None = None) -> str:
    """``url``, else ``TOOLQ_REDIS_URL``, else a running embedded Redis."""
    found = url or os.environ.get("TOOLQ_REDIS_URL") or read_embedded_url()
    if not found:
        raise NoRedisError(
            "no Redis: set TOOLQ_REDIS_URL (e.g. redis://localhost:6379/0) "
            "or start `toolq worker`, which runs an embedded Redis"
        )
    return found
