"""``str_replace_editor``: the view/create/str_replace/insert/undo_edit file editor
several agent frameworks emit."""

from __future__ import annotations

import os

from .files import clean, join_lines, read_text, replace_text, split_lines, walk_entries, write_text
from .procs import Capture
from .protocol import ToolError, max_output_of
from .slot import resolve_path

SNIPPET_LINES = 4


def numbered(lines, first):
    return "\n".join("%6d\t%s" % (first + i, line) for i, line in enumerate(lines))


def snippet(text, line, added_lines):
    lines = clean(text).split("\n")
    start = max(1, line - SNIPPET_LINES)
    end = min(len(lines), line + added_lines + SNIPPET_LINES)
    return numbered(lines[start - 1 : end], start)


def editor_view(slot, path, args, req):
    shown = args["path"]
    if os.path.isdir(path):
        entries, _truncated, _errors = walk_entries(path, 2, 10000, hidden=False)
        visible = [e["path"] + ("/" if e["type"] == "dir" else "") for e in entries]
        header = "Here's the files and directories up to 2 levels deep in %s, " % shown
        return {"output": header + "excluding hidden items:\n" + "\n".join(visible)}
    lines, _trailing = split_lines(read_text(slot, path, shown))
    first, last = 1, len(lines)
    view_range = args.get("view_range")
    if view_range:
        first, last = int(view_range[0]), int(view_range[1])
        if last == -1:
            last = len(lines)
        if not 1 <= first <= last <= len(lines):
            raise ValueError(
                "view_range %r is outside the file's lines 1..%d" % (view_range, len(lines))
            )
    capture = Capture(max_output_of(req))
    capture.add(numbered(lines[first - 1 : last], first).encode("utf-8", "surrogateescape"))
    return {
        "output": "Here's the result of running `cat -n` on %s:\n%s\n" % (shown, capture.text()),
        "truncated": capture.truncated,
    }


def editor_create(slot, path, args, req):
    if os.path.exists(path):
        raise ToolError(
            "io_error",
            "File already exists at: %s. Cannot overwrite files using command `create`."
            % args["path"],
        )
    if args.get("file_text") is None:
        raise ValueError("file_text is required for command=create")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(slot, path, args["file_text"])
    return {"output": "File created successfully at: %s" % args["path"]}


def editor_str_replace(slot, path, args, req):
    if args.get("old_str") is None:
        raise ValueError("old_str is required for command=str_replace")
    new = args.get("new_str") or ""
    text = read_text(slot, path, args["path"])
    new_text, _n, line = replace_text(text, args["old_str"], new, None, False, args["path"])
    write_text(slot, path, new_text, before=text)
    return {"output": edited_message(args["path"], new_text, line, new.count("\n"))}


def editor_insert(slot, path, args, req):
    if args.get("insert_line") is None or args.get("new_str") is None:
        raise ValueError("insert_line and new_str are required for command=insert")
    text = read_text(slot, path, args["path"])
    lines, trailing = split_lines(text)
    at = int(args["insert_line"])
    if not 0 <= at <= len(lines):
        raise ValueError("insert_line %d is outside 0..%d" % (at, len(lines)))
    new_lines = args["new_str"].split("\n")
    new_text = join_lines(lines[:at] + new_lines + lines[at:], trailing)
    write_text(slot, path, new_text, before=text)
    return {"output": edited_message(args["path"], new_text, at + 1, len(new_lines) - 1)}


def edited_message(shown, text, line, added_lines):
    return (
        "The file %s has been edited. Here's the result of running `cat -n` on a snippet of %s:\n"
        "%s\nReview the changes and make sure they are as expected. Edit the file again if "
        "necessary." % (shown, shown, snippet(text, line, added_lines))
    )


def editor_undo_edit(slot, path, args, req):
    history = slot.edit_history.get(path)
    if not history:
        raise ToolError("not_found", "No edit history found for %s." % args["path"])
    write_text(slot, path, history.pop())
    return {"output": "Last edit to %s undone successfully." % args["path"]}


EDITOR_COMMANDS = {
    "view": editor_view,
    "create": editor_create,
    "str_replace": editor_str_replace,
    "insert": editor_insert,
    "undo_edit": editor_undo_edit,
}


def tool_str_replace_editor(slot, args, req):
    """The view/create/str_replace/insert/undo_edit file editor of agent frameworks."""
    command = args["command"]
    handler = EDITOR_COMMANDS.get(command)
    if handler is None:
        raise ValueError("command must be one of %s" % ", ".join(sorted(EDITOR_COMMANDS)))
    return handler(slot, resolve_path(slot, args["path"]), args, req)
