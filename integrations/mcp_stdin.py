"""stdin for ``toolq mcp`` over stdio, read so that a signal can stop the read.

The SDK's ``stdio_server`` reads stdin in a worker thread (``anyio.wrap_file``),
and a thread's blocking read cannot be cancelled: SIGTERM would wait for the
client's next line, or for stdin to close. ``StdinLines`` reads a non-blocking
duplicate of fd 0 once ``anyio.wait_readable`` says there is data, so
cancelling the server stops the read at once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator

import anyio

#: Bytes read from stdin at a time.
READ_BYTES = 64 * 1024


def pollable(fd: int) -> bool:
    """Whether the event loop can wait on ``fd``: a pipe, a socket or a terminal.
    A regular file or ``/dev/null`` cannot be polled (and its reads never wait)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # no stdin at all: the SDK's own reader says so
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


class StdinLines:
    """The lines of ``fd`` (stdin) as text, for ``stdio_server(stdin=...)``: an
    async iterable, as the SDK's own wrapped stdin is (invalid UTF-8 replaced)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self._chunks():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:  # UTF-8 never has a newline byte inside a character
                yield line.decode("utf-8", errors="replace") + "\n"
        if pending:
            yield pending.decode("utf-8", errors="replace")

    async def _chunks(self) -> AsyncIterator[bytes]:
        fd = os.dup(self.fd)
        # The flag belongs to the open pipe, which fd 0 shares: put it back as it was.
        was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)
        try:
            while True:
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, READ_BYTES)
                except BlockingIOError:  # woken, but another reader was first
                    continue
                if not chunk:
                    return
                yield chunk
        finally:
            os.set_blocking(fd, was_blocking)
            os.close(fd)
