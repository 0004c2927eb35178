"""SWE-ReX's interactive commands on a toolq terminal.

SWE-ReX types ``is_interactive_command`` lines into its session's bash and waits
for one of the action's ``expect`` patterns (or the shell's prompt, when the
program ended); ``is_interactive_quit`` ends the program. toolq's ``shell``
sessions have no terminal, so an interactive program runs on a terminal named
after the session (``terminal_open``), started with the session's state (its
working directory, exported variables and functions), and what follows is
typed into it (``terminal_send``) until it ends, which stands for SWE-ReX's
prompt coming back.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from swerex.exceptions import CommandTimeoutError
from swerex.runtime.abstract import BashAction, BashObservation

from toolq.schemas import Result

#: What swe-rex's ``LocalRuntime`` names as ``expect_string`` when the prompt came back.
PROMPT_EXPECT_STRING = "SHELLPS1PREFIX"
#: Never matches: wait for the program's end (or the timeout).
UNTIL_EXIT = "(?!)"

#: A ``shell`` command that saves the session's state to a file and prints its path.
SAVE_STATE = (
    '__toolq_state=$(mktemp) && { export -p; declare -f; printf "cd -- %q\\n" "$PWD"; } '
    '> "$__toolq_state" && printf "%s" "$__toolq_state"; unset __toolq_state'
)


@dataclass(frozen=True)
class TerminalCall:
    """A terminal call standing for an interactive action."""

    tool: str
    args: dict[str, Any]


def start_call(session: str, action: BashAction, state_file: str, timeout_s: float) -> TerminalCall:
    """Start ``action.command`` on the session's terminal, in the session's state."""
    restore = f". {shlex.quote(state_file)} 2>/dev/null; rm -f {shlex.quote(state_file)}"
    args = {
        "terminal": session,
        "restart": True,
        "command": f"{restore}\n{action.command}",
        "view": "text",
        "wait_for": pattern_of(action),
        "timeout_s": timeout_s,
    }
    return TerminalCall("terminal_open", args)


def send_call(session: str, action: BashAction, timeout_s: float) -> TerminalCall:
    """Type ``action.command`` and a newline into the program running on the terminal
    (swe-rex's ``sendline``)."""
    args = {
        "terminal": session,
        "keys": action.command + "\n",
        "literal": True,
        "view": "text",
        "wait_for": pattern_of(action),
        "timeout_s": timeout_s,
    }
    return TerminalCall("terminal_send", args)


def pattern_of(action: BashAction) -> str:
    """One regular expression for the action's ``expect`` patterns (pexpect's are
    regular expressions too); none: wait for the program's end."""
    if not action.expect:
        return UNTIL_EXIT
    return "|".join(f"(?:{pattern})" for pattern in action.expect)


def observation(action: BashAction, result: Result, timeout_s: float) -> BashObservation:
    """swe-rex's observation of an interactive action: the output before the match
    (the echoed command left out), and which ``expect`` string matched."""
    if result.timed_out:
        message = f"timeout after {timeout_s} seconds while running command {action.command!r}"
        raise CommandTimeoutError(message)
    data = result.data or {}
    output = result.output
    matched = data.get("matched")
    if data.get("waited") == "pattern" and isinstance(matched, str):
        output = output[: output.find(matched)] if matched in output else output
        expect_string = next((p for p in action.expect if re.search(p, matched)), action.expect[0])
    else:
        expect_string = PROMPT_EXPECT_STRING
    if not action.is_interactive_quit:
        output = output.lstrip().removeprefix(action.command).strip()
    exit_code: int | None = 0
    if not action.is_interactive_command and not action.is_interactive_quit:
        # a plain command with ``expect``: its status if it ended
        exit_code = data.get("exit_code") if not data.get("alive") else None
    return BashObservation(output=output, exit_code=exit_code, expect_string=expect_string)


def still_running(result: Result) -> bool:
    """Whether the program on the terminal still runs after this call."""
    return bool((result.data or {}).get("alive"))
