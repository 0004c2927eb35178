"""SWE-ReX exceptions for toolq results (used by ``toolq.integrations.swerex``).

A toolq result that failed becomes the exception SWE-ReX's own runtimes raise
for the same failure where SWE-ReX has one (``CommandTimeoutError``,
``NonZeroExitCodeError``, ``FileNotFoundError``, ...); every other failure is a
``ToolqRuntimeError`` that carries the result and its ``error_code``, as does a
failure of the client itself (Redis unreachable), toolq's ``WaitTimeout`` aside.
"""

from __future__ import annotations

import errno

from swerex.exceptions import CommandTimeoutError, SwerexException

from toolq.producer.model_calls import client_failure
from toolq.schemas import Result


class ToolqRuntimeError(SwerexException):
    """A toolq call failed in a way SWE-ReX has no exception for: a result's code
    (``trajectory_ended``, ``limit_exceeded``, ``sandbox_lost``, ...), or a failure of
    the client before any result came (``redis_unreachable``, ...; ``result`` is
    None). ``error_code`` says which; ``infra`` that the infrastructure, not the
    command, is to blame (mask such rollouts)."""

    def __init__(
        self, error_code: str, message: str, *, infra: bool = False, result: Result | None = None
    ) -> None:
        super().__init__(f"{error_code}: {message}")
        self.error_code, self.infra, self.result = error_code, infra, result

    @classmethod
    def of_result(cls, result: Result) -> ToolqRuntimeError:
        """The error of a failed result."""
        message = result.error or "the toolq call failed"
        return cls(result.error_code or "", message, infra=result.infra, result=result)

    @classmethod
    def of_client_failure(cls, exc: BaseException) -> ToolqRuntimeError:
        """The error of a client failure (``model_calls.client_failure`` names it)."""
        failed = client_failure(exc)
        return cls(failed.code, failed.message, infra=failed.infra)


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
    raise ToolqRuntimeError.of_result(result)
