"""A named pipe a container's agent writes a fork's pack into (issue 31).

Over the agent's stream the engine relays every byte (80 MB: 0.35 s of a fork
of 8, bench/notes.md); through a pipe in the container's exchange directory
(``docker_exchange``) the agent's ``tar`` writes straight to the worker. The
worker reads it in one thread; another sums its sha256 and writes the cache file
the copies here unpack from, as it comes, so neither waits for the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import select
import threading
from collections.abc import Callable

#: How soon the reading thread sees that it was given up.
STOP_POLL_MS = 100
READ_BYTES = 1 << 20

Pending = queue.SimpleQueue[bytes | None]  # read chunks for the summing thread; None: the end


class Outbox:
    """Reads a named pipe to its end (the bytes and their sha256), at most
    ``cap_bytes``; the pipe is removed once read or given up. What was read is also
    written to ``part``, handed to ``cache(part, sha256)`` once whole."""

    def __init__(
        self,
        fd: int,
        host_path: str,
        path: str,
        cap_bytes: int,
        part: str,
        cache: Callable[[str, str], None],
    ) -> None:
        self.path = path  # where the container sees it
        self._fd, self._host_path, self._cap_bytes = fd, host_path, cap_bytes
        self._part, self._cache = part, cache
        self._stop = threading.Event()
        self.over_cap = False
        self._end = asyncio.Event()  # the reads stopped (the writer's end, cap, stop)
        self._loop = asyncio.get_running_loop()
        self._read = asyncio.ensure_future(asyncio.to_thread(self._drain))

    def _drain(self) -> tuple[bytes, str] | str:
        """The bytes up to the writer's end and their sha256, or why not."""
        chunks: list[bytes] = []
        digest, pending = hashlib.sha256(), Pending()
        with open(self._part, "wb") as part:

            def consume() -> None:  # beside the reads: sha256 and the file cost as much
                while (chunk := pending.get()) is not None:
                    digest.update(chunk)
                    part.write(chunk)

            consumer = threading.Thread(target=consume, name="outbox-sum", daemon=True)
            consumer.start()
            try:
                why = self._read_all(chunks, pending)
            finally:
                self._loop.call_soon_threadsafe(self._end.set)
                pending.put(None)
                consumer.join()
                os.close(self._fd)  # the writer gets EPIPE, if it is still writing
                with contextlib.suppress(OSError):
                    os.unlink(self._host_path)
        if why is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._part)
            return why
        sha256 = digest.hexdigest()
        try:
            self._cache(self._part, sha256)
        except OSError:  # the copies' staging writes it then
            with contextlib.suppress(OSError):
                os.unlink(self._part)
        return b"".join(chunks), sha256

    def _read_all(
        self, chunks: list[bytes], pending: queue.SimpleQueue[bytes | None]
    ) -> str | None:
        """Read until the writer's end (None), the cap or a stop (why not)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        total = 0
        while not self._stop.is_set():
            # Until a writer opens it, a pipe polls as nothing to read (not as an
            # end): the wait lasts until the agent's tar starts, or we give up.
            if not poller.poll(STOP_POLL_MS):
                continue
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                continue
            if not chunk:
                return None
            total += len(chunk)
            if total > self._cap_bytes:
                self.over_cap = True
                return f"more than {self._cap_bytes} bytes (the snapshot cap)"
            chunks.append(chunk)
            pending.put(chunk)
        return "given up"

    async def collect(self, timeout_s: float) -> tuple[bytes, str] | str:
        """What the writer wrote (its bytes, their sha256), once every writer closed
        the pipe; or why not (over the cap, the pipe still open ``timeout_s`` on: a
        process in the sandbox holds it)."""
        try:
            await asyncio.wait_for(self._end.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.close()
            await asyncio.wait([self._read])
            return f"the pipe was still open {timeout_s:g}s after the pack ended"
        return await self._read  # the sums of what was read: no wait on the writer

    def close(self) -> None:
        """Stop reading (the agent sent its reply another way); the thread ends soon."""
        self._stop.set()
