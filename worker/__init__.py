"""toolq worker. ``tool`` and ``ToolArgs`` declare user tools (see docs/external-tools.md)."""

from .registry import ToolDefinitionError, tool
from .tools import ToolArgs

__all__ = ["ToolArgs", "ToolDefinitionError", "tool"]
