"""A named pipe a container's agent writes a fork's pack into (issue 31).

Over the agent's stream the engine relays every byte (80 MB: 0.35 s of a fork
of 8, bench/notes.md); through a pipe in the container's exchange directory
(``docker_exchange``) the agent's ``tar`` writes straight to the worker. A
thread of the outbox's own reads it (not the event loop's executor, which runs
the engine's calls: a sandbox that stops its ``tar`` holds only this thread);
another sums its sha256 and writes the cache file the copies here unpack from,
as it comes, so neither waits for the end.

Sandbox code can write into the pipe too (its uid is the agent's): what comes
through it is checked to be a plain tar (``received`` in ``worker/snapshots``)
and never decompressed by the worker.
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
from typing import IO, Any

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
        self._loop = asyncio.get_running_loop()
        self._end = asyncio.Event()  # the reads stopped (the writer's end, cap, stop)
        self._done: asyncio.Future[tuple[bytes, str] | str] = self._loop.create_future()
        thread = threading.Thread(target=self._run, name="outbox-read", daemon=True)
        thread.start()

    def _run(self) -> None:
        """The thread: read, then hand the outcome to the loop (whatever happened)."""
        outcome: tuple[bytes, str] | str = "the pipe's reader failed"
        try:
            outcome = self._drain()
        except Exception as exc:  # no file for the part, no thread: the snapshot fails
            outcome = f"the pipe's reader failed: {exc}"
        finally:
            os.close(self._fd)  # a writer still writing gets EPIPE
            for path in (self._host_path, self._part):  # the part is the cache's, if whole
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(self._settle, outcome)

    def _settle(self, outcome: tuple[bytes, str] | str) -> None:
        self._end.set()
        if not self._done.done():
            self._done.set_result(outcome)

    def _drain(self) -> tuple[bytes, str] | str:
        """The bytes up to the writer's end and their sha256, or why not."""
        chunks: list[bytes] = []
        digest, pending = hashlib.sha256(), Pending()
        failed: list[OSError] = []
        fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as part:
            consumer = threading.Thread(
                target=self._consume, args=(pending, digest, part, failed), daemon=True
            )
            consumer.start()
            try:
                why = self._read_all(chunks, pending)
            finally:
                pending.put(None)
                consumer.join()
        if why is not None:
            return why
        sha256 = digest.hexdigest()
        if not failed:  # a full /dev/shm: the copies' staging writes it, or the stream
            with contextlib.suppress(OSError):
                self._cache(self._part, sha256)
        return b"".join(chunks), sha256

    @staticmethod
    def _consume(pending: Pending, digest: Any, part: IO[bytes], failed: list[OSError]) -> None:
        """Beside the reads (sha256 and the file cost as much): every chunk summed,
        written until a write fails (then the file is not used)."""
        while (chunk := pending.get()) is not None:
            digest.update(chunk)
            if not failed:
                try:
                    part.write(chunk)
                except OSError as exc:
                    failed.append(exc)

    def _read_all(self, chunks: list[bytes], pending: Pending) -> str | None:
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
        """What came through the pipe (its bytes, their sha256) once every writer
        closed it; or why not (over the cap, the pipe still open ``timeout_s`` on: a
        process in the sandbox holds it)."""
        try:
            await asyncio.wait_for(self._end.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.close()
            await self._done
            return f"the pipe was still open {timeout_s:g}s after the pack ended"
        return await self._done

    def close(self) -> None:
        """Stop reading, on every path (its thread ends within ``STOP_POLL_MS``)."""
        self._stop.set()
