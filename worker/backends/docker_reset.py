"""The in-container half of recycling a container: run as ``python3 -I -S -c``.

Stdlib only, Python >= 3.8, like the agent: the worker passes this file's text
to a fresh ``docker exec`` as the sandbox user (``-I -S``: no site, no user
site, no environment variables read, so nothing the last trajectory left in
``$HOME`` or ``/tmp`` runs in it). It never decides whether a container may be
reused; the worker does, from the engine's side (``docker_recycle.py``).

- ``kill``: SIGKILL every other process of this user (the last trajectory's,
  however they detached: setsid, nohup, double forks) until none is left.
  Prints ``{"left": N}``.
- ``clean WORKSPACE [PATH ...]``: empty the workspace, the shared-memory
  mounts and the scratch ones (``/tmp``, ``/var/tmp`` and the home when they are
  tmpfs: the engine's filesystem diff cannot see them), delete the
  PATHs (what the engine's diff says the trajectory added to the container's
  writable layer), then report what is still there: entries in those mounts,
  System V IPC objects. Run only once ``kill`` left nothing running, so no
  process can write behind it. Prints ``{"left": [...], "ipc": N, "errors": [...]}``.
"""

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import sys
import time

KILL_DEADLINE_S = 5.0
# Writable by the sandbox user and invisible to the engine's filesystem diff.
SHARED_MOUNTS = ("/dev/shm", "/dev/mqueue")
# The same when they are tmpfs mounts (a container with disk_mb).
SCRATCH_MOUNTS = ("/tmp", "/var/tmp")


def mounts():
    # The user's home too, when it is a tmpfs (the next agent copies the image's back in).
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a numeric USER with no /etc/passwd entry: no home of its own
        home = ""
    scratch = (*SCRATCH_MOUNTS, home) if home not in ("", "/") else SCRATCH_MOUNTS
    return (*SHARED_MOUNTS, *(m for m in scratch if os.path.ismount(m)))


SYSV_IPC = ("/proc/sysvipc/shm", "/proc/sysvipc/sem", "/proc/sysvipc/msg")
WORKSPACE_MODE = 0o755
SHOWN = 20  # leftovers named in the report, at most


def own_processes():
    """Pids of this user's processes other than this one (zombies included)."""
    me, uid = os.getpid(), os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.stat("/proc/" + name).st_uid == uid:
                    found.append(int(name))
            except OSError:
                pass  # gone meanwhile
    return found


def kill_all():
    """SIGKILL everything of this user until nothing is left (a forking process
    may slip one child past one kill(-1): repeat)."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while True:
        left = own_processes()
        if not left or time.monotonic() > deadline:
            return len(left)
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # every process we may signal but init and us
        time.sleep(0.01)  # zombies need their reaper (the container's init)


def make_removable(top):
    """Give the owner rwx on every directory under ``top`` (symlinks untouched)."""
    os.chmod(top, 0o700)
    for dirpath, dirnames, _files in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


def remove(path):
    """Delete a file, link or whole directory (never following a symlink)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        make_removable(path)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def empty(directory, errors):
    """Delete what ``directory`` holds (the ones this user may delete)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        try:
            remove(os.path.join(directory, name))
        except Exception as exc:  # reported; the worker then rejects the container
            errors.append(f"{name}: {exc}")


def leftovers(directory):
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    except FileNotFoundError:
        return []


def ipc_objects():
    """System V shared memory segments, semaphores and message queues that exist."""
    count = 0
    for table in SYSV_IPC:
        try:
            with open(table) as fh:
                count += max(0, len(fh.read().splitlines()) - 1)  # minus the header
        except OSError:
            pass
    return count


def clean(workspace, added):
    errors = []
    try:
        os.chmod(workspace, WORKSPACE_MODE)  # a trajectory may have chmod-ed it
    except OSError as exc:
        errors.append(f"{workspace}: {exc}")
    for directory in (workspace, *mounts()):
        empty(directory, errors)
    for path in added:
        try:
            remove(path)
        except Exception as exc:
            errors.append(f"{path}: {exc}")
    left = []
    for directory in (workspace, *mounts()):
        left += leftovers(directory)
    try:
        mode = stat.S_IMODE(os.stat(workspace).st_mode)
    except OSError:
        mode = None
    if mode != WORKSPACE_MODE:
        left.append(f"{workspace} (mode {oct(mode) if mode is not None else '?'})")
    return {"left": left[:SHOWN], "ipc": ipc_objects(), "errors": errors[:SHOWN]}


def main(argv):
    if os.getuid() == 0:  # kill(-1) would take the container's init down with it
        report = {"error": "refusing to run as root"}
    elif argv[:1] == ["kill"]:
        report = {"left": kill_all()}
    elif argv[:1] == ["clean"] and len(argv) >= 2:
        report = clean(argv[1], argv[2:])
    else:
        report = {"error": "usage: kill | clean WORKSPACE [PATH ...]"}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
