"""stdin for ``toolq mcp`` over stdio, read so that a signal can stop the read.

The SDK's ``stdio_server`` reads stdin in a worker thread (``anyio.wrap_file``),
and a thread's blocking read cannot be cancelled: SIGTERM would wait for the
client's next line, or for stdin to close. ``StdinLines`` reads a non-blocking
duplicate of fd 0 once ``anyio.wait_readable`` says there is data, so
cancelling the server stops the read at once.

``CheckedLines`` answers what is no JSON-RPC message (a malformed line, no
method, a wrong ``jsonrpc``) with JSON-RPC's error reply, where the SDK would
drop it and the client would wait for an answer that never comes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import anyio
import mcp.types as types

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


#: An error reply to send in place of a line that is not a JSON-RPC message.
Reply = Callable[[types.JSONRPCError], Awaitable[None]]


def rejection(line: str) -> types.JSONRPCError | None:
    """The JSON-RPC 2.0 error reply a line deserves, or None when it is a message:
    ``-32700`` (parse error) for what is not JSON, ``-32600`` (invalid request) for
    JSON that is no JSON-RPC 2.0 message (no ``method`` in a request, a ``jsonrpc``
    other than ``"2.0"``, a batch). The id is the message's when it has a usable one."""
    if not line.strip():
        return None  # blank lines between messages are no message at all
    try:
        value = json.loads(line)
    except ValueError:
        return _error(None, types.PARSE_ERROR, "Parse error")
    raw_id = value.get("id") if isinstance(value, dict) else None
    msg_id = raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    if not isinstance(value, dict):
        return _error(None, types.INVALID_REQUEST, "Invalid Request: not a JSON-RPC object")
    if value.get("jsonrpc") != "2.0":
        return _error(msg_id, types.INVALID_REQUEST, 'Invalid Request: jsonrpc must be "2.0"')
    if "method" not in value and "result" not in value and "error" not in value:
        return _error(msg_id, types.INVALID_REQUEST, "Invalid Request: no method")
    try:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValueError as exc:
        return _error(msg_id, types.INVALID_REQUEST, f"Invalid Request: {_first_error(exc)}")
    return None


def _error(msg_id: str | int | None, code: int, message: str) -> types.JSONRPCError:
    return types.JSONRPCError(
        jsonrpc="2.0", id=msg_id, error=types.ErrorData(code=code, message=message)
    )


def _first_error(exc: ValueError) -> str:
    return str(exc).splitlines()[0][:200]


class CheckedLines:
    """The lines of ``lines`` that are JSON-RPC messages; every other line is answered
    through ``reply`` with its error (the SDK would drop it without a reply)."""

    def __init__(self, lines: AsyncIterable[str]) -> None:
        self.lines = lines
        self.reply: Reply | None = None  # set once the server's write stream exists

    def __aiter__(self) -> AsyncIterator[str]:
        return self._checked()

    async def _checked(self) -> AsyncIterator[str]:
        async for line in self.lines:
            error = rejection(line)
            if error is None:
                yield line
            elif self.reply is not None:
                await self.reply(error)
