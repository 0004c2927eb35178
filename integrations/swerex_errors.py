"""SWE-ReX exceptions for toolq results (used by ``toolq.integrations.swerex``).

A toolq result that failed becomes the exception SWE-ReX's own runtimes raise
for the same failure where SWE-ReX has one (``CommandTimeoutError``,
``NonZeroExitCodeError``, ``FileNotFoundError``, ...); every other failure is a
``ToolqRuntimeError`` that carries the result and its ``error_code``.
"""

from __future__ import annotations

import errno

from swerex.exceptions import CommandTimeoutError, SwerexException

from toolq.schemas import Result


class ToolqRuntimeError(SwerexException):
    """A toolq call failed in a way SWE-ReX has no exception for (``trajectory_ended``,
    ``limit_exceeded``, ``sandbox_lost``, ...); ``error_code`` and ``result`` say how."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"{result.error_code}: {result.error or 'the toolq call failed'}")
        self.result = result
        self.error_code = result.error_code or ""
        #: The infrastructure, not the command, is to blame (mask such rollouts).
        self.infra = result.infra


class PathOutsideWorkspaceError(SwerexException, PermissionError):
    """A path that lies outside the trajectory's workspace (refused, nothing done)."""


class UnsupportedActionError(SwerexException, NotImplementedError):
    """A SWE-ReX feature the toolq runtime does not have (interactive commands, expect)."""


def raise_for_error(result: Result, *, timeout_message: str = "", path: str | None = None) -> None:
    """Raise the SWE-ReX exception for a failed ``result``; a command's nonzero exit
    status (``exit_status``) is no error here: its caller applies ``check``."""
    code = result.error_code
    if result.ok or code == "exit_status":
        return
    if code == "timeout" and timeout_message:
        raise CommandTimeoutError(timeout_message)
    if code == "not_found":
        raise FileNotFoundError(errno.ENOENT, result.error or "not found", path)
    if code == "path_outside_workspace":
        raise PathOutsideWorkspaceError(result.error or f"{path!r} is outside the workspace")
    raise ToolqRuntimeError(result)
