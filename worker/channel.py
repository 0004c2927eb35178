"""The worker's end of one in-sandbox agent: JSON lines over one byte stream.

Requests issued in the same event-loop turn are coalesced into one frame, so a
batch bound for one sandbox crosses the stream in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Reply = dict[str, Any]
EventHandler = Callable[[Reply], Awaitable[None] | None]
#: Writes bytes to the agent at once; returns what to await while its buffer is
#: full (backpressure), or None when the bytes are on their way already.
Write = Callable[[bytes], Awaitable[None] | None]

# Agent replies can carry large outputs (a 64 MiB file read as base64).
LINE_LIMIT_BYTES = 256 * 1024 * 1024
# The agent enforces call timeouts; this is how much longer the worker waits
# before it declares the sandbox unresponsive.
AGENT_GRACE_S = 15.0


class ChannelClosedError(ConnectionError):
    """The agent went away (process exited, container died, stream broke)."""


class AgentChannel:
    """Sends request frames to an agent and routes its replies to futures."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        write: Write,
        on_event: EventHandler | None = None,
        name: str = "agent",
    ) -> None:
        self._reader = reader
        self._write = write
        self._on_event = on_event
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._outbox: list[dict[str, Any]] = []
        self._blobs: list[bytes] = []  # the outbox's blobs, in its order
        self._flush_scheduled = False
        self._sends: set[asyncio.Future[None]] = set()
        self._closed: BaseException | None = None
        self.ready: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._read_task = asyncio.create_task(self._read_loop(), name=f"{name}-read")

    @property
    def alive(self) -> bool:
        """False once the agent's stream has ended."""
        return self._closed is None

    async def request(self, op: str, **fields: Any) -> Reply:
        """Send one request and wait for its reply."""
        return await self.submit(op, **fields)

    def submit(self, op: str, blob: bytes | None = None, **fields: Any) -> asyncio.Future[Reply]:
        """Queue one request for the next frame; the future resolves with the reply.

        ``blob`` travels raw after the frame's line (the request says its length);
        a reply's ``blob`` arrives as bytes the same way."""
        if self._closed is not None:
            raise ChannelClosedError(f"{self.name}: {self._closed}")
        req_id = str(next(self._ids))
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if blob is not None:
            fields["blob"] = len(blob)
            self._blobs.append(blob)
        self._outbox.append({"id": req_id, "op": op, **fields})
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return fut

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        frame, self._outbox = self._outbox, []
        blobs, self._blobs = self._blobs, []
        if frame:
            # ASCII JSON: a lone surrogate from a client's \udc80 escape still encodes.
            data = json.dumps(frame, separators=(",", ":")).encode("ascii") + b"\n"
            if blobs:
                data += b"".join(blobs)
            # Written now, in this turn of the loop: a task would send it one turn
            # later, after the reader's next XREADGROUP has gone out.
            try:
                pending = self._write(data)
            except (OSError, RuntimeError) as exc:
                self._fail(ChannelClosedError(f"write failed: {exc}"))
                return
            if pending is not None:  # the buffer is full: wait for it in a task
                task = asyncio.ensure_future(self._drain(pending))
                self._sends.add(task)  # keep a reference until the write is done
                task.add_done_callback(self._sends.discard)

    async def _drain(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except (OSError, RuntimeError) as exc:
            self._fail(ChannelClosedError(f"write failed: {exc}"))

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    raise ChannelClosedError("agent stream ended")
                await self._dispatch(line)
        except asyncio.CancelledError:
            self._fail(ChannelClosedError("channel closed"))
            raise
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            self._fail(exc if isinstance(exc, ChannelClosedError) else ChannelClosedError(str(exc)))

    async def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("%s: non-JSON line from agent: %r", self.name, line[:200])
            return
        if not isinstance(msg, dict):
            return
        if isinstance(msg.get("blob"), int):  # its bytes follow the line, raw
            if not 0 <= msg["blob"] <= LINE_LIMIT_BYTES:
                raise ValueError(f"agent blob of {msg['blob']} bytes")  # ends the channel
            msg["blob"] = await self._reader.readexactly(msg["blob"])
        if "event" in msg:
            if msg["event"] == "ready" and not self.ready.done():
                self.ready.set_result(msg)
            elif self._on_event is not None:
                res = self._on_event(msg)
                if res is not None:
                    await res
            return
        fut = self._pending.pop(str(msg.get("id")), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _fail(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosedError(str(exc)))
        self._pending.clear()
        if not self.ready.done():
            self.ready.set_exception(ChannelClosedError(str(exc)))
            self.ready.exception()  # mark retrieved; callers that care await it

    async def close(self) -> None:
        """Stop reading; pending requests fail with ChannelClosedError."""
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._read_task
        self._fail(ChannelClosedError("channel closed"))
