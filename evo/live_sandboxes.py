"""The sandboxes this process has running, and what they leave behind.

evo makes itself the subreaper of its sandboxes: a process that escapes its sandbox's group (a
double fork with setsid) becomes evo's child rather than init's, and is killed when its sandbox
ends. On Ctrl-C every sandbox is killed at once, and none starts until new ones are allowed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path

LIVE: set[int] = set()  # pids of the sandbox leaders this process started and has not reaped
# Held while a sandbox is started and registered, and while orphans are swept, so that one
# thread's sweep never takes another thread's sandbox, just forked, for an orphan.
LOCK = threading.Lock()
REFUSING = threading.Event()  # set by kill_all: no new sandbox starts until allow_new


def become_subreaper() -> None:
    """Make orphans of our sandboxes (a double fork with setsid escapes a process group) become
    our children rather than init's, so they can be found and killed when a sandbox ends."""
    try:
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_adopted_orphans(since: int) -> None:
    """Kill the children of ours that a sandbox left behind: not a live sandbox leader, and
    marked as sandboxed, or started after `since` (clock ticks since boot, as /proc counts) in
    a session other than ours (a child evo itself runs, such as nvidia-smi, stays in ours)."""
    with LOCK:
        _kill_orphans(since)


def _kill_orphans(since: int) -> None:
    own_session = os.getsid(0)
    for pid in children(os.getpid()):
        if pid in LIVE or not (_is_sandboxed(pid) or (start_ticks(pid) >= since and _session(pid) != own_session)):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError, PermissionError):
            pass


def children(pid: int) -> list[int]:
    """The children of a process, whichever of its threads started them ([] once it is gone)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found.extend(int(child) for child in (task / "children").read_text().split())
            except (OSError, ValueError):  # the thread ended meanwhile
                continue
    except OSError:
        return []
    return found


def tree(root: int) -> list[int]:
    """A process and every process under it, the root first."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.append(pid)
            stack.extend(children(pid))
    return found


def kill_all() -> None:
    """Kill every sandbox this process has running, and refuse new ones (Ctrl-C in a search):
    the threads waiting on them see their sandbox end at once and return."""
    with LOCK:
        REFUSING.set()
        for pid in list(LIVE):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def allow_new() -> None:
    REFUSING.clear()


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def start_ticks(pid: int) -> int:
    """When a process started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def _is_sandboxed(pid: int) -> bool:
    """Whether a process carries the marker every sandbox's environment has."""
    try:
        return b"EVO_SANDBOX=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
