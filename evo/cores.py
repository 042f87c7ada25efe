"""CPU cores kept for the processes being timed on a GPU.

A timed window's wall time is the parent's clock; a subject descheduled by a build or by an
interpreter starting shows as time outside its timer, and a reference timed while the host was
busy would let a candidate hide that much work. On a machine with enough cores, the last few
are kept for the timed path (the parent's thread, the subject, the checker, the flusher) while
it holds the device; every sandbox starts on the others.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

TIMING_CORES = 2
MIN_CORES_TO_RESERVE = 8  # below this, keeping cores would slow builds more than it steadies timings

_PROCESS_CORES = sorted(os.sched_getaffinity(0))  # before any thread of ours is moved


def split(device_kind: str, cores: list[int] | None = None) -> tuple[set[int], set[int]] | None:
    """(cores kept for timing, cores for everything else), or None where nothing is kept: on a
    CPU device the candidate's own threads are what is timed."""
    cores = _PROCESS_CORES if cores is None else sorted(cores)
    if device_kind != "cuda" or len(cores) < MIN_CORES_TO_RESERVE:
        return None
    return set(cores[-TIMING_CORES:]), set(cores[:-TIMING_CORES])


def for_starting(device_kind: str) -> set[int] | None:
    """Where a sandbox starts: off the timing cores."""
    cores = split(device_kind)
    return cores[1] if cores else None


@contextlib.contextmanager
def thread_on(cores: set[int] | None):
    """The calling thread (and what it starts meanwhile) runs on `cores`."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def move_groups(groups: set[int], cores: set[int]) -> None:
    """Every thread of every process in the process groups `groups` onto `cores` (a sandbox's
    program may run under wrappers, as a grandchild, with threads of its own)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) not in groups:
                continue
            for task in (entry / "task").iterdir():
                os.sched_setaffinity(int(task.name), cores)
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue


# While the device is held, the parent's thread takes the interpreter's lock back this soon after
# a reply arrives, whatever its other threads (starting sandboxes, building) are doing; the
# default of 5 ms would be time outside a timer, paid by whichever subject it fell on.
TIMING_SWITCH_INTERVAL_S = 0.0002


@contextlib.contextmanager
def timing(device_kind: str, groups: list[int]):
    """While the device is held: the parent's thread and the given process groups on the
    timing cores, and the parent's thread never long without the interpreter's lock."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(TIMING_SWITCH_INTERVAL_S)
    try:
        cores = split(device_kind)
        if cores is None:
            yield
            return
        move_groups(set(groups), cores[0])
        with thread_on(cores[0]):
            yield
    finally:
        sys.setswitchinterval(before)
