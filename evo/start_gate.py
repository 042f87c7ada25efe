"""The gate that keeps new CUDA contexts off a GPU while evo times calls on it.

A process making its CUDA context (the driver's context, cuBLAS's handle, the first kernels
loaded) slows the kernels of every other process on the GPU while it does: beside a 4096² matmul
timed on the H200, windows overlapping such a start took a median 2.6% longer per call, at worst
15% (benchmarks/context_starts.py), and the driver's per-process samples do not show it
(evo.neighbours cannot name it). Every evo sandbox makes its context at start, outside any turn
on the device, and a search starts them all the time. So each makes it holding this gate shared
(sandbox/start_gate.py), and an evaluation holds it exclusively while it times. An intent lock in
front of it gives the timing precedence: once it waits, no new start begins. The locks are per
machine and user, as the device lock is, so other evo processes on the machine keep to them too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from evo import devices

GATE_ENV = "EVO_START_GATE"  # the sandboxes' variable naming the gate's file
INTENT_SUFFIX = ".intent"  # the intent lock's file is the gate's path with this suffix (sandbox/start_gate.py)
# Starts under way when a timing begins take a few tenths of a second on an idle host.
START_WAIT_S = 10.0
POLL_S = 0.01


def gate_path(device: devices.Device) -> str:
    path = devices.lock_path(device, "starts")
    for lock in (path, path.with_name(path.name + INTENT_SUFFIX)):
        lock.touch(mode=0o600, exist_ok=True)
    return str(path)


def sandbox_env(device: devices.Device) -> dict[str, str]:
    """What a sandbox needs to start its context under the gate; nothing off a GPU."""
    return {GATE_ENV: gate_path(device)} if device.kind == "cuda" else {}


@contextlib.contextmanager
def starts_held_off(device: devices.Device, warnings: list[str], subject: str) -> Iterator[None]:
    """Hold the gate exclusively while `subject` is timed within: new starts wait, starts under
    way end first. Where that takes over START_WAIT_S (a start that long is none: a sandbox's
    own code holds a lock), the timing goes on beside it, and a warning says so; it never hangs
    on the locks. Call it holding the device: one timing at a time takes them."""
    if device.kind != "cuda":
        yield
        return
    path = gate_path(device)
    deadline = time.monotonic() + START_WAIT_S
    with open(path + INTENT_SUFFIX, "rb") as intent, open(path, "rb") as gate:
        if not (locked_by(intent, deadline) and locked_by(gate, deadline)):
            warnings.append(f"a process on the GPU was still making its CUDA context {START_WAIT_S:.0f} s after "
                            f"{subject}'s timing was to begin, or held evo's start gate: {subject} was timed beside "
                            "it, and such a start slows timed calls")
        yield


def locked_by(handle, deadline: float) -> bool:
    """Whether the lock on `handle` was taken exclusively before `deadline` (time.monotonic())."""
    while not devices.try_lock(handle):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True
