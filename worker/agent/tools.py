"""Every tool of the agent, by the name a request's ``tool`` gives."""

from __future__ import annotations

from .archives import tool_archive, tool_unpack
from .background import tool_bg_list, tool_bg_output, tool_bg_start, tool_bg_stop
from .editor import tool_str_replace_editor
from .files import tool_edit_file, tool_list_files, tool_read_file, tool_write_file
from .shell import tool_bash, tool_shell
from .snapshots import tool_snapshot_pack, tool_snapshot_unpack
from .terminals import TERMINAL_TOOLS

TOOLS = {
    "bash": tool_bash,
    "read_file": tool_read_file,
    "write_file": tool_write_file,
    "shell": tool_shell,
    "bg_start": tool_bg_start,
    "bg_list": tool_bg_list,
    "bg_output": tool_bg_output,
    "bg_stop": tool_bg_stop,
    "edit_file": tool_edit_file,
    "list_files": tool_list_files,
    "archive": tool_archive,
    "unpack": tool_unpack,
    # the worker's own, for snapshots (not registered tools: no call can name them)
    "_snapshot_pack": tool_snapshot_pack,
    "_snapshot_unpack": tool_snapshot_unpack,
    "str_replace_editor": tool_str_replace_editor,
}
TOOLS.update(TERMINAL_TOOLS)
