"""Snapshots: the whole workspace packed into one blob, and unpacked into a new one
(the worker's own tools ``_snapshot_pack`` and ``_snapshot_unpack``)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import zlib

from .archives import (
    PACK_BUFSIZE,
    PACK_COMPRESSLEVEL,
    ArchiveSink,
    ArchiveTooLarge,
    restore_into,
)
from .protocol import ToolError


class GzipSink(object):
    """Compresses what a streaming tar writes (zlib level 1, gzip framing) into ``sink``."""

    def __init__(self, sink):
        self.sink = sink
        self.zlib = zlib.compressobj(PACK_COMPRESSLEVEL, zlib.DEFLATED, 31)

    def write(self, data):
        self.sink.write(self.zlib.compress(data))
        return len(data)

    def close(self):
        self.sink.write(self.zlib.flush())


def workspace_entries(root):
    """(path, archive name) of the workspace and everything in it, parents first;
    symlinks are entries, never followed. Iterative (a workspace may nest deeper
    than Python recurses); an unreadable directory is an error."""
    yield root, "."
    stack = [root]
    while stack:
        directory = stack.pop()
        below = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            yield path, "./" + os.path.relpath(path, root)
            if os.path.isdir(path) and not os.path.islink(path):
                below.append(path)
        stack.extend(reversed(below))


def tool_snapshot_pack(slot, args, req):
    """The whole workspace as a tar.gz (the reply's blob), links kept, special files
    left out. ``"compress": "auto"`` (a fork's) makes it a plain tar, packed two to
    three times faster, unless that passes the cap: then a tar.gz after all."""
    if args.get("compress") == "auto":
        fifo, cap = args.get("fifo"), int(args["max_bytes"])
        plain = (fifo and tar_to_fifo(slot, fifo, cap)) or native_tar(slot, cap)
        if plain is None:
            plain = pack_workspace(slot, dict(args, compress=False), req)
        if plain.get("error_code") != "limit_exceeded":
            return plain
    return pack_workspace(slot, args, req)


def tar_to_fifo(slot, fifo, cap):
    """The workspace's plain tar written by ``tar`` straight into ``fifo``, a named
    pipe the worker reads on the host (``docker_outbox.Outbox``): no bytes through
    this agent's stream. The reply says ``fifo`` and carries no blob; None when the
    pipe is not there or has no reader (another engine), the tar could pass ``cap``
    (the memory path then falls back to a tar.gz), or tar failed: the caller packs
    into memory then."""
    try:  # non-blocking: a pipe nobody reads on the other side fails here, never hangs
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        os.set_blocking(fd, True)
        return native_tar(slot, cap, out=fd)
    finally:
        os.close(fd)  # with tar's own gone, the worker reads its end to EOF


def tar_size_bound(counts):
    """At least the size of a plain tar of these entries: each file's bytes, a header
    and padding per entry, room for a long name, the end blocks."""
    return counts["bytes"] + (counts["entries"] + 1) * 1536 + 10240


def native_tar(slot, cap, out=None):
    """The workspace as a plain tar made by the image's ``tar`` (C: several times
    faster than tarfile), from the same list of entries ``pack_workspace`` takes
    (special files left out, links kept); None when there is no tar or it failed.
    ``out``: a file descriptor tar writes to instead (then the reply has no blob),
    only when the tar surely fits ``cap``."""
    tar = shutil.which("tar")
    if tar is None:
        return None
    counts = {"entries": 0, "bytes": 0, "skipped": 0}
    names = []
    for path, name in workspace_entries(slot.root):
        try:
            mode = os.lstat(path)
        except FileNotFoundError:
            counts["vanished"] = counts.get("vanished", 0) + 1
            continue
        kind = stat.S_IFMT(mode.st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            counts["skipped"] += 1
            continue
        counts["entries"] += 1
        counts["bytes"] += mode.st_size if kind == stat.S_IFREG else 0
        names.append(os.fsencode(name))
    if out is not None and tar_size_bound(counts) > cap:
        return None
    command = [tar, "-c", "-f", "-", "--null", "--no-recursion", "--numeric-owner"]
    try:
        done = subprocess.run(
            [*command, "-C", slot.root, "-T", "-"],
            input=b"\0".join(names) + b"\0",
            stdout=subprocess.PIPE if out is None else out,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    if done.returncode != 0:  # a file gone meanwhile, a busybox tar: tarfile does it
        return None
    if out is not None:
        return {"data": counts, "fifo": True}
    if len(done.stdout) > cap:
        message = "the workspace is more than %d bytes uncompressed (the snapshot cap)" % cap
        return {"ok": False, "error_code": "limit_exceeded", "error": message}
    return {"blob": done.stdout, "data": counts}


def pack_workspace(slot, args, req):
    cap = int(args["max_bytes"])
    compress = args.get("compress", True)
    counts = {"entries": 0, "bytes": 0, "skipped": 0}

    def keep(info):
        if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
            counts["skipped"] += 1
            return None
        counts["entries"] += 1
        counts["bytes"] += info.size if info.isfile() else 0
        return info

    sink = ArchiveSink(cap, cap)
    gz = GzipSink(sink) if compress else None
    try:
        # A stream (mode "w|") into zlib: a third faster than tarfile's GzipFile.
        with tarfile.open(fileobj=gz or sink, mode="w|", bufsize=PACK_BUFSIZE) as tar:
            for path, name in workspace_entries(slot.root):
                if req.get("_gen", 0) != slot.generation:  # a cancel stops the pack
                    raise ToolError("cancelled", "snapshot cancelled")
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):  # tar would skip it unseen
                        counts["skipped"] += 1
                        continue
                    tar.add(path, arcname=name, recursive=False, filter=keep)
                except FileNotFoundError:  # deleted while we packed: as at that moment
                    counts["vanished"] = counts.get("vanished", 0) + 1
        if gz is not None:
            gz.close()
    except ArchiveTooLarge:
        sink.buf = None
    if sink.buf is None:
        how = "compressed" if compress else "uncompressed"
        message = "the workspace is more than %d bytes %s (the snapshot cap)" % (cap, how)
        return {"ok": False, "error_code": "limit_exceeded", "error": message}
    return {"blob": sink.buf.getvalue(), "data": counts}


def native_untar(slot, source):
    """A plain tar (our own pack of a workspace) into the new workspace with the
    image's ``tar``: a fork's copies unpack several times faster than with tarfile
    (measured: bench/RESULTS.md, issue 31). Directories are made owner-writable,
    as ``set_dir_modes`` does. None when the image has no tar or it failed (the
    caller unpacks with tarfile then, over what is there)."""
    tar = shutil.which("tar")
    if isinstance(source, str):  # a file the worker staged
        with open(source, "rb") as fh:
            head, data, name = fh.read(2), None, source
    else:
        head, data, name = source[:2], source, "-"
    if tar is None or head == b"\x1f\x8b":
        return None
    try:
        done = subprocess.run(
            [tar, "-x", "-p", "-f", name, "-C", slot.root],
            input=data,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    entries, total = 0, 0
    for top, dirs, files in os.walk(slot.root):
        mode = stat.S_IMODE(os.lstat(top).st_mode)
        if mode & 0o700 != 0o700:
            os.chmod(top, mode | 0o700)
        entries += len(dirs) + len(files)
        for name in files:
            info = os.lstat(os.path.join(top, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return entries, total


def tool_snapshot_unpack(slot, args, req):
    """A snapshot's tar.gz (the request's blob, or ``file``: an archive the worker put
    in the container through the engine, removed once read) into the (new)
    workspace, links kept."""
    path = args.get("file")
    # "native": the worker's own pack of a workspace (no crafted archive from Redis)
    native = args.get("native")
    if not path:
        counts = native and native_untar(slot, req["blob"])
        counts = counts or restore_into(slot, req["blob"])
        return {"output": "", "data": {"entries": counts[0], "bytes": counts[1]}}
    if not os.path.isfile(path):  # not where the worker put it: it sends the bytes
        raise ToolError("not_found", "no archive at %s" % path)
    try:
        counts = native and native_untar(slot, path)
        if not counts:
            with open(path, "rb") as fh:
                counts = restore_into(slot, fh)
        entries, total = counts
    finally:
        for remove in (os.unlink, os.rmdir):  # the file, then its own directory
            try:
                remove(path if remove is os.unlink else os.path.dirname(path))
            except OSError:
                pass
    return {"output": "", "data": {"entries": entries, "bytes": total}}
