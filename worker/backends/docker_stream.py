"""Docker's attached exec stream, as a byte stream an ``AgentChannel`` can use.

The agent runs under one ``docker exec`` whose stdin and stdout stay attached:
``hijacked_socket`` takes the socket from docker-py, ``ExecStream``
demultiplexes the engine's frames (stdout feeds the channel, stderr the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from typing import Any

from ..channel import LINE_LIMIT_BYTES
from .base import SandboxError

log = logging.getLogger("toolq.worker.docker")

DIAG_BYTES = 4096


class ExecStream(asyncio.Protocol):
    """Docker's multiplexed exec stream, demultiplexed for an AgentChannel.

    With ``tty=False`` the engine wraps output in frames: an 8-byte header
    (stream type, 3 zero bytes, big-endian payload size) then the payload.
    Stdout payload feeds ``reader``; stderr lines go to the log. Writes go
    to the socket unframed (they are the agent's stdin).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.reader = asyncio.StreamReader(limit=LINE_LIMIT_BYTES)
        self.transport: asyncio.Transport | None = None
        self.stdout_head = bytearray()  # first bytes, to explain an agent that never starts
        self.stderr_tail = bytearray()
        self._buf = bytearray()
        self._stderr_line = bytearray()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, sock: socket.socket, leftover: bytes, name: str) -> ExecStream:
        """Wrap a connected, hijacked socket (plus bytes already read from it)."""
        stream = cls(name)
        await asyncio.get_running_loop().create_connection(lambda: stream, sock=sock)
        if leftover:
            stream.data_received(leftover)
        return stream

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader.set_transport(transport)  # lets a full reader pause the socket

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 8:
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            kind, payload = buf[0], bytes(buf[8 : 8 + size])
            del buf[: 8 + size]
            if kind == 1:
                self._stdout(payload)
            elif kind == 2:
                self._stderr(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- demultiplexed streams
    def _stdout(self, payload: bytes) -> None:
        if len(self.stdout_head) < DIAG_BYTES:
            self.stdout_head += payload[: DIAG_BYTES - len(self.stdout_head)]
        self.reader.feed_data(payload)

    def _stderr(self, payload: bytes) -> None:
        self.stderr_tail += payload
        del self.stderr_tail[:-DIAG_BYTES]
        self._stderr_line += payload
        *lines, rest = self._stderr_line.split(b"\n")
        self._stderr_line = bytearray(rest[-DIAG_BYTES:])
        for line in lines:
            log.warning("%s agent stderr: %s", self.name, line.decode("utf-8", "replace"))

    # -- writing
    def write(self, data: bytes) -> Awaitable[Any] | None:
        """Send bytes to the agent's stdin now; what to await while the socket
        buffer is full, else None (``channel.Write``)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("exec stream is closed")
        self.transport.write(data)
        return None if self._can_write.is_set() else self._can_write.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def diagnostics(self) -> str:
        """What the stream said before it ended (an engine error, a traceback)."""
        text = (bytes(self.stdout_head) + b"\n" + bytes(self.stderr_tail)).decode(
            "utf-8", "replace"
        )
        return " ".join(text.split())[-1000:]


def hijacked_socket(raw: Any) -> tuple[socket.socket, bytes]:
    """Own docker-py's exec socket: a dup of it, plus bytes its HTTP reader buffered.

    The dup leaves docker-py's objects free to be closed without ending the
    stream; the buffered bytes (normally none) are output the agent already sent.
    """
    sock = getattr(raw, "_sock", raw)
    if not isinstance(sock, socket.socket) or sock.__class__ is not socket.socket:
        with contextlib.suppress(Exception):
            raw.close()
        raise SandboxError(
            "the attached exec stream needs a unix:// or tcp:// docker_host (not TLS or ssh)"
        )
    response = getattr(raw, "_response", None)
    sock.setblocking(False)  # shared by the dup; asyncio wants it anyway
    leftover = b""
    with contextlib.suppress(Exception):  # a non-blocking peek returns only what is buffered
        leftover = bytes(response.raw._fp.fp.peek() or b"") if response is not None else b""
    own = sock.dup()
    for obj in (response, raw, sock):
        with contextlib.suppress(Exception):
            obj.close()  # type: ignore[union-attr]
    return own, leftover
