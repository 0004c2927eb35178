"""Counting a worker's Redis traffic: round trips and errors of every connection.

``instrument_redis`` swaps the connection class of a redis-py asyncio client
(a plain one or a cluster's) for one that counts on two counters of
``metrics.WorkerMetrics`` (which calls it: this module knows only the counters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from prometheus_client import Counter
    from redis.asyncio.connection import AbstractConnection


class RedisCounters(Protocol):
    """Where the counts go (``WorkerMetrics`` has both)."""

    redis_round_trips: Counter  # one per command or pipeline sent
    redis_errors: Counter  # by ``kind``: timeout, connection, reply


def _error_kind(exc: BaseException) -> str | None:
    """The ``kind`` label of a Redis error, None for replies that are part of normal work."""
    if isinstance(exc, RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError):
        return "connection"
    if isinstance(exc, NoScriptError):  # redis-py loads the script and retries
        return None
    if isinstance(exc, ResponseError):
        return None if str(exc).startswith("BUSYGROUP") else "reply"
    return None


def instrument_redis(redis: Any, metrics: RedisCounters) -> None:
    """Count round trips and errors of every connection ``redis`` opens from now on.

    One ``send_packed_command`` is one round trip (a pipeline sends once per
    node). Connections already open are not counted: call this before the
    client's first command. A Redis Cluster client gets it on every node,
    and on nodes it discovers later.
    """
    pool = getattr(redis, "connection_pool", None)
    if pool is not None:
        pool.connection_class = _observed(pool.connection_class, metrics)
        return
    observed = _observed(redis.connection_kwargs["connection_class"], metrics)
    for kwargs in (redis.connection_kwargs, redis.nodes_manager.connection_kwargs):
        kwargs["connection_class"] = observed
    for node in redis.get_nodes():
        node.connection_class = observed


def _observed(base: type[AbstractConnection], metrics: RedisCounters) -> Any:
    """``base`` with its sends and reads counted (once: an observed class is kept)."""
    if getattr(base, "_toolq_metrics", None) is not None:
        return base  # already instrumented

    class ObservedConnection(base):  # type: ignore[misc,valid-type]
        _toolq_metrics = metrics
        _handshake = False

        async def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
            # Refused handshake options (CLIENT SETINFO before Redis 7.2) are not errors.
            self._handshake = True
            try:
                await super().on_connect_check_health(*args, **kwargs)
            finally:
                self._handshake = False

        async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
            metrics.redis_round_trips.inc()
            try:
                await super().send_packed_command(*args, **kwargs)
            except RedisError as exc:
                _count_error(metrics, exc)
                raise

        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().read_response(*args, **kwargs)
            except RedisError as exc:
                if not (self._handshake and isinstance(exc, ResponseError)):
                    _count_error(metrics, exc)
                raise

    ObservedConnection.__name__ = f"Observed{base.__name__}"
    return ObservedConnection


def _count_error(metrics: RedisCounters, exc: BaseException) -> None:
    kind = _error_kind(exc)
    if kind is not None:
        metrics.redis_errors.labels(kind).inc()
