"""A sandbox's side of evo's start gate (evo/start_gate.py): the process makes its CUDA context
holding the gate shared, so that it never does while evo times calls on the GPU (a context being
made slows every other process's kernels), and evo's timings wait for the starts under way.

Imports only the standard library. Never imports evo.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal

# How long a start waits for evo's timings: they hold the gate for seconds; a gate held longer
# (a sandbox's own code may take its lock) is not waited for.
WAIT_S = 60


@contextlib.contextmanager
def held():
    """Hold evo's start gate shared (evo/start_gate.py): a context made while evo times calls on
    the GPU slows them, so a start waits for the timing, and a timing for the starts under way.
    The intent lock, taken first and let go once the gate is held, lets a waiting timing go
    before any later start. Without the gate (off a GPU, or its files unreachable), or past
    WAIT_S, no wait."""
    path = os.environ.pop("EVO_START_GATE", "")
    handles = []
    try:
        for name in (path + ".intent", path) if path else ():
            handles.append(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        pass
    try:
        if len(handles) == 2 and _shared_within(handles[0], WAIT_S):
            _shared_within(handles[1], WAIT_S)
            fcntl.flock(handles[0], fcntl.LOCK_UN)
        yield
    finally:
        for handle in handles:
            os.close(handle)


class _GateWaitOver(Exception):
    pass


def _shared_within(handle: int, seconds: float) -> bool:
    """Take a shared lock, waiting at most `seconds`: a blocking wait (so it shows in
    /proc/locks), cut by a one-shot timer signal. A signal that lands as the lock is taken
    reads as a wait that ran out; the lock, held, goes with the descriptor."""
    waiting = [True]

    def over(_signum, _frame):
        if waiting[0]:
            raise _GateWaitOver

    previous = signal.signal(signal.SIGALRM, over)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        fcntl.flock(handle, fcntl.LOCK_SH)
        waiting[0] = False
        return True
    except _GateWaitOver:
        return False
    finally:
        waiting[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
