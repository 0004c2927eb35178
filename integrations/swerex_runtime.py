"""``ToolqRuntime``: SWE-ReX's ``AbstractRuntime`` as calls of one toolq trajectory.

Bash sessions are ``shell`` sessions, ``execute`` is a ``bash`` call, files go
through ``read_file``/``write_file`` (see ``swerex_files`` for the paths).
Failures become SWE-ReX's exceptions (``swerex_errors``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from swerex.exceptions import (
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    Action,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionResponse,
    CloseResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    Command,
    CommandResponse,
    CreateBashSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    IsAliveResponse,
    Observation,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)
from swerex.utils.log import get_logger

from toolq.producer import AsyncClient, AsyncTrajectory, ToolCall, WaitTimeout, spec_wait_s
from toolq.producer.model_calls import CLIENT_FAILURES
from toolq.schemas import Result, TrajectoryRecord, TrajectorySpec

from .swerex_commands import execute_script, split_streams, syntax_error, with_syntax_check
from .swerex_errors import ToolqRuntimeError, raise_for_error
from .swerex_files import (
    CHUNK_BYTES,
    Calls,
    WorkspacePaths,
    batches,
    upload_calls,
    write_calls,
)
from .swerex_interactive import (
    SAVE_STATE,
    observation,
    send_call,
    start_call,
    still_running,
)


class ToolqRuntime(AbstractRuntime):
    """A SWE-ReX runtime whose commands and files are calls of one open toolq trajectory.

    Connections: with ``client`` (an ``AsyncClient``, which belongs to the event loop
    it runs in), every call goes through it, so any number of runtimes share its
    connections and its one event reader; whoever made it closes it. Without, each
    operation connects and disconnects on its own, so the runtime works when every
    call runs in an event loop of its own (SWE-agent ``asyncio.run``s each one).

    Calls wait for their result up to their timeout (capped by the spec's
    ``max_call_timeout_s``, which stands in for none) plus ``wait_slack_s`` for
    queueing (``toolq.producer.spec_wait_s``), then raise toolq's ``WaitTimeout``.
    """

    def __init__(
        self,
        trajectory_id: str,
        *,
        spec: TrajectorySpec | None = None,
        redis_url: str | None = None,
        namespace: str | None = None,
        client: AsyncClient | None = None,
        workspace_root: str = "/workspace",
        wait_slack_s: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.trajectory_id = trajectory_id
        self.spec = spec or TrajectorySpec()
        self.paths = WorkspacePaths(workspace_root, self.spec.workdir)
        self._redis_url, self._namespace, self._client = redis_url, namespace, client
        self._wait_slack_s = wait_slack_s
        self._sessions: set[str] = set()
        self._interactive: set[str] = set()  # sessions with a program on their terminal
        self.logger = logger or get_logger("rex-runtime")

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[AsyncTrajectory]:
        """The trajectory, through the shared client or one of this operation's own.
        A failure of the client in the block is raised as a ``ToolqRuntimeError``
        (``redis_unreachable``, ...), but for ``WaitTimeout``."""
        try:
            if self._client is not None:
                yield self._client.trajectory(self.trajectory_id, self.spec)
                return
            async with AsyncClient(self._redis_url, self._namespace) as client:
                yield client.trajectory(self.trajectory_id, self.spec)
        except WaitTimeout:
            raise  # a TimeoutError of its own (the call may still finish): documented as is
        except CLIENT_FAILURES as exc:
            raise ToolqRuntimeError.of_client_failure(exc) from exc

    async def _call(
        self, tool: str, args: dict[str, Any], timeout_s: float | None = None, **kw: Any
    ) -> Result:
        async with self.connected() as trajectory:
            return await self._call_on(trajectory, tool, args, timeout_s, **kw)

    async def _call_on(
        self,
        trajectory: AsyncTrajectory,
        tool: str,
        args: dict[str, Any],
        timeout_s: float | None = None,
        **kw: Any,
    ) -> Result:
        wait_s = spec_wait_s(self.spec, timeout_s, margin_s=self._wait_slack_s)
        return await trajectory.call(tool, args, timeout_s=timeout_s, wait_s=wait_s, **kw)

    def timeout_s(self, timeout_s: float | None) -> float:
        """The timeout a call runs with, as the worker decides it from the spec: its
        own, else the spec's ``call_timeout_s``, capped by ``max_call_timeout_s``."""
        limits = self.spec.limits
        asked_s = limits.call_timeout_s if timeout_s is None else timeout_s
        return min(asked_s, limits.max_call_timeout_s)

    # ------------------------------------------------------------ liveness
    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        """Alive while the trajectory is open (pending or running); the message
        says why not (ended, unknown, Redis unreachable within ``timeout``)."""
        try:
            record = await asyncio.wait_for(self._record(), timeout or 10.0)
        except (asyncio.TimeoutError, ToolqRuntimeError, RedisError, OSError) as exc:
            message = f"cannot read trajectory {self.trajectory_id!r}: {exc!r}"
            return IsAliveResponse(is_alive=False, message=message)
        return alive_response(self.trajectory_id, record)

    async def _record(self) -> TrajectoryRecord | None:
        async with self.connected() as trajectory:
            return await trajectory.record()

    # ------------------------------------------------------------- sessions
    async def create_session(self, request: CreateSessionRequest) -> CreateSessionResponse:
        """Start a fresh ``shell`` session of that name (``startup_source`` files
        sourced in it); ``SessionExistsError`` if this runtime has it open."""
        name = request.session
        if name in self._sessions:
            raise SessionExistsError(f"session {name} already exists")
        command = "\n".join(f"source {path}" for path in request.startup_source)
        args = {"command": command, "session": name, "restart": True}
        result = await self._call("shell", args, request.startup_timeout)
        timeout_s = self.timeout_s(request.startup_timeout)
        message = f"timeout after {timeout_s} seconds while starting session {name!r}"
        raise_for_error(result, timeout_message=message)
        self._sessions.add(name)
        return CreateBashSessionResponse(output=result.output)

    async def run_in_session(self, action: Action) -> Observation:
        """Run a command in a session, with SWE-ReX's ``check``, timeout and syntax
        errors. A ``BashInterruptAction`` has nothing to stop: toolq interrupts a
        command that times out (the session survives), and none runs between calls."""
        if action.session not in self._sessions:
            raise SessionDoesNotExistError(f"session {action.session!r} does not exist")
        if isinstance(action, BashInterruptAction):
            return await self._interrupt(action)
        if action.is_interactive_command or action.is_interactive_quit or action.expect:
            return await self._run_interactive(action)
        token = f"TOOLQ{uuid.uuid4().hex}"
        args = {"command": with_syntax_check(action.command, token), "session": action.session}
        result = await self._call("shell", args, action.timeout)
        timeout_s = self.timeout_s(action.timeout)
        message = f"timeout after {timeout_s} seconds while running command {action.command!r}"
        raise_for_error(result, timeout_message=message)
        error = syntax_error(result, token, action.command)
        if error is not None:
            raise error
        if action.check == "raise" and result.exit_code != 0:
            message = (
                f"Command {action.command!r} failed with exit code {result.exit_code}. "
                f"Here is the output:\n{result.output!r}"
            )
            raise NonZeroExitCodeError(
                f"{action.error_msg}: {message}" if action.error_msg else message
            )
        exit_code = None if action.check == "ignore" else result.exit_code
        return BashObservation(
            output=result.output, exit_code=exit_code, failure_reason=session_note(result)
        )

    async def _run_interactive(self, action: BashAction) -> Observation:
        """An interactive program on the session's terminal (``swerex_interactive``):
        started in the session's state when none runs, else typed into."""
        timeout_s = self.timeout_s(action.timeout)
        session = action.session
        async with self.connected() as trajectory:
            if session in self._interactive:
                call = send_call(session, action, timeout_s)
            else:
                saved = await self._call_on(
                    trajectory, "shell", {"command": SAVE_STATE, "session": session}
                )
                raise_for_error(saved)
                call = start_call(session, action, saved.output.strip(), timeout_s)
            result = await self._call_on(trajectory, call.tool, call.args, timeout_s)
        if result.error_code != "timeout":
            raise_for_error(result)
        if still_running(result) or result.timed_out:
            self._interactive.add(session)
        else:
            self._interactive.discard(session)
        observed = observation(action, result, timeout_s)
        if action.check == "raise" and observed.exit_code not in (0, None):
            raise NonZeroExitCodeError(
                f"Command {action.command!r} failed with exit code {observed.exit_code}. "
                f"Here is the output:\n{observed.output!r}"
            )
        return observed

    async def _interrupt(self, action: BashInterruptAction) -> Observation:
        """Ctrl-C to the session's interactive program, if one runs; killed if it does
        not end (as swe-rex's fallback kills the job). Otherwise nothing runs: toolq
        interrupted a command that timed out already."""
        if action.session not in self._interactive:
            return BashObservation(exit_code=0)
        self._interactive.discard(action.session)
        args = {"terminal": action.session, "keys": "C-c", "view": "text"}
        wait = {"wait_for": "(?!)", "timeout_s": max(action.timeout * action.n_retry, 0.5)}
        async with self.connected() as trajectory:
            result = await self._call_on(trajectory, "terminal_send", {**args, **wait})
            output = result.output
            if (result.data or {}).get("alive"):
                closed = await self._call_on(
                    trajectory, "terminal_close", {"terminal": action.session}
                )
                output += closed.output
        return BashObservation(output=output.strip(), exit_code=0)

    async def close_session(self, request: CloseSessionRequest) -> CloseSessionResponse:
        """End the session's shell (``exit``); ``SessionDoesNotExistError`` if not open."""
        if request.session not in self._sessions:
            raise SessionDoesNotExistError(f"session {request.session!r} does not exist")
        self._sessions.discard(request.session)
        result = await self._call("shell", {"command": "exit 0", "session": request.session})
        raise_for_error(result)
        return CloseBashSessionResponse()

    # ------------------------------------------------------------ commands
    async def execute(self, command: Command) -> CommandResponse:
        """Run a command as ``subprocess.run`` would, in a fresh ``bash`` call (in the
        working directory unless ``cwd``); stdout and stderr apart unless merged."""
        token = f"TOOLQ{uuid.uuid4().hex}"
        script = execute_script(command, self.paths.shell_cwd(command.cwd), token)
        result = await self._call("bash", {"command": script}, command.timeout)
        message = f"Timeout ({self.timeout_s(command.timeout)}s) exceeded while running command"
        raise_for_error(result, timeout_message=message)
        if command.merge_output_streams:
            stdout, stderr = result.output, ""
        else:
            stdout, stderr = split_streams(result.output, token)
        if command.check and result.exit_code != 0:
            message = (
                f"Command {command.command!r} failed with exit code {result.exit_code}. "
                f"Stdout:\n{stdout!r}\nStderr:\n{stderr!r}"
            )
            raise NonZeroExitCodeError(
                f"{command.error_msg}: {message}" if command.error_msg else message
            )
        return CommandResponse(stdout=stdout, stderr=stderr, exit_code=result.exit_code)

    # --------------------------------------------------------------- files
    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        """A workspace file's text (``encoding`` default UTF-8, ``errors`` default
        strict, as ``Path.read_text``); ``FileNotFoundError`` if it does not exist."""
        data = await self.read_bytes(request.path)
        return ReadFileResponse(
            content=data.decode(request.encoding or "utf-8", request.errors or "strict")
        )

    async def read_bytes(self, path: str) -> bytes:
        """A workspace file's bytes, read in chunks of ``CHUNK_BYTES``."""
        target, chunks, offset = self.paths.resolve(path), [], 0
        async with self.connected() as trajectory:
            while True:
                args = {"path": target, "offset": offset, "limit": CHUNK_BYTES}
                args["encoding"] = "base64"
                result = await self._call_on(trajectory, "read_file", args, idempotent=True)
                raise_for_error(result, path=path)
                chunk = base64.b64decode(result.output)
                chunks.append(chunk)
                offset += len(chunk)
                if not chunk or offset >= int((result.data or {}).get("size", 0)):
                    return b"".join(chunks)

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        """Write text (UTF-8) to a workspace file; parent directories are created."""
        target = self.paths.resolve(request.path)
        await self._run_writes(write_calls(target, io.BytesIO(request.content.encode())))
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """Copy a local file, or a directory's content, to ``target_path`` in the
        workspace (``write_file`` calls, base64, in chunks; permission bits kept)."""
        source = Path(request.source_path)
        if not source.exists():
            raise FileNotFoundError(f"upload source {request.source_path!r} does not exist")
        await self._run_writes(upload_calls(source, request.target_path, self.paths))
        return UploadResponse()

    async def _run_writes(self, calls: Calls) -> None:
        """Send ``calls`` in batches (``call_many``); each batch is made in a worker
        thread, where the walk and the reads of an upload block, not the event loop."""
        pending = batches(calls)
        try:
            async with self.connected() as trajectory:
                while batch := await asyncio.to_thread(next, pending, None):
                    for result in await trajectory.call_many(batch):
                        raise_for_error(result)
                        if not result.ok:  # the mkdir of empty directories failed
                            raise ToolqRuntimeError.of_result(result)
        finally:
            # Close the file being read. A batch still being made (we were cancelled)
            # holds the generator: dropping it when done closes the file then.
            with contextlib.suppress(ValueError):
                pending.close()
                calls.close()

    async def close(self) -> CloseResponse:
        """End this runtime's shell sessions (a trajectory that ended took them along)."""
        names, self._sessions = sorted(self._sessions), set()
        if names:
            exits = [ToolCall("shell", {"command": "exit 0", "session": n}) for n in names]
            async with self.connected() as trajectory:
                await trajectory.call_many(exits)
        return CloseResponse()


def alive_response(traj_id: str, record: TrajectoryRecord | None) -> IsAliveResponse:
    """``is_alive``'s answer for a trajectory's record."""
    if record is None:
        return IsAliveResponse(is_alive=False, message=f"trajectory {traj_id!r} does not exist")
    if record.status.final:
        message = f"trajectory {traj_id!r} has ended: {record.status.value} ({record.reason})"
        return IsAliveResponse(is_alive=False, message=message)
    return IsAliveResponse(is_alive=True)


def session_note(result: Result) -> str:
    """``failure_reason`` of a session command whose shell ended or was replaced."""
    data = result.data or {}
    if data.get("session_ended"):
        return "the session's shell ended; the next command runs in a fresh shell"
    if data.get("restarted"):
        return "the session's shell had ended; this command ran in a fresh shell"
    return ""
