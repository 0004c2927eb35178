"""Where a local embedded Redis announces itself, so that clients find it.

``toolq worker`` without ``TOOLQ_REDIS_URL`` starts an embedded Redis and
writes its URL here; ``toolq call`` and the clients read it back.
"""

from __future__ import annotations

import json
import os
import tempfile


def embedded_state_path() -> str:
    """Path of the JSON file ``{"url": ..., "pid": ...}`` (per user)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"toolq-{os.getuid()}", "embedded-redis.json")


def read_embedded_url() -> str | None:
    """The embedded Redis URL if one was announced and its process lives."""
    try:
        with open(embedded_state_path()) as fh:
            state = json.load(fh)
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    url = state.get("url")
    return url if isinstance(url, str) else None
