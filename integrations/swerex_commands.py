"""The shell text behind ``ToolqRuntime.run_in_session`` and ``execute``.

SWE-ReX checks a session command's syntax (``bash -n``) before running any of
it, and ``execute`` returns stdout and stderr apart; toolq's ``shell`` and
``bash`` tools merge the two streams and run what they are given. So each
command is wrapped, still one tool call, and a random token per call marks
what the wrapper printed: no command prints it by chance.
"""

from __future__ import annotations

import shlex

from swerex.exceptions import BashIncorrectSyntaxError
from swerex.runtime.abstract import Command

from toolq.schemas import Result

#: ``bash -n``'s exit status for a syntax error.
SYNTAX_ERROR_STATUS = 2


def with_syntax_check(command: str, token: str) -> str:
    """``command`` after a ``bash -n`` of it, for a ``shell`` session (the tool
    sources it, so ``return`` leaves it): a syntax error runs none of it and prints
    ``token`` and bash's complaint."""
    eof = f"TOOLQ_EOF_{token}"
    # ``|| status=$?``: a failing check must not end a session that ran ``set -e``.
    return (
        "__toolq_status=0\n"
        f"__toolq_syntax=$(bash -n 2>&1 <<'{eof}'\n{command}\n{eof}\n) || __toolq_status=$?\n"
        f'if [ "$__toolq_status" -eq {SYNTAX_ERROR_STATUS} ]; then\n'
        f"  printf '%s\\n%s\\n' {token} \"$__toolq_syntax\"\n"
        f"  unset __toolq_syntax __toolq_status; return {SYNTAX_ERROR_STATUS}\n"
        "fi\n"
        f"unset __toolq_syntax __toolq_status\n{command}"
    )


def syntax_error(result: Result, token: str, command: str) -> BashIncorrectSyntaxError | None:
    """The error SWE-ReX raises for a command that does not parse, if it did not."""
    if result.exit_code != SYNTAX_ERROR_STATUS or not result.output.startswith(f"{token}\n"):
        return None
    stderr = result.output[len(token) + 1 :]
    message = (
        f"Error (exit code {SYNTAX_ERROR_STATUS}) while checking bash command \n{command!r}\n"
        f"---- Stderr ----\n{stderr}\n---- Stdout ----\n"
    )
    return BashIncorrectSyntaxError(message, extra_info={"bash_stdout": "", "bash_stderr": stderr})


def execute_script(command: Command, cwd: str | None, token: str) -> str:
    """A ``bash`` tool script that runs ``command`` as ``subprocess.run`` would (its
    ``shell``, ``env`` and ``cwd``) and prints its stderr after a line ``token``,
    unless ``merge_output_streams``; it exits with the command's status."""
    run = program(command)
    if command.env is not None:  # subprocess's env replaces the environment
        pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in command.env.items())
        run = f"env -i {pairs} {run}"
    lines = [f"cd -- {shlex.quote(cwd)} || exit 1"] if cwd else []
    if command.merge_output_streams:
        return "\n".join([*lines, f"{run} 2>&1"])
    return "\n".join(
        [
            *lines,
            "__toolq_err=$(mktemp) || exit 125",
            f'{run} 2>"$__toolq_err"',
            "__toolq_status=$?",
            f"printf '\\n%s\\n' {token}",
            'cat "$__toolq_err"; rm -f "$__toolq_err"',
            'exit "$__toolq_status"',
        ]
    )


def program(command: Command) -> str:
    """The command line of ``command``: a list is an argv; a string is a ``/bin/sh``
    script with ``shell``, else the name of the program (as for ``subprocess``)."""
    if isinstance(command.command, list):
        return shlex.join(command.command)
    if command.shell:
        return f"/bin/sh -c {shlex.quote(command.command)}"
    return shlex.quote(command.command)


def split_streams(output: str, token: str) -> tuple[str, str]:
    """stdout and stderr of an ``execute_script`` run (all of it is stdout when the
    token line was cut out of a capped output)."""
    stdout, found, stderr = output.rpartition(f"\n{token}\n")
    return (stdout, stderr) if found else (output, "")
