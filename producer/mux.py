"""One Redis connection shared by a client's concurrent operations, pipelined.

The asyncio client's scripts (a submit is one ``EVALSHA``) go through here on
one Redis: each batch is written at once, behind whatever other tasks sent,
and a reader task hands the replies back in order (Redis answers one
connection's commands in the order it got them). That is one socket write per
batch with no pool checkout, no pipeline object and no per-command callbacks:
the client's own work on the path of every call (bench/notes.md). Blocking
commands never come here: they would hold up everyone behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


@dataclass
class _Batch:
    size: int
    done: asyncio.Future[list[Any]]
    replies: list[Any] = field(default_factory=list)


class MuxConnection:
    """See the module docstring. Errors: a reply Redis refused is that command's
    reply (a ``ResponseError``); a broken connection fails every batch in flight
    with ``ConnectionError`` and the next batch connects again."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: AbstractConnection | None = None
        self._connecting = asyncio.Lock()
        self._waiting: deque[_Batch] = deque()
        self._has_waiting = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` (raw, e.g. ``("EVALSHA", sha, 1, key)``); their replies."""
        if not commands:
            return []  # nothing to send: no reply will come to wait for
        conn = await self._connected()
        packed = conn.pack_commands(commands)  # a bad argument fails this caller alone
        batch = _Batch(len(commands), asyncio.get_running_loop().create_future())
        # Queued before the write, and nothing awaits in between on a connected
        # socket: the batches' order on the socket is their order here.
        self._waiting.append(batch)
        self._has_waiting.set()
        try:
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            # redis-py dropped the socket (a write that failed, or was cancelled
            # half done): what is in flight on it fails. A newer connection is left be.
            if conn is self._conn:
                self._broken(exc)
            elif not batch.done.done():
                batch.done.set_exception(RedisConnectionError(str(exc)))
            if batch.done.done() and not batch.done.cancelled():
                batch.done.exception()  # raised here instead: mark it retrieved
            raise
        return await batch.done

    async def _connected(self) -> AbstractConnection:
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        async with self._connecting:
            if self._conn is None or not self._conn.is_connected:
                pool: Any = self._pool  # make_connection is untyped
                conn = pool.make_connection()
                await conn.connect()
                self._conn = conn
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read_loop(), name="toolq-mux")
        return self._conn

    async def _read_loop(self) -> None:
        while True:
            try:
                await self._read_one()
            except asyncio.CancelledError:
                self._broken(RedisConnectionError("client closed"))
                raise
            except Exception as exc:  # a bug here must not leave every caller hanging
                self._broken(exc)

    async def _read_one(self) -> None:
        """Wait for a batch in flight, read one reply, hand out the batch once whole."""
        if not self._waiting:
            self._has_waiting.clear()
            await self._has_waiting.wait()
            return
        conn, batch = self._conn, self._waiting[0]
        if conn is None:  # between a loss and the next connect: nothing to read
            self._has_waiting.clear()
            await self._has_waiting.wait()
            return
        try:
            reply = await conn.read_response()
        except ResponseError as exc:
            reply = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if conn is self._conn:  # else: a connection given up already
                self._broken(exc)
            return
        if conn is not self._conn or not self._waiting or self._waiting[0] is not batch:
            return  # read off a connection given up meanwhile: its batches failed already
        batch.replies.append(reply)
        if len(batch.replies) == batch.size:
            self._waiting.popleft()
            if not batch.done.done():
                batch.done.set_result(batch.replies)

    def _broken(self, exc: BaseException) -> None:
        """The connection is lost (or half read): every batch in flight fails."""
        error = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc))
        while self._waiting:
            batch = self._waiting.popleft()
            if not batch.done.done():
                batch.done.set_exception(error)
        conn, self._conn = self._conn, None
        if conn is not None:
            task = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
            task.add_done_callback(lambda t: t.exception())

    async def aclose(self) -> None:
        """Stop the reader and close the connection; what is in flight fails."""
        async with self._connecting:  # no connect under way installs a new reader
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._reader
            conn = self._conn
            self._broken(RedisConnectionError("client closed"))
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
