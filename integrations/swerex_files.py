"""Paths and file transfers of ``ToolqRuntime``: SWE-ReX's absolute paths on toolq's
workspace, and files as ``write_file`` calls (base64, in chunks).

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from toolq.producer import ToolCall

from .swerex_errors import PathOutsideWorkspaceError

#: Bytes per ``write_file``/``read_file`` call: base64 makes 4 MiB 5.4 MiB, well
#: under a call entry's 16 MiB cap (``max_entry_bytes``).
CHUNK_BYTES = 4 * 1024 * 1024
#: Bytes of file content submitted in one ``call_many`` (bounds the memory an upload holds).
BATCH_BYTES = 8 * CHUNK_BYTES


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


def write_calls(path: str, data: bytes, mode: str | None = None) -> list[ToolCall]:
    """``write_file`` calls that write ``data`` to ``path``: the first chunk replaces
    the file, the others append; ``mode`` (octal) is set by the last one."""
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    calls = []
    for i, chunk in enumerate(chunks):
        content = base64.b64encode(chunk).decode("ascii")
        args: dict[str, Any] = {"path": path, "content": content, "encoding": "base64"}
        args["append"] = i > 0
        if mode is not None and i == len(chunks) - 1:
            args["mode"] = mode
        calls.append(ToolCall("write_file", args))
    return calls


def upload_calls(source: Path, target: str, paths: WorkspacePaths) -> Iterator[ToolCall]:
    """The calls that put the local file or directory ``source`` at SWE-ReX path
    ``target``: a directory's content goes into ``target`` (merged with what is
    there), files keep their permission bits, empty directories are made too."""
    if not source.is_dir():
        yield from write_calls(paths.resolve(target), source.read_bytes(), file_mode(source))
        return
    empty_dirs = []
    for dirpath, dirnames, filenames in os.walk(source):
        relative = os.path.relpath(dirpath, source)
        into = posixpath.normpath(posixpath.join(target, relative.replace(os.sep, "/")))
        if not dirnames and not filenames:
            empty_dirs.append(paths.resolve(into))
        for name in sorted(filenames):
            local = Path(dirpath, name)
            yield from write_calls(
                paths.resolve(f"{into}/{name}"), local.read_bytes(), file_mode(local)
            )
    if empty_dirs:  # write_file makes the parents of files; these have none
        yield ToolCall("bash", {"command": "mkdir -p -- " + shlex.join(empty_dirs)})


def file_mode(path: Path) -> str:
    """The permission bits of a local file, as ``write_file``'s octal ``mode``."""
    return f"{path.stat().st_mode & 0o777:04o}"


def batches(calls: Iterable[ToolCall]) -> Iterator[list[ToolCall]]:
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
