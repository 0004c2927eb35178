"""SWE-ReX's runtime on toolq: bash sessions, their exit codes, syntax errors and
timeouts, and ``execute``, driven through swe-rex's own request and response types
against a live worker over a real Redis (files: ``test_swerex_files.py``;
deployments: ``test_swerex_deployment.py``).

Where SWE-ReX defines the answer (an exception's type and message), swe-rex's own
``LocalRuntime`` runs the same request and the two are compared.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from swerex.exceptions import (
    BashIncorrectSyntaxError,
    CommandTimeoutError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    BashInterruptAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    WriteFileRequest,
)
from swerex.runtime.local import LocalRuntime

from tests.swerex_support import (
    A,
    Deployer,
    deployer,
    error_of,
    every_call_answered,
    runtime_with_session,
    swerex_error,
)
from toolq.integrations.swerex import (
    ToolqRuntimeError,
)
from toolq.producer import Client


@pytest.fixture
def deployed(redis_url: str, ns: str) -> Deployer:
    return deployer(redis_url, ns)


# ------------------------------------------------------------ sessions
def test_sessions_keep_cwd_env_and_functions_and_are_independent(start_worker, deployed):
    start_worker("local")

    async def main() -> list[str]:
        async with runtime_with_session(deployed) as rt:
            await rt.run_in_session(A("mkdir -p src/pkg && cd src/pkg && export LEVEL=3"))
            await rt.run_in_session(A('greet() { echo "hi $1"; }'))
            await rt.create_session(CreateBashSessionRequest(session="other"))
            # two sessions, concurrently: each keeps its own state
            here, there = await asyncio.gather(
                rt.run_in_session(A("pwd; echo ${LEVEL:-unset}; greet you")),
                rt.run_in_session(A("pwd; echo ${LEVEL:-unset}", session="other")),
            )
            with pytest.raises(SessionExistsError, match="session other already exists"):
                await rt.create_session(CreateBashSessionRequest(session="other"))
            await rt.close_session(CloseBashSessionRequest(session="other"))
            with pytest.raises(SessionDoesNotExistError, match="'other' does not exist"):
                await rt.run_in_session(A("true", session="other"))
            with pytest.raises(SessionDoesNotExistError):
                await rt.close_session(CloseBashSessionRequest(session="other"))
            # created again: a fresh shell
            await rt.create_session(CreateBashSessionRequest(session="other"))
            again = await rt.run_in_session(A("echo ${LEVEL:-unset}", session="other"))
            # closing the runtime ends every session
            await rt.close()
            with pytest.raises(SessionDoesNotExistError):
                await rt.run_in_session(A("true"))
            await rt.create_session(CreateBashSessionRequest())
            reopened = await rt.run_in_session(A("pwd; echo ${LEVEL:-unset}"))
            return [here.output, there.output, again.output, reopened.output]

    here, there, again, reopened = asyncio.run(main())
    lines = here.splitlines()
    assert lines[0].endswith("/src/pkg") and lines[1:] == ["3", "hi you"]
    other = there.splitlines()
    assert not other[0].endswith("/src/pkg") and other[1] == "unset"
    assert lines[0] == other[0] + "/src/pkg"  # both started in the working directory
    assert again == "unset\n"
    assert reopened.splitlines() == [other[0], "unset"]


def test_a_session_sources_its_startup_files(start_worker, deployed):
    start_worker("local")

    async def main() -> str:
        async with deployed() as deployment:
            rt = deployment.runtime
            await rt.write_file(WriteFileRequest(path="env.sh", content="export FROM_RC=yes\n"))
            await rt.create_session(CreateBashSessionRequest(startup_source=["env.sh"]))
            # a start-up file that does not finish in time: no session
            await rt.write_file(WriteFileRequest(path="slow.sh", content="sleep 30\n"))
            slow = CreateBashSessionRequest(
                session="slow", startup_source=["slow.sh"], startup_timeout=0.5
            )
            with pytest.raises(CommandTimeoutError, match="while starting session 'slow'"):
                await rt.create_session(slow)
            with pytest.raises(SessionDoesNotExistError):
                await rt.run_in_session(A("true", session="slow"))
            return (await rt.run_in_session(A("echo $FROM_RC"))).output

    assert asyncio.run(main()) == "yes\n"


def test_a_bad_session_name_is_refused(start_worker, deployed):
    start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            with pytest.raises(ToolqRuntimeError, match="session") as bad_name:
                await rt.create_session(CreateBashSessionRequest(session="no spaces"))
            assert bad_name.value.error_code == "invalid_args"
            with pytest.raises(SessionDoesNotExistError):  # it was not created
                await rt.run_in_session(A("true", session="no spaces"))
            assert (await rt.run_in_session(A("echo still"))).output == "still\n"

    asyncio.run(main())


def test_a_trajectory_has_at_most_eight_session_names(start_worker, deployed):
    start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            for i in range(1, 8):
                await rt.create_session(CreateBashSessionRequest(session=f"s{i}"))
            await rt.close_session(CloseBashSessionRequest(session="s7"))
            # a closed session's name still counts (toolq keeps it for a restart) ...
            with pytest.raises(ToolqRuntimeError, match="at most 8 shell sessions") as full:
                await rt.create_session(CreateBashSessionRequest(session="s8"))
            assert full.value.error_code == "limit_exceeded"
            # ... and can be used again
            await rt.create_session(CreateBashSessionRequest(session="s7"))
            assert (await rt.run_in_session(A("echo seven", session="s7"))).output == "seven\n"

    asyncio.run(main())


# ------------------------------------------------------ exit codes, check
def test_check_modes_and_exit_codes(start_worker, deployed):
    start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            with pytest.raises(NonZeroExitCodeError) as raised:
                await rt.run_in_session(A("echo oops; exit_with() { return $1; }; exit_with 4"))
            assert str(raised.value) == (
                "Command 'echo oops; exit_with() { return $1; }; exit_with 4' failed with "
                "exit code 4. Here is the output:\n'oops\\n'"
            )
            with pytest.raises(NonZeroExitCodeError, match=r"^setup failed: Command 'false'"):
                await rt.run_in_session(A("false", error_msg="setup failed"))
            silent = await rt.run_in_session(A("echo out; false", check="silent"))
            assert (silent.output, silent.exit_code) == ("out\n", 1)
            ignored = await rt.run_in_session(A("false", check="ignore"))
            assert ignored.exit_code is None
            missing = await rt.run_in_session(A("no_such_command_xyz", check="silent"))
            assert missing.exit_code == 127 and "not found" in missing.output
            ok = await rt.run_in_session(A("false || echo fine"))
            assert (ok.output, ok.exit_code, ok.failure_reason) == ("fine\n", 0, "")
            # `exit` ends the shell: said so, and the next command gets a fresh one
            await rt.run_in_session(A("export GONE=1"))
            ended = await rt.run_in_session(A("exit 3", check="silent"))
            assert ended.exit_code == 3 and "ended" in ended.failure_reason
            fresh = await rt.run_in_session(A("echo ${GONE:-unset}"))
            assert fresh.output == "unset\n" and "fresh shell" in fresh.failure_reason

    asyncio.run(main())


def test_a_syntax_error_raises_and_runs_none_of_the_command(start_worker, deployed):
    start_worker("local")
    command = "touch ran.txt\nif true; then echo never"

    async def main() -> tuple[BaseException, BaseException, str]:
        expected = await swerex_error(A(command.replace("ran.txt", "/dev/null")))
        async with runtime_with_session(deployed) as rt:
            got = await error_of(rt, A(command))
            listing = await rt.execute(Command(command="ls", shell=True))
            return expected, got, listing.stdout

    expected, got, listing = asyncio.run(main())
    assert type(got) is type(expected) is BashIncorrectSyntaxError
    assert isinstance(got, BashIncorrectSyntaxError)
    assert "syntax error" in got.extra_info["bash_stderr"]
    assert str(got).startswith("Error (exit code 2) while checking bash command")
    assert "ran.txt" not in listing  # nothing of it ran


# ------------------------------------------------------------ timeouts
def test_a_timeout_is_swerexs_error_and_the_session_survives(start_worker, deployed):
    start_worker("local")
    action = BashAction(command="sleep 30", timeout=0.5)

    async def main() -> tuple[BaseException, BaseException, list[str]]:
        expected = await swerex_error(action)
        async with runtime_with_session(deployed) as rt:
            await rt.run_in_session(A("mkdir -p kept && cd kept && export KEPT=yes"))
            got = await error_of(rt, action)
            # SWE-agent interrupts after a timeout: nothing is left to stop
            interrupted = await rt.run_in_session(BashInterruptAction())
            assert interrupted.exit_code == 0
            after = await rt.run_in_session(A("pwd; echo $KEPT"))
            assert after.failure_reason == ""
            return expected, got, after.output.splitlines()

    expected, got, after = asyncio.run(main())
    assert type(got) is type(expected) is CommandTimeoutError
    assert str(got) == str(expected) == "timeout after 0.5 seconds while running command 'sleep 30'"
    assert after[0].endswith("/kept") and after[1] == "yes"


def test_a_timeout_message_names_the_timeout_that_ran(start_worker, deployed):
    """No timeout asked: the spec's call_timeout_s ran, and the messages say so
    (capped: a timeout above max_call_timeout_s ran as that cap)."""
    start_worker("local")
    limits = {"call_timeout_s": 0.5, "max_call_timeout_s": 1}

    async def main() -> list[str]:
        async with runtime_with_session(deployed, spec={"limits": limits}) as rt:
            errors = [
                await error_of(rt, BashAction(command="sleep 30", timeout=None)),
                await error_of(rt, BashAction(command="sleep 30", timeout=300)),
                await error_of(rt, Command(command=["sleep", "30"], timeout=None)),
            ]
        assert all(type(e) is CommandTimeoutError for e in errors), errors
        return [str(e) for e in errors]

    assert asyncio.run(main()) == [
        "timeout after 0.5 seconds while running command 'sleep 30'",
        "timeout after 1.0 seconds while running command 'sleep 30'",
        "Timeout (0.5s) exceeded while running command",
    ]


def test_a_command_that_ignores_the_interrupt_costs_the_session_its_state(start_worker, deployed):
    start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            await rt.run_in_session(A("export KEPT=yes"))
            with pytest.raises(CommandTimeoutError):
                await rt.run_in_session(BashAction(command="trap '' INT; sleep 30", timeout=0.5))
            after = await rt.run_in_session(A("echo ${KEPT:-unset}"))
            assert after.output == "unset\n"
            assert "fresh shell" in after.failure_reason

    asyncio.run(main())


# -------------------------------------------------------------- execute
def test_execute_runs_like_subprocess(start_worker, deployed, client: Client):
    start_worker("local")
    timeout = Command(command=["sleep", "30"], timeout=0.5)

    async def main() -> tuple[list[Any], BaseException, BaseException, str]:
        expected = await swerex_error(timeout)
        async with deployed() as deployment:
            rt = deployment.runtime
            out = [
                await rt.execute(Command(command="echo out; echo err >&2; exit 4", shell=True)),
                await rt.execute(Command(command=["printf", "%s|", "two words", "$HOME"])),
                await rt.execute(
                    Command(command="echo out; echo err >&2", shell=True, merge_output_streams=True)
                ),
                await rt.execute(Command(command="env | sort", shell=True, env={"ONLY": "this"})),
                await rt.execute(Command(command="mkdir -p d/e", shell=True, check=True)),
                await rt.execute(Command(command="pwd", shell=True, cwd="/workspace/d/e")),
                await rt.execute(Command(command=["no_such_program_xyz", "arg"])),
            ]
            with pytest.raises(NonZeroExitCodeError, match=r"^boom: Command 'exit 5' failed"):
                await rt.execute(
                    Command(command="exit 5", shell=True, check=True, error_msg="boom")
                )
            got = await error_of(rt, timeout)
            return out, expected, got, deployment.trajectory_id

    out, expected, got, traj_id = asyncio.run(main())
    assert (out[0].stdout, out[0].stderr, out[0].exit_code) == ("out\n", "err\n", 4)
    assert (out[1].stdout, out[1].exit_code) == ("two words|$HOME|", 0)
    assert (out[2].stdout, out[2].stderr) == ("out\nerr\n", "")
    assert "ONLY=this" in out[3].stdout.splitlines() and "HOME=" not in out[3].stdout
    assert out[5].stdout.rstrip().endswith("/d/e")
    assert out[6].exit_code == 127 and "not found" in out[6].stderr
    assert type(got) is type(expected) is CommandTimeoutError
    assert str(got) == str(expected) == "Timeout (0.5s) exceeded while running command"
    every_call_answered(client, traj_id)


# ------------------------------------------- the same answers as LocalRuntime
CONFORMANCE = [
    A("echo 'hello world'"),
    A("echo 'hello world'; echo 'hello again'"),
    A("echo 'hello world' && echo 'hello again'"),
    A("for i in 1 2 3;\n do echo 'hello world';\n done"),
    A("python3 <<EOF\nprint('hello world')\nprint('hello world 2')\nEOF"),
    A("\n\n\n echo 'test1' \n  \n \n echo 'test2' \n\n\n"),
    A("echo 'hello\nworld'"),
    A("# echo 'only a comment'"),
    A(""),
    A("[[ x == x ]] && echo 'bash, not sh'"),
    A("echo 'hw';A=();echo 'asdf'"),
    A("A=(); false", check="silent"),
    A("false && true", check="silent"),
    A("doesnotexist_cmd", check="silent"),
    A("(exit 7)", check="silent"),
    A("echo to-stderr >&2"),
]


def test_session_commands_answer_as_swerexs_local_runtime(start_worker, deployed):
    """The observations match LocalRuntime's (its pty adds carriage returns and
    blank lines around the output, so both are compared without them)."""
    start_worker("local")

    def norm(output: str) -> str:
        return "\n".join(line for line in output.replace("\r", "").split("\n") if line).strip()

    async def observe(runtime: AbstractRuntime) -> list[tuple[str, int | None]]:
        out = []
        for action in CONFORMANCE:
            obs = await runtime.run_in_session(action)
            text = norm(obs.output)
            if action.command == "doesnotexist_cmd":  # "bash: line N: ...": N differs
                text = text.split(": ", 2)[-1]
            out.append((text, obs.exit_code))
        return out

    async def main() -> tuple[list[Any], list[Any]]:
        local = LocalRuntime()
        await local.create_session(CreateBashSessionRequest())
        try:
            expected = await observe(local)
        finally:
            await local.close()
        async with runtime_with_session(deployed) as rt:
            return expected, await observe(rt)

    expected, got = asyncio.run(main())
    for action, want, have in zip(CONFORMANCE, expected, got, strict=True):
        assert have == want, action.command


# ------------------------------------------------------ interactive programs
def test_interactive_programs_run_on_a_terminal_in_the_sessions_state(
    backend, start_worker, deployed
):
    start_worker(backend)

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            await rt.run_in_session(A("mkdir -p sub && cd sub && export LEVEL=7"))
            started = await rt.run_in_session(
                A("python3 -q", is_interactive_command=True, expect=[">>> "])
            )
            assert started.expect_string == ">>> " and started.exit_code == 0
            r = await rt.run_in_session(
                A(
                    "import os; print(os.getcwd().endswith('/sub'), os.environ['LEVEL'])",
                    is_interactive_command=True,
                    expect=[">>> ", "NEVER"],
                )
            )
            assert r.output == "True 7" and r.expect_string == ">>> ", r
            quit_ = await rt.run_in_session(A("quit()", is_interactive_quit=True, check="raise"))
            assert quit_.exit_code == 0
            # the session's own shell is as it was
            assert (await rt.run_in_session(A("pwd; echo $LEVEL"))).output.endswith("/sub\n7\n")
            # an expect string on a plain command: it stops there, the program waits for input
            r = await rt.run_in_session(
                A("printf 'name? '; read name; echo hello $name", expect=[r"name\? "])
            )
            assert r.expect_string == r"name\? " and r.exit_code is None, r
            r = await rt.run_in_session(A("bob", is_interactive_command=True, expect=["NEVER"]))
            assert r.output == "hello bob" and r.expect_string == "SHELLPS1PREFIX", r
            # a pattern that never comes: swe-rex's timeout error; an interrupt ends the program
            # (killed, since it ignores Ctrl-C), and the next one starts afresh
            stubborn = (
                "python3 -c 'import signal,time; signal.signal(2, 1); print(1); time.sleep(99)'"
            )
            with pytest.raises(CommandTimeoutError, match=r"timeout after 1\.0 seconds"):
                await rt.run_in_session(
                    A(stubborn, is_interactive_command=True, expect=["NEVER"], timeout=1.0)
                )
            interrupted = await rt.run_in_session(BashInterruptAction())
            assert interrupted.exit_code == 0
            r = await rt.run_in_session(
                A("python3 -q", is_interactive_command=True, expect=[">>> "])
            )
            assert r.expect_string == ">>> "
            await rt.run_in_session(A("quit()", is_interactive_quit=True))

    asyncio.run(main())
