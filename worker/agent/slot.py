"""A slot: one workspace with its env and cwd, and a thread that runs its calls in order."""

from __future__ import annotations

import os
import queue
import signal
import threading

from .procs import group_alive, kill_group
from .protocol import ToolError, cancelled_reply, emit


class Slot:
    """One workspace: a root directory, an env, and a queue of calls run in order."""

    def __init__(self, name, root, env, workdir, run):
        """``run(slot, req)`` runs one call and returns its reply (the main loop's)."""
        self.name = name
        self.root = os.path.realpath(root)
        self.env = env
        self.cwd = self.root
        if workdir:
            self.cwd = resolve_path(self, workdir)
        self.queue = queue.Queue()
        self.procs = set()
        # Process groups of finished calls: `cmd &` leftovers live on in them
        # until the slot is cancelled or dropped.
        self.groups = set()
        self.lock = threading.Lock()
        self.generation = 0  # bumped by cancel: queued calls of older generations are dropped
        self.shells = {}  # session name -> ShellSession
        self.bg = {}  # task id -> BgTask, oldest first
        self.bg_seq = 0
        self.edit_history = {}  # path -> previous contents, for the editor's undo_edit
        self.terminals = {}  # terminal name -> Terminal (terminals.py)
        self.thread = threading.Thread(
            target=self._run, args=(run,), name="slot-" + name, daemon=True
        )
        self.thread.start()

    def _run(self, run):
        while True:
            req = self.queue.get()
            if req is None:
                return
            if req.get("_gen", 0) != self.generation:
                emit(cancelled_reply(req))
                continue
            emit(run(self, req))

    def track(self, proc):
        with self.lock:
            self.procs.add(proc)
            self.groups.add(proc.pid)  # start_new_session: its pid is its group id
            if len(self.groups) > 256:  # forget groups with no process left
                self.groups = set(g for g in self.groups if group_alive(g))

    def untrack(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def kill_all(self):
        """Kill every process group this slot's calls started, running or left over."""
        with self.lock:
            groups = set(self.groups) | set(p.pid for p in self.procs)
            self.groups = set()
        for pgid in groups:
            kill_group(pgid, signal.SIGKILL)


def resolve_path(slot, path):
    """Resolve ``path`` inside the slot's workspace; refuse anything that escapes."""
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    if "\x00" in path:
        raise ValueError("path contains a NUL byte")
    joined = os.path.join(slot.cwd if not os.path.isabs(path) else "/", path)
    real = os.path.realpath(joined)
    if real != slot.root and not real.startswith(slot.root + os.sep):
        raise ToolError(
            "path_outside_workspace", "path %r is outside the workspace %s" % (path, slot.root)
        )
    return real
