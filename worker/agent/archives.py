"""Archives: ``archive`` (a tar.gz of a path, capped) and ``unpack`` (a tar.gz into
the workspace, all or nothing); snapshots pack and restore with the same checks."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import zlib

from .files import MAX_FILE_BYTES, rel_path
from .protocol import ToolError
from .slot import resolve_path

DEFAULT_ARCHIVE_BYTES = 8 * 1024 * 1024
# An archive over its cap is still measured (without keeping it) up to this
# many times the cap, so the error can say how big it is.
ARCHIVE_MEASURE_FACTOR = 16


class ArchiveTooLarge(Exception):
    pass


class ArchiveSink(object):
    """Keeps the compressed bytes up to ``cap``; past it only counts, up to ``measure_cap``."""

    def __init__(self, cap, measure_cap):
        self.cap = cap
        self.measure_cap = measure_cap
        self.buf = io.BytesIO()
        self.total = 0

    def write(self, data):
        self.total += len(data)
        if self.total <= self.cap:
            self.buf.write(data)
        elif self.buf is not None:
            self.buf = None  # over the cap: keep measuring, stop keeping
        if self.total > self.measure_cap:
            raise ArchiveTooLarge()
        return len(data)

    def flush(self):
        pass


def tool_archive(slot, args, req):
    """A tar.gz of a file or directory, base64 in ``output``; over ``max_bytes`` is an error."""
    path = resolve_path(slot, args["path"])
    cap = int(args.get("max_bytes") or DEFAULT_ARCHIVE_BYTES)
    if cap < 1 or cap > MAX_FILE_BYTES:
        raise ValueError("max_bytes must be between 1 and %d" % MAX_FILE_BYTES)
    if not os.path.lexists(path):
        raise ToolError("not_found", "no such file or directory: %s" % args["path"])
    counts = {"entries": 0, "bytes": 0}

    def count(info):
        counts["entries"] += 1
        counts["bytes"] += info.size if info.isfile() else 0
        return info

    sink = ArchiveSink(cap, cap * ARCHIVE_MEASURE_FACTOR)
    finished = True
    try:
        with tarfile.open(fileobj=sink, mode="w:gz") as tar:
            tar.add(path, arcname=rel_path(slot, path), recursive=True, filter=count)
    except ArchiveTooLarge:
        finished = False
    if sink.buf is None:
        return archive_too_large(args["path"], cap, sink.total, finished, counts)
    data = sink.buf.getvalue()
    return {
        "output": base64.b64encode(data).decode("ascii"),
        "output_bytes": len(data),
        "data": {
            "encoding": "base64",
            "format": "tar.gz",
            "bytes": len(data),
            "entries": counts["entries"],
            "uncompressed_bytes": counts["bytes"],
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }


def archive_too_large(shown, cap, size, finished, counts):
    size_text = "%d bytes" % size if finished else "more than %d bytes" % size
    return {
        "ok": False,
        "error_code": "limit_exceeded",
        "error": "the archive of %s is %s compressed (%d entries%s); max_bytes is %d"
        % (shown, size_text, counts["entries"], "" if finished else " so far", cap),
        "data": {
            "bytes": size if finished else None,
            "at_least_bytes": size,
            "entries": counts["entries"],
            "complete_count": finished,
            "max_bytes": cap,
        },
    }


DEFAULT_UNPACK_BYTES = 1024 * 1024 * 1024
MAX_UNPACK_ENTRIES = 200000
# Snapshots compress for speed: a workspace is packed while its trajectory waits.
PACK_COMPRESSLEVEL = 1
PACK_BUFSIZE = 64 * 1024


def decode_base64(text, what):
    if not isinstance(text, str):
        raise TypeError("%s must be a base64 string" % what)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("%s is not valid base64: %s" % (what, exc)) from None


def entry_parts(name, what):
    """The path parts of an archive name; ToolError for absolute names and ``..``."""
    if name.startswith("/") or "\x00" in name:
        raise ToolError("path_outside_workspace", "%s %r is an absolute path" % (what, name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ToolError("path_outside_workspace", "%s %r climbs out with '..'" % (what, name))
    return parts


def check_member(member, links, seen, total, max_bytes):
    """Refuse a member that may not be unpacked; returns the bytes unpacked so far.

    ``links`` allows symlinks and hard links (a snapshot's own workspace);
    uploads may not carry them. A tar bomb stops at the first header past a cap.
    """
    entry_parts(member.name, "archive entry")
    if member.issym() or member.islnk():
        if not links:
            kind = "symlink" if member.issym() else "hard link"
            raise ToolError(
                "invalid_args",
                "archive entry %r is a %s; uploads may not contain links" % (member.name, kind),
            )
        if member.islnk():
            entry_parts(member.linkname, "hard link target")
    elif not (member.isfile() or member.isdir()):
        what = "a device, FIFO or other special file"
        raise ToolError("invalid_args", "archive entry %r is %s" % (member.name, what))
    total += member.size if member.isfile() else 0
    if total > max_bytes or seen >= MAX_UNPACK_ENTRIES:
        raise ToolError(
            "limit_exceeded",
            "the archive unpacks to more than %d bytes or %d entries (at %r)"
            % (max_bytes, MAX_UNPACK_ENTRIES, member.name),
        )
    return total


def check_members(tar, links, max_bytes):
    """Every member checked before anything is written: (members, bytes)."""
    members, total = [], 0
    for member in tar:
        total = check_member(member, links, len(members), total, max_bytes)
        members.append(member)
    verify_trailer(tar)
    return members, total


def verify_trailer(tar):
    """Read a gzip stream to its end, so that its CRC and length are checked (tar
    stops reading at its end marker): a corrupted archive is refused, not landed."""
    if not isinstance(tar.fileobj, gzip.GzipFile):
        return
    try:
        while tar.fileobj.read(1 << 20):
            pass
    except (OSError, EOFError) as exc:
        raise ToolError("invalid_args", "the archive is damaged: %s" % exc) from None


def inside(root, path):
    return path == root or path.startswith(root + os.sep)


def ensure_dirs(root, path):
    """Create the missing directories of ``path`` (under ``root``) one by one, so
    that none is ever made through a symlink that leads out of the workspace."""
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            current = os.path.realpath(current)
            if not inside(root, current):
                raise ToolError("path_outside_workspace", "%s leads outside the workspace" % path)
        elif not os.path.lexists(current):
            os.mkdir(current, 0o700)
        elif not os.path.isdir(current):
            raise ToolError("io_error", "%s is not a directory" % current)
    return current


def check_targets(root, dest, members):
    """Refuse, before anything is written, a member that would land through a
    symlink leading out of the workspace (one already there, or one the archive
    makes first) or below something that is not a directory: with the checks of
    ``check_members``, unpack writes all of an archive or nothing. An entry
    replaces what is at its own name (a symlink, a file), as ``unpack_member``
    does."""
    made = {}  # path -> what the archive put there so far: "dir", "file" or a link target
    for member in members:
        target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
        walk_existing(root, os.path.dirname(target) if target != dest else dest, made)
        in_the_way = (
            target not in made
            and os.path.isdir(target)
            and not os.path.islink(target)
            and os.listdir(target)
        )
        if not member.isdir() and in_the_way:  # an empty one gives way (unpack_member)
            raise ToolError("io_error", "%s is a directory in the workspace" % member.name)
        if member.isdir():
            made[target] = "dir"
        elif member.issym():
            made[target] = ("link", member.linkname)
        else:
            made[target] = "file"


def walk_existing(root, path, made):
    """``ensure_dirs`` without writing: each part of ``path`` is a directory, a
    symlink that stays in the workspace, or missing (it will be made), counting
    what the archive's earlier entries ``made``."""
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        kind = made.get(current)
        if kind == "dir":
            continue
        if kind == "file" or (
            kind is None
            and os.path.lexists(current)
            and not os.path.islink(current)
            and not os.path.isdir(current)
        ):
            raise ToolError("io_error", "%s is not a directory" % current)
        if kind is not None:
            current = os.path.normpath(os.path.join(os.path.dirname(current), kind[1]))
        elif os.path.islink(current):
            current = os.path.realpath(current)
        else:
            continue
        if not inside(root, current):
            raise ToolError("path_outside_workspace", "%s leads outside the workspace" % path)


def make_room(root, target):
    """The parent of ``target`` exists in the workspace (no symlink leads out),
    and nothing but a directory stays at ``target`` itself."""
    ensure_dirs(root, os.path.dirname(target))
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        os.unlink(target)


def unpack_member(tar, root, dest, member):
    target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
    if target == dest:
        return
    make_room(root, target)
    if not member.isdir() and os.path.isdir(target) and not os.path.islink(target):
        try:  # an empty directory (the spec's workdir, made at init) gives way
            os.rmdir(target)
        except OSError:
            raise ToolError(
                "io_error", "%s is a directory in the workspace" % member.name
            ) from None
    if member.isdir():
        if not os.path.isdir(target):
            os.mkdir(target, 0o700)
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = os.path.join(dest, *entry_parts(member.linkname, "hard link target"))
        if not inside(root, os.path.realpath(os.path.dirname(source))):
            raise ToolError("path_outside_workspace", "hard link %r leads outside" % member.name)
        os.link(source, target, follow_symlinks=False)
    else:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(tar.extractfile(member), out)
        os.chmod(target, member.mode & 0o777)
        os.utime(target, (member.mtime, member.mtime))


def unpack_into(slot, dest, data, links, max_bytes):
    """Unpack a tar.gz into ``dest`` (a workspace directory), all or nothing: every
    member is checked before the first is written. Returns (entries, bytes)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members, total = check_members(tar, links, max_bytes)
            check_targets(slot.root, dest, members)
            ensure_dirs(slot.root, dest)
            for member in members:
                unpack_member(tar, slot.root, dest, member)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ToolError("invalid_args", "not a readable tar.gz archive: %s" % exc) from None
    set_dir_modes(dest, members)
    return len(members), total


def restore_into(slot, source):
    """A snapshot's tar.gz (or plain tar; its bytes, or a binary file) into a new
    workspace in one streaming pass, each member checked as it comes (the worker
    checked the files' sha256; a refused member fails the trajectory anyway).
    Returns (entries, bytes)."""
    members, total = [], 0
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    mode = "r|gz" if fileobj.read(2) == b"\x1f\x8b" else "r|"
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode=mode, bufsize=PACK_BUFSIZE) as tar:
            for member in tar:
                total = check_member(member, True, len(members), total, DEFAULT_UNPACK_BYTES * 64)
                unpack_member(tar, slot.root, slot.root, member)
                members.append(member)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ToolError("invalid_args", "not a readable tar.gz archive: %s" % exc) from None
    set_dir_modes(slot.root, members)
    return len(members), total


def set_dir_modes(dest, members):
    for member in reversed(members):  # modes last: a read-only directory is filled first
        if member.isdir():
            target = os.path.join(dest, *entry_parts(member.name, "archive entry"))
            os.chmod(target, (member.mode & 0o777) | 0o700)


def tool_unpack(slot, args, req):
    """Unpack a tar.gz (base64) into a workspace directory; links and escapes are refused."""
    dest = resolve_path(slot, args.get("path") or ".")
    data = decode_base64(args["data"], "data")
    cap = int(args.get("max_bytes") or DEFAULT_UNPACK_BYTES)
    entries, total = unpack_into(slot, dest, data, False, cap)
    shown = rel_path(slot, dest)
    return {
        "output": "unpacked %d entries (%d bytes) into %s" % (entries, total, shown),
        "data": {"path": shown, "entries": entries, "bytes": total},
    }
