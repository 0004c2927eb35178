"""Is any worker serving the namespace? Asked before a client's first wait, so a
call that no worker will answer (none started, or one on another namespace or
Redis) says so at once instead of only when its wait times out."""

from __future__ import annotations

import logging
from typing import Any

from toolq.schemas import Keys

from .ops import Cmd, Op

log = logging.getLogger("toolq.producer")

#: A worker whose last heartbeat is older than this is taken for gone (workers beat
#: every 2 s and are declared dead after their ``dead_after_s``, 15 s by default).
ALIVE_WINDOW_MS = 30_000
#: Redis's clock, read from the node that holds the heartbeats (one clock on a cluster).
_TIME = "return redis.call('TIME')"


def workers_alive_op(keys: Keys) -> Op[bool]:
    """True when some worker of the namespace beat within ``ALIVE_WINDOW_MS``."""
    beats, now = yield [
        Cmd("zrange", (keys.workers, 0, -1), {"withscores": True}),
        Cmd("eval", (_TIME, 1, keys.workers)),
    ]
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    return any(float(score) >= now_ms - ALIVE_WINDOW_MS for _, score in beats)


def no_worker_hint(keys: Keys) -> str:
    """What to do when no worker is alive."""
    return (
        f"no worker is alive in namespace {keys.ns!r}: the call waits until one starts "
        "(`toolq worker`, with the same TOOLQ_REDIS_URL and TOOLQ_NAMESPACE)"
    )


class Liveness:
    """A client's memory of whether it has seen a live worker (asked until it has)."""

    def __init__(self) -> None:
        self.seen = False
        self.warned = False

    def note(self, alive: bool, keys: Keys) -> None:
        """Record an answer of ``workers_alive_op``; warn once while none is alive."""
        self.seen = self.seen or alive
        if not alive and not self.warned:
            self.warned = True
            log.warning("toolq: %s", no_worker_hint(keys))

    def explain(self, exc: Any, alive: bool, keys: Keys) -> str:
        """A WaitTimeout's text, with the hint when no worker is alive."""
        return str(exc) if alive else f"{exc} ({no_worker_hint(keys)})"
