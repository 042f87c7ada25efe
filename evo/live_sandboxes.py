"""The sandboxes this process has running, and what they leave behind.

evo makes itself the subreaper of its sandboxes: a process that escapes its sandbox's group (a
double fork with setsid) becomes evo's child rather than init's, and is killed when its sandbox
ends. On Ctrl-C every sandbox is killed at once, and none starts until new ones are allowed.
Each is started so that the kernel kills it once evo has ended, however evo ended.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
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


def descends_from(pid: int, root: int) -> bool:
    """Whether `root` is `pid` or one of its ancestors; False for a process already gone."""
    while pid > 1:
        if pid == root:
            return True
        pid = int(stat_field(pid, 4) or 0)
    return pid == root


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


# Every sandbox is started from this one thread, which lives as long as this process: a process
# asked to die with its parent dies when the thread that started it ends, not the process.
_STARTER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="evo-sandbox-starter")


def start(popen: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    """Run `popen` on the starter thread, for a command made by `dying_with_us`."""
    return _STARTER.submit(popen).result()


@functools.cache
def death_signal_prefix() -> tuple[str, ...]:
    """setpriv's command that sets a parent-death signal of SIGKILL, or () where it cannot."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    try:
        check = subprocess.run([setpriv, "--pdeathsig", "KILL", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (setpriv, "--pdeathsig", "KILL") if check.returncode == 0 else ()


def dying_with_us(command: list[str]) -> list[str]:
    """`command`, killed by the kernel once the thread that started it has ended, which `start`
    makes this process's end however it ends (SIGKILL, the OOM killer), and stopped or not (evo
    holds a sandbox stopped at times). Its namespace's first process dies with it, and with that
    everything inside. Unchanged where setpriv cannot set a parent-death signal."""
    return [*death_signal_prefix(), *command]


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def start_ticks(pid: int) -> int:
    """When a process started, in clock ticks since boot (-1 once it is gone)."""
    return int(stat_field(pid, 22) or -1)


def stat_field(pid: int, number: int) -> str | None:
    """Field `number` of /proc/PID/stat, numbered from 1 as proc(5) does; None once it is gone.
    Read after the command's closing parenthesis, since a command may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[number - 3]
    except (OSError, IndexError):
        return None


def _is_sandboxed(pid: int) -> bool:
    """Whether a process carries the marker every sandbox's environment has."""
    try:
        return b"EVO_SANDBOX=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
