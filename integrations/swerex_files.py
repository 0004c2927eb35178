"""Paths and file transfers of ``ToolqRuntime``: SWE-ReX's absolute paths on toolq's
workspace, and files as ``write_file`` calls (base64, in chunks, read as they are
sent: an upload holds about one batch of them, ``BATCH_BYTES``).

A SWE-ReX path is absolute, or relative to the working directory (the spec's
``workdir``, else the workspace root), as for a process. ``workspace_root``
(``/workspace``: where the Docker backend mounts a trajectory's workspace)
stands for the workspace: ``/workspace/src/a.py`` is ``src/a.py`` in it. A
path that leaves the workspace is refused before anything is sent (the
sandbox refuses symlinks that lead out). toolq's file tools get the path
relative to the working directory, so the mapping holds on every backend.
"""

from __future__ import annotations

import base64
import os
import posixpath
import shlex
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from toolq.producer import ToolCall

from .swerex_errors import PathOutsideWorkspaceError

#: Bytes per ``write_file``/``read_file`` call: base64 makes 4 MiB 5.4 MiB, well
#: under a call entry's 16 MiB cap (``max_entry_bytes``).
CHUNK_BYTES = 4 * 1024 * 1024
#: Bytes of file content submitted in one ``call_many`` (bounds the memory an upload holds).
BATCH_BYTES = 8 * CHUNK_BYTES
#: Calls made as they are consumed (a generator: ``close`` releases what it reads).
Calls = Generator[ToolCall, None, None]


class WorkspacePaths:
    """Maps SWE-ReX paths onto a trajectory's workspace."""

    def __init__(self, workspace_root: str, workdir: str | None) -> None:
        self.root = posixpath.normpath(workspace_root)
        if not posixpath.isabs(self.root):
            raise ValueError(f"workspace_root must be absolute, not {workspace_root!r}")
        # The working directory as an absolute path under ``root`` (an absolute
        # ``workdir`` is a path in the sandbox, where the Docker backend's root is ``root``).
        self.cwd = posixpath.normpath(posixpath.join(self.root, workdir or "."))

    def inside(self, path: str) -> bool:
        """Whether the (normalised, absolute) ``path`` is in the workspace."""
        return path == self.root or path.startswith(self.root.rstrip("/") + "/")

    def resolve(self, path: str) -> str:
        """The path for toolq's file tools (relative to the working directory);
        raises ``PathOutsideWorkspaceError`` for a path outside the workspace."""
        full = posixpath.normpath(posixpath.join(self.cwd, path))
        if not path or not self.inside(full):
            raise PathOutsideWorkspaceError(
                f"path {path!r} is outside the workspace ({self.root}; relative paths "
                f"start at {self.cwd})"
            )
        return posixpath.relpath(full, self.cwd)

    def shell_cwd(self, path: str | None) -> str | None:
        """A command's ``cwd`` for the shell: a workspace path relative to the working
        directory (so it holds on every backend); any other path as it is."""
        if path is None:
            return None
        full = posixpath.normpath(posixpath.join(self.cwd, path))
        return posixpath.relpath(full, self.cwd) if self.inside(full) else path


def write_calls(path: str, source: BinaryIO, mode: str | None = None) -> Calls:
    """``write_file`` calls that write what ``source`` holds to ``path``, read a chunk
    at a time: the first chunk replaces the file, the others append; ``mode``
    (octal) is set by the last one."""
    chunk, append = source.read(CHUNK_BYTES), False
    while True:
        ahead = source.read(CHUNK_BYTES)  # an empty one: ``chunk`` is the last
        content = base64.b64encode(chunk).decode("ascii")
        args: dict[str, Any] = {"path": path, "content": content, "encoding": "base64"}
        args["append"] = append
        if mode is not None and not ahead:
            args["mode"] = mode
        yield ToolCall("write_file", args)
        if not ahead:
            return
        chunk, append = ahead, True


def upload_calls(source: Path, target: str, paths: WorkspacePaths) -> Calls:
    """The calls that put the local file or directory ``source`` at SWE-ReX path
    ``target``: a directory's content goes into ``target`` (merged with what is
    there), files keep their permission bits, empty directories are made too.
    It walks and reads as it goes (blocking I/O: run it off the event loop)."""
    if not source.is_dir():
        yield from file_calls(source, paths.resolve(target))
        return
    empty_dirs = []
    for dirpath, dirnames, filenames in os.walk(source):
        relative = os.path.relpath(dirpath, source)
        into = posixpath.normpath(posixpath.join(target, relative.replace(os.sep, "/")))
        if not dirnames and not filenames:
            empty_dirs.append(paths.resolve(into))
        for name in sorted(filenames):
            yield from file_calls(Path(dirpath, name), paths.resolve(f"{into}/{name}"))
    if empty_dirs:  # write_file makes the parents of files; these have none
        yield ToolCall("bash", {"command": "mkdir -p -- " + shlex.join(empty_dirs)})


def file_calls(local: Path, target: str) -> Calls:
    """The calls that copy the local file to ``target`` (a workspace path), mode kept."""
    with local.open("rb") as source:
        yield from write_calls(target, source, file_mode(local))


def file_mode(path: Path) -> str:
    """The permission bits of a local file, as ``write_file``'s octal ``mode``."""
    return f"{path.stat().st_mode & 0o777:04o}"


def batches(calls: Iterable[ToolCall]) -> Generator[list[ToolCall], None, None]:
    """``calls`` in lists of about ``BATCH_BYTES`` of content each, in order."""
    batch: list[ToolCall] = []
    size = 0
    for call in calls:
        content = call.args.get("content", "") if isinstance(call.args, dict) else ""
        if batch and size + len(content) > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(call)
        size += len(content)
    if batch:
        yield batch
