"""Keystrokes for terminals: tmux's key names (``Enter``, ``C-c``, ``M-x``, ``F1``)
to the bytes a terminal sends for them."""

from __future__ import annotations

# tmux's key names (send-keys); anything else is sent as text.
TERMINAL_KEYS = {
    "Enter": b"\r",
    "Tab": b"\t",
    "BTab": b"\x1b[Z",
    "Space": b" ",
    "BSpace": b"\x7f",
    "Escape": b"\x1b",
    "Up": b"\x1b[A",
    "Down": b"\x1b[B",
    "Right": b"\x1b[C",
    "Left": b"\x1b[D",
    "Home": b"\x1b[H",
    "End": b"\x1b[F",
    "PageUp": b"\x1b[5~",
    "PPage": b"\x1b[5~",
    "PageDown": b"\x1b[6~",
    "NPage": b"\x1b[6~",
    "IC": b"\x1b[2~",
    "Insert": b"\x1b[2~",
    "DC": b"\x1b[3~",
    "Delete": b"\x1b[3~",
    "F1": b"\x1bOP",
    "F2": b"\x1bOQ",
    "F3": b"\x1bOR",
    "F4": b"\x1bOS",
    "F5": b"\x1b[15~",
    "F6": b"\x1b[17~",
    "F7": b"\x1b[18~",
    "F8": b"\x1b[19~",
    "F9": b"\x1b[20~",
    "F10": b"\x1b[21~",
    "F11": b"\x1b[23~",
    "F12": b"\x1b[24~",
}
# In application cursor mode (``less``, ``vim``, ``top`` set it) these keys say ESC O x.
TERMINAL_APP_CURSOR = {"Up": b"\x1bOA", "Down": b"\x1bOB", "Right": b"\x1bOC", "Left": b"\x1bOD"}
TERMINAL_APP_CURSOR.update(Home=b"\x1bOH", End=b"\x1bOF")
TERMINAL_CTRL = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31, "?": 127, "Space": 0}


def key_bytes(key, app_cursor):
    """The bytes a key name sends (tmux's names: ``Enter``, ``C-c``, ``M-x``, ``F1``);
    None when ``key`` is not a key name."""
    if app_cursor and key in TERMINAL_APP_CURSOR:
        return TERMINAL_APP_CURSOR[key]
    if key in TERMINAL_KEYS:
        return TERMINAL_KEYS[key]
    if (len(key) > 2 and key[:2] in ("C-", "M-")) or (len(key) == 2 and key[0] == "^"):
        rest = key[2:] if key[1] == "-" else key[1:]
        if key[0] == "M":
            inner = key_bytes(rest, app_cursor)
            return b"\x1b" + (inner if inner is not None else rest.encode("utf-8"))
        if rest in TERMINAL_CTRL:
            return bytes([TERMINAL_CTRL[rest]])
        if len(rest) == 1 and rest.isalpha():
            return bytes([ord(rest.lower()) & 0x1F])
    return None


def keys_bytes(keys, literal, app_cursor):
    """What ``keys`` (a string or a list of them) type, key names translated unless ``literal``."""
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TypeError("keys must be a string or a list of strings")
    out = []
    for key in keys:
        named = None if literal else key_bytes(key, app_cursor)
        out.append(named if named is not None else key.encode("utf-8", "surrogateescape"))
    return b"".join(out)
