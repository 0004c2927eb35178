"""File tools: read_file, write_file, edit_file, list_files, and the text helpers
the editor shares."""

from __future__ import annotations

import base64
import hashlib
import os

from .procs import Capture
from .protocol import ToolError, max_output_of
from .slot import resolve_path

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_EDIT_BYTES = 16 * 1024 * 1024
MAX_UNDO = 10
MAX_UNDO_BYTES = 1024 * 1024
MAX_WALK_DEPTH = 64


def tool_read_file(slot, args, req):
    """Read a file (text or base64), optionally a byte range, optionally its sha256."""
    path = resolve_path(slot, args["path"])
    offset = int(args.get("offset", 0))
    limit = args.get("limit")
    encoding = args.get("encoding", "text")
    if encoding not in ("text", "base64"):
        raise ValueError("encoding must be 'text' or 'base64'")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    if not os.path.exists(path):
        raise ToolError("not_found", "no such file: %s" % args["path"])
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % args["path"])
    size = os.path.getsize(path)
    cap = max_output_of(req) if encoding == "text" else MAX_FILE_BYTES
    want = cap if limit is None else min(int(limit), cap)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(want)
    data_out = {"size": size, "offset": offset, "length": len(data), "encoding": encoding}
    if args.get("sha256"):
        data_out["sha256"] = file_sha256(path)
    text = (
        data.decode("utf-8", "replace")
        if encoding == "text"
        else base64.b64encode(data).decode("ascii")
    )
    # Cut short by the cap: fewer bytes than asked for, although more remain.
    truncated = offset + len(data) < size and (limit is None or len(data) < int(limit))
    return {"output": text, "output_bytes": size, "truncated": truncated, "data": data_out}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_write_file(slot, args, req):
    """Write (or append) text or base64 content; parent directories are created."""
    path = resolve_path(slot, args["path"])
    content = args["content"]
    if not isinstance(content, str):
        raise TypeError("content must be a string")
    encoding = args.get("encoding", "text")
    if encoding == "text":
        data = content.encode("utf-8")
    elif encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError as exc:
            raise ValueError("content is not valid base64: %s" % exc) from None
    else:
        raise ValueError("encoding must be 'text' or 'base64'")
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % args["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab" if args.get("append") else "wb") as fh:
        fh.write(data)
    if "mode" in args:
        os.chmod(path, int(str(args["mode"]), 8))
    rel = os.path.relpath(path, slot.root)
    return {"output": "wrote %d bytes to %s" % (len(data), rel), "data": {"bytes": len(data)}}


def rel_path(slot, path):
    return clean(os.path.relpath(path, slot.root))


def clean(text):
    """Text safe to put in a reply: undecodable bytes (surrogates) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def split_lines(text):
    """(lines, ends_with_newline): the lines ``cat -n`` would number."""
    lines = text.split("\n")
    trailing = text.endswith("\n") or not text
    if trailing:
        lines.pop()
    return lines, trailing


def join_lines(lines, trailing):
    return "\n".join(lines) + ("\n" if trailing and lines else "")


def read_text(slot, path, shown):
    """A workspace file's text; bytes that are not UTF-8 survive a write back."""
    if not os.path.exists(path):
        raise ToolError("not_found", "no such file: %s" % shown)
    if os.path.isdir(path):
        raise ToolError("io_error", "is a directory: %s" % shown)
    if os.path.getsize(path) > MAX_EDIT_BYTES:
        raise ToolError("io_error", "%s is larger than %d bytes" % (shown, MAX_EDIT_BYTES))
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", "surrogateescape")


def write_text(slot, path, text, before=None):
    """Write text (mode kept); remember ``before`` for undo_edit."""
    if before is not None and len(before) <= MAX_UNDO_BYTES:
        history = slot.edit_history.setdefault(path, [])
        history.append(before)
        del history[:-MAX_UNDO]
    with open(path, "wb") as fh:
        fh.write(text.encode("utf-8", "surrogateescape"))


def line_of(text, index):
    return text.count("\n", 0, index) + 1


def replace_text(text, old, new, count, replace_all, shown):
    """Exact replacement of ``old``; returns (new_text, replacements, first_line).

    ``old`` must occur exactly once, or exactly ``count`` times, or (with
    ``replace_all``) at least once.
    """
    if not isinstance(old, str) or not old:
        raise ValueError("old must be a non-empty string")
    if not isinstance(new, str):
        raise TypeError("new must be a string")
    found = text.count(old)
    if found == 0:
        raise ToolError("not_found", "the old text was not found in %s" % shown)
    expected = found if replace_all else (1 if count is None else int(count))
    if found != expected:
        lines, start = [], text.find(old)
        while start >= 0 and len(lines) < 10:
            lines.append(str(line_of(text, start)))
            start = text.find(old, start + 1)
        hint = (
            "add surrounding lines to make it unique, or pass count=%d" % found
            if count is None
            else "expected count=%d" % expected
        )
        raise ToolError(
            "invalid_args",
            "the old text occurs %d times in %s (lines %s); %s"
            % (found, shown, ", ".join(lines), hint),
        )
    return text.replace(old, new), found, line_of(text, text.find(old))


def tool_edit_file(slot, args, req):
    """Replace exact text in a file: ``old`` must match once (or ``count`` times)."""
    path = resolve_path(slot, args["path"])
    text = read_text(slot, path, args["path"])
    new_text, n, first = replace_text(
        text, args["old"], args["new"], args.get("count"), args.get("replace_all"), args["path"]
    )
    write_text(slot, path, new_text, before=text)
    return {
        "output": "edited %s: %d replacement%s (first at line %d)"
        % (rel_path(slot, path), n, "" if n == 1 else "s", first),
        "data": {
            "replacements": n,
            "line": first,
            "size": len(new_text.encode("utf-8", "surrogateescape")),
        },
    }


def entry_info(path, shown):
    st = os.lstat(path)
    if os.path.islink(path):
        kind = "symlink"
    elif os.path.isdir(path):
        kind = "dir"
    elif os.path.isfile(path):
        kind = "file"
    else:
        kind = "other"
    info = {
        "path": clean(shown),
        "type": kind,
        "size": st.st_size,
        "mtime_ms": int(st.st_mtime * 1000),
    }
    if kind == "symlink":
        try:
            info["target"] = clean(os.readlink(path))
        except OSError:
            pass
    return info


def walk_entries(top, max_depth, max_entries, hidden=True):
    """Sorted entries under ``top``, depth first, ``max_depth`` levels (1: ``top``'s own).

    Returns (entries, truncated, errors).
    """
    entries, errors = [], 0
    stack = [(top, "", 1)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            errors += 1
            continue
        subdirs = []
        for name in names:
            if not hidden and name.startswith("."):
                continue
            if len(entries) >= max_entries:
                return entries, True, errors
            full = os.path.join(directory, name)
            try:
                info = entry_info(full, prefix + name)
            except OSError:
                errors += 1
                continue
            entries.append(info)
            if depth < max_depth and info["type"] == "dir":
                subdirs.append((full, prefix + name + "/", depth + 1))
        stack.extend(reversed(subdirs))
    return entries, False, errors


def tool_list_files(slot, args, req):
    """List a directory (or ``recursive``ly a tree): type, size, mtime of each entry."""
    shown = args.get("path") or "."
    path = resolve_path(slot, shown)
    max_entries = int(args.get("max_entries") or 1000)
    if max_entries < 1:
        raise ValueError("max_entries must be >= 1")
    if not os.path.lexists(path):
        raise ToolError("not_found", "no such file or directory: %s" % shown)
    if os.path.isdir(path):
        depth = MAX_WALK_DEPTH if args.get("recursive") else 1
        entries, truncated, errors = walk_entries(path, depth, max_entries)
    else:
        entries, truncated, errors = [entry_info(path, os.path.basename(path))], False, 0
    lines = [
        "%-7s %10s  %s%s"
        % (
            e["type"],
            e["size"] if e["type"] == "file" else "-",
            e["path"],
            "/"
            if e["type"] == "dir"
            else (" -> " + e.get("target", "?") if e["type"] == "symlink" else ""),
        )
        for e in entries
    ]
    if truncated:
        lines.append("[listing truncated at max_entries=%d]" % max_entries)
    capture = Capture(max_output_of(req))
    capture.add("\n".join(lines).encode("utf-8", "surrogateescape"))
    data = {"path": rel_path(slot, path), "entries": entries, "truncated": truncated}
    if errors:
        data["unreadable"] = errors
    return {
        "output": capture.text(),
        "truncated": truncated or capture.truncated,
        "output_bytes": capture.total,
        "data": data,
    }
