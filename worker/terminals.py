"""Terminals, the worker's half: the screen a user would see, from the raw pty output.

The in-sandbox agent runs a terminal's program on a pseudo-terminal and hands
back the raw bytes it printed since the last read (``terminal_*`` tools). Here
they go through a real VT emulator (``pyte``), one screen per terminal, kept with
the slot (``Slot.terminals``) so it lives and dies with the agent that owns the
pty. The call's result is the scrollback added since the last read and the
screen, rows x columns, within the output cap.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, replace
from typing import Any

import pyte
from pyte.screens import Margins
from wcwidth import wcwidth

from .backends.base import Slot
from .plan import Plan

TERMINAL_TOOLS = frozenset({"terminal_open", "terminal_send", "terminal_read", "terminal_close"})
#: Lines that scrolled off the top kept for the next read; older ones are counted.
MAX_SCROLLBACK_LINES = 10_000
#: The emulator is pure Python (about 50 KB/s of short lines here): of a read's
#: output only the last this many bytes are rendered, so a flood costs the worker
#: at most about a second of CPU per read. What came before is counted
#: (``data.skipped_bytes``); its lines would have scrolled past anyway.
FEED_MAX_BYTES = 128 * 1024
#: Output larger than this is fed to the emulator in a thread, off the event loop.
THREAD_FEED_BYTES = 16 * 1024
#: Private modes that switch to (h) or from (l) the alternate screen.
ALT_SWITCHES = [(b"\x1b[?%dh" % m, b"\x1b[?%dl" % m) for m in (1049, 1047, 47)]
#: Private modes: application cursor keys; the alternate screen (three variants).
DECCKM = 1 << 5
ALT_SCREENS = (47, 1047, 1049)
#: The ``text`` view: the output without escape sequences and CRs (as the agent
#: matches ``wait_for`` patterns).
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[()*+][0-~]|\x1b[ -/]*[0-~]|\r"
)


class TermScreen(pyte.Screen):
    """A pyte screen that keeps the lines scrolled off its top and has the alternate
    screen full-screen programs switch to (``less``, ``vim``): leaving it shows the
    shell's screen again, and what scrolls on it is no scrollback."""

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self.scrolled: list[Any] = []  # lines (pyte's rows) scrolled off the top
        self.scrolled_dropped = 0
        self.saved_main: tuple[Any, Any] | None = None  # (buffer, cursor) while on the alternate

    def row_text(self, y: int) -> str:
        return self.line_text(self.buffer[y])

    def line_text(self, line: Any) -> str:
        chars = []
        wide = False
        for x in range(self.columns):
            if wide:  # the stub after a double-width character
                wide = False
                continue
            char = line[x].data
            wide = wcwidth(char[0]) == 2 if char else False
            chars.append(char)
        return "".join(chars).rstrip()

    def index(self) -> None:
        top, bottom = self.margins or Margins(0, self.lines - 1)
        if self.cursor.y == bottom and top == 0 and self.saved_main is None:
            # The line object leaves the buffer unchanged: rendered only if it is shown.
            self.scrolled.append(self.buffer[0])
            if len(self.scrolled) > MAX_SCROLLBACK_LINES:
                del self.scrolled[0]
                self.scrolled_dropped += 1
        super().index()

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and any(m in ALT_SCREENS for m in modes):
            if self.saved_main is None:
                saved = dict(self.buffer)  # the lines move out; the buffer starts blank
                self.saved_main = (saved, self.cursor)
                self.buffer.clear()
                self.dirty.update(range(self.lines))
            modes = tuple(m for m in modes if m not in ALT_SCREENS)
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and any(m in ALT_SCREENS for m in modes):
            if self.saved_main is not None:
                saved, cursor = self.saved_main
                self.saved_main = None
                self.buffer.clear()
                self.buffer.update(saved)
                self.cursor = cursor
                self.dirty.update(range(self.lines))
            modes = tuple(m for m in modes if m not in ALT_SCREENS)
        super().reset_mode(*modes, **kwargs)

    def take_scrolled(self) -> tuple[list[str], int]:
        lines, dropped = self.scrolled, self.scrolled_dropped
        self.scrolled, self.scrolled_dropped = [], 0
        return [self.line_text(line) for line in lines], dropped

    def rows_text(self) -> list[str]:
        return [self.row_text(y) for y in range(self.lines)]


@dataclass
class TermState:
    """One terminal's emulator, for the pty the agent calls ``term_id``."""

    term_id: str
    screen: TermScreen
    stream: pyte.ByteStream

    @classmethod
    def new(cls, term_id: str, rows: int, cols: int) -> TermState:
        screen = TermScreen(cols, rows)
        return cls(term_id, screen, pyte.ByteStream(screen))

    def feed(self, data: bytes) -> int:
        """Render ``data``; returns how many of its first bytes were skipped (see
        FEED_MAX_BYTES). The skipped part's last switch to or from the alternate
        screen still counts, and rendering starts after a newline, so that no
        escape sequence or character is cut."""
        skipped = 0
        if len(data) > FEED_MAX_BYTES:
            cut = len(data) - FEED_MAX_BYTES
            newline = data.find(b"\n", cut)
            skipped = newline + 1 if 0 <= newline < len(data) - 1 else cut
            head, data = data[:skipped], data[skipped:]
            self._switch_screens(head)
            self.screen.carriage_return()
            self.stream = pyte.ByteStream(self.screen)  # a fresh parser: no half sequence
        self.stream.feed(data)
        return skipped

    def _switch_screens(self, head: bytes) -> None:
        on = max(head.rfind(enter) for enter, _ in ALT_SWITCHES)
        off = max(head.rfind(leave) for _, leave in ALT_SWITCHES)
        if on > off:
            self.screen.set_mode(1049, private=True)
        elif off > on:
            self.screen.reset_mode(1049, private=True)


def prepare(slot: Slot, plan: Plan) -> Plan:
    """Before a terminal call: the keys' encoding depends on the emulator's mode."""
    if plan.tool.name != "terminal_send":
        return plan
    state = slot.terminals.get(plan.args.get("terminal", "default"))
    app_cursor = state is not None and DECCKM in state.screen.mode
    return replace(plan, args={**plan.args, "app_cursor": app_cursor})


async def render(slot: Slot, plan: Plan, reply: dict[str, Any]) -> dict[str, Any]:
    """After a terminal call: feed the raw output to the terminal's emulator and make
    the result: scrollback since the last read, then the screen."""
    blob = reply.pop("blob", None)
    data = reply.get("data")
    if plan.tool.name not in TERMINAL_TOOLS or not isinstance(data, dict):
        return reply
    name = str(data.get("terminal", "default"))
    rows, cols = int(data.get("rows", 24)), int(data.get("cols", 80))
    state = slot.terminals.get(name)
    if state is None or state.term_id != data.get("term_id"):  # a new pty: a new screen
        state = slot.terminals[name] = TermState.new(str(data.get("term_id")), rows, cols)
    elif (state.screen.lines, state.screen.columns) != (rows, cols):
        state.screen.resize(rows, cols)
    raw = blob if isinstance(blob, bytes) else b""
    if len(raw) > THREAD_FEED_BYTES:
        skipped = await asyncio.to_thread(state.feed, raw)
    else:
        skipped = state.feed(raw)
    reply["data"] = {**data, "skipped_bytes": skipped}
    if plan.tool.name == "terminal_close":
        slot.terminals.pop(name, None)
    if plan.args.get("view") == "text":
        state.screen.take_scrolled()  # read now, as text
        return as_text(reply, raw, plan.max_output_bytes)
    return compose(reply, state.screen, plan.max_output_bytes)


def as_text(reply: dict[str, Any], raw: bytes, cap_bytes: int) -> dict[str, Any]:
    """The ``text`` view: the raw output as a log, head and tail kept within the cap."""
    text = ESCAPES.sub("", raw.decode("utf-8", "replace"))
    encoded = text.encode("utf-8", "surrogateescape")
    truncated = len(encoded) > cap_bytes
    if truncated:
        half = max(cap_bytes // 2, 64)
        omitted = len(encoded) - 2 * half
        text = (
            encoded[:half].decode("utf-8", "replace")
            + f"\n[... {omitted} bytes omitted ...]\n"
            + encoded[-half:].decode("utf-8", "replace")
        )
    data = dict(reply.get("data") or {})
    data.pop("pid", None)
    reply.update(output=text, data=data, truncated=truncated, output_bytes=len(encoded))
    return reply


def compose(reply: dict[str, Any], screen: TermScreen, cap_bytes: int) -> dict[str, Any]:
    """The reply's output and data from the screen, within ``cap_bytes``: scrollback
    lines are dropped oldest first (and counted); a screen larger than the cap keeps
    its head and tail."""
    scrolled, dropped = screen.take_scrolled()
    rows = screen.rows_text()
    shown_rows = list(rows)
    while shown_rows and not shown_rows[-1]:
        shown_rows.pop()
    screen_text = "\n".join(shown_rows)
    full = "\n".join([*scrolled, screen_text]) if scrolled else screen_text
    # Lines dropped before this read count as at least their newline.
    total = len(full.encode("utf-8", "surrogateescape")) + dropped
    data_in = reply.get("data") or {}
    skipped = int(data_in.get("skipped_bytes") or 0) + int(data_in.get("dropped_bytes") or 0)
    notes = [f"[... {skipped} bytes of output not rendered ...]"] if skipped else []
    # What is left for scrollback, the notes and a line saying how much was omitted.
    room = cap_bytes - len(screen_text.encode("utf-8", "surrogateescape"))
    room -= sum(len(note) + 1 for note in notes) + 64
    kept: list[str] = []
    size = 0
    for line in reversed(scrolled):
        size += len(line.encode("utf-8", "surrogateescape")) + 1
        if size > room:
            break
        kept.append(line)
    kept.reverse()
    omitted = dropped + len(scrolled) - len(kept)
    if omitted:
        notes.append(f"[... {omitted} lines of scrollback omitted ...]")
    parts = notes + kept
    output = "\n".join([*parts, screen_text])
    truncated = omitted > 0 or skipped > 0
    total += skipped
    encoded = output.encode("utf-8", "surrogateescape")
    if len(encoded) > cap_bytes:  # the screen alone passes the cap
        half = max((cap_bytes - 48) // 2, 64)
        cut = len(encoded) - 2 * half
        output = (
            encoded[:half].decode("utf-8", "replace")
            + f"\n[... {cut} bytes omitted ...]\n"
            + encoded[-half:].decode("utf-8", "replace")
        )
        truncated = True
    data = dict(reply.get("data") or {})
    data.update(
        scrollback_lines=len(parts),
        screen_lines=len(shown_rows),
        cursor=[screen.cursor.y, screen.cursor.x],
        alternate_screen=screen.saved_main is not None,
        title=screen.title,
    )
    data.pop("pid", None)
    reply.update(output=output, data=data, truncated=truncated, output_bytes=total)
    return reply
