"""How anything local finds Redis: an argument, ``TOOLQ_REDIS_URL``, or the embedded one.

``toolq worker`` without ``TOOLQ_REDIS_URL`` starts an embedded Redis and
writes its URL to ``embedded_state_path()``; ``toolq call``, the clients and
``toolq rq-worker`` read it back.
"""

from __future__ import annotations

import json
import os
import tempfile


def embedded_state_path() -> str:
    """Path of the JSON file ``{"url": ..., "pid": ...}`` (per user)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"toolq-{os.getuid()}", "embedded-redis.json")


def read_embedded_url() -> str | None:
    """The embedded Redis URL if one was announced and its process lives."""
    try:
        with open(embedded_state_path()) as fh:
            state = json.load(fh)
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    url = state.get("url")
    return url if isinstance(url, str) else None


class NoRedisError(RuntimeError):
    """No Redis URL was given and no embedded Redis is running."""


class ClusterNodeError(NoRedisError):
    """A plain ``redis://`` URL names a node of a Redis Cluster: toolq needs to know
    it talks to a cluster (``redis+cluster://``) to route each key to its node."""

    def __init__(self, answer: str, node: str = "") -> None:
        example = f"redis+cluster://{node}" if node else "redis+cluster://host:port"
        super().__init__(
            f"this Redis is a node of a Redis Cluster ({answer}): connect with "
            f"{example} (any node), or set TOOLQ_REDIS_CLUSTER=1"
        )


def resolve_redis_url(url: str | None = None) -> str:
    """``url``, else ``TOOLQ_REDIS_URL``, else a running embedded Redis."""
    found = url or os.environ.get("TOOLQ_REDIS_URL") or read_embedded_url()
    if not found:
        raise NoRedisError(
            "no Redis: set TOOLQ_REDIS_URL (e.g. redis://localhost:6379/0) "
            "or start `toolq worker`, which runs an embedded Redis"
        )
    return found


DEFAULT_NAMESPACE = "toolq"


def resolve_namespace(namespace: str | None = None) -> str:
    """``namespace``, else ``TOOLQ_NAMESPACE``, else ``toolq``: the same key prefix
    the CLI and ``toolq worker`` use in the same environment."""
    return namespace or os.environ.get("TOOLQ_NAMESPACE") or DEFAULT_NAMESPACE


#: URL schemes that name a Redis Cluster (any of its nodes): ``redis+cluster://host:port``.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redis_target(url: str) -> tuple[str, bool]:
    """``(url for redis-py, is it a Redis Cluster)``.

    A cluster is named by the scheme (``redis+cluster://``, ``rediss+cluster://``)
    or by ``TOOLQ_REDIS_CLUSTER=1`` with a plain ``redis://`` URL of any node.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in CLUSTER_SCHEMES:
        return f"{CLUSTER_SCHEMES[scheme]}://{rest}", True
    return url, os.environ.get("TOOLQ_REDIS_CLUSTER", "") in ("1", "true", "yes")
