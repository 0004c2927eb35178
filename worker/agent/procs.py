"""Processes: output capture, running a command, process groups and trees."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time

POLL_S = 0.05
# After the command's main process exits, leftovers (``cmd &``) may hold the
# output pipe open; stop reading after this long instead of waiting for them.
DRAIN_AFTER_EXIT_S = 0.05
KILL_GRACE_S = 2.0


# --------------------------------------------------------------------------
# output capture: keep head and tail, count everything
# --------------------------------------------------------------------------


class Capture:
    """Keeps the first and last ``cap/2`` bytes of a stream and its total size."""

    def __init__(self, cap):
        self.half = max(cap // 2, 64)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data):
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    @property
    def truncated(self):
        return self.total > len(self.head) + len(self.tail)

    def text(self):
        head = self.head.decode("utf-8", "replace")
        if not self.tail:
            return head
        tail = self.tail.decode("utf-8", "replace")
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self.tail)
        return "%s\n[... %d bytes omitted ...]\n%s" % (head, omitted, tail)


def base_env(slot):
    env = dict(os.environ)
    env.pop("TOOLQ_AGENT", None)
    env.update(slot.env)
    env["PWD"] = slot.cwd
    env.setdefault("HOME", slot.root)
    return env


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_exists(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def shell_path():
    for candidate in ("/bin/bash", "/usr/bin/bash", "/bin/sh"):
        if os.path.exists(candidate):
            return candidate
    return "/bin/sh"


SHELL = shell_path()


def run_process(slot, argv, timeout_s, max_output, stdin_data=None):
    """Run ``argv`` in its own process group; capture merged output with a cap.

    Returns (exit_code, capture, timed_out). On timeout the whole process group
    is killed and the partial output is returned.
    """
    proc = subprocess.Popen(
        argv,
        cwd=slot.cwd,
        env=base_env(slot),
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    slot.track(proc)
    try:
        if stdin_data is not None:
            feed_stdin(proc, stdin_data)
        capture, timed_out = pump_output(proc, timeout_s, max_output)
        if timed_out:
            kill_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
    finally:
        slot.untrack(proc)
        proc.stdout.close()
    return code, capture, timed_out


def feed_stdin(proc, data):
    def write():
        try:
            proc.stdin.write(data)
        except OSError:
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    threading.Thread(target=write, daemon=True).start()


def pump_output(proc, timeout_s, max_output):
    capture = Capture(max_output)
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    exited_at = None
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        now = time.monotonic()
        if now >= deadline:
            return capture, True
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT_S:
            return capture, False
        wait_s = min(deadline - now, POLL_S if exited_at is None else DRAIN_AFTER_EXIT_S)
        if not poller.poll(max(wait_s, 0.001) * 1000.0):
            continue
        data = os.read(fd, 262144)
        if not data:
            return capture, False
        capture.add(data)


def process_reply(code, capture, timed_out, timeout_s):
    reply = {
        "ok": code == 0 and not timed_out,
        "output": capture.text(),
        "exit_code": code,
        "truncated": capture.truncated,
        "output_bytes": capture.total,
        "timed_out": timed_out,
    }
    if timed_out:
        reply["error_code"] = "timeout"
        reply["error"] = "command timed out after %gs; partial output returned" % timeout_s
    elif code != 0:
        reply["error_code"] = "exit_status"
        reply["error"] = describe_exit(code)
    return reply


def describe_exit(code):
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return "command killed by signal %s" % name
    if code == 137:
        return "command exited with status 137 (killed: SIGKILL, often out of memory)"
    return "command exited with status %d" % code


# --------------------------------------------------------------------------
# process trees (Linux /proc): what a timeout or a stop must reach
# --------------------------------------------------------------------------


def proc_table():
    """Every visible process: ``{pid: (ppid, pgid, state, start_ticks)}``; {} without /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as fh:
                raw = fh.read()
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = raw[raw.rfind(b")") + 2 :].split()
            table[int(name)] = (
                int(fields[1]),
                int(fields[2]),
                fields[0].decode("ascii", "replace"),
                int(fields[19]),
            )
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(table, root_pid):
    """Pids below ``root_pid`` in ``table`` (children, grandchildren, ...)."""
    children = {}
    for pid, info in table.items():
        children.setdefault(info[0], []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def signal_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def ignores_sigint(pid):
    """True if ``pid`` ignores SIGINT (how bash starts ``cmd &`` without job control)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def now_ms():
    return int(time.time() * 1000)
