"""The gate that keeps sandboxes from making CUDA contexts while evo times (evo/start_gate.py).

The CPU tests drive both sides of it as evo does: the timing side in this process, the starting
side in subprocesses running the sandboxes' own (sandbox/start_gate.py). Who waits on which
lock is read from /proc/locks, so no test guesses from the clock whether a process is blocked.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASKS, ROOT, TASKS
from evo import devices, nvml, start_gate
from evo.config import VerifyPolicy
from evo.live_sandboxes import descends_from
from evo.session import TaskSession, await_started

GPU = devices.Device(kind="cuda", visible="0", name="a GPU", arch="9.0")
CPU = devices.Device(kind="cpu", visible="", name="a CPU", arch="")

# A sandbox's start, with the context's making replaced by a sleep of argv[1] seconds; it waits
# for a line on stdin once imported (torch's import takes seconds on a loaded machine).
STARTER = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "sandbox")!r})
import start_gate
print("imported", flush=True)
sys.stdin.readline()
with start_gate.held():
    print(f"in {{time.time()}}", flush=True)
    time.sleep(float(sys.argv[1]))
print(f"out {{time.time()}}", flush=True)
"""


@pytest.fixture
def gate(tmp_path, monkeypatch) -> dict[str, str]:
    """The gate's files in a directory of this test's own; the environment a sandbox gets."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return {**os.environ, **start_gate.sandbox_env(GPU)}


def start(env: dict[str, str], hold_s: float, now: bool = True) -> subprocess.Popen:
    """A starter, imported once this returns, and at the gate unless `now` is False (`go`)."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(hold_s)], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert starter.stdout.readline().strip() == "imported"
    return go(starter) if now else starter


def go(starter: subprocess.Popen) -> subprocess.Popen:
    starter.stdin.write("go\n")
    starter.stdin.flush()
    return starter


def stamp(process: subprocess.Popen, word: str) -> float:
    said, at = process.stdout.readline().split()
    assert said == word
    return float(at)


def await_waiter(path: str, ours, within_s: float = 60.0) -> int:
    """The first process for which `ours(pid)` holds that waits for a lock on `path`."""
    return await_row(path, lambda fields: "->" in fields and ours(int(fields[-4])), within_s)


def await_holder(path: str, pid: int, within_s: float = 60.0) -> int:
    """`pid` once it holds a lock on `path`."""
    return await_row(path, lambda fields: "->" not in fields and int(fields[-4]) == pid, within_s)


def await_row(path: str, wanted, within_s: float) -> int:
    inode = os.stat(path).st_ino
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()):
            if fields[-3].endswith(f":{inode}") and wanted(fields):
                return int(fields[-4])
        time.sleep(0.02)
    raise AssertionError(f"no such lock on {path}")


def intent(env: dict[str, str]) -> str:
    return env[start_gate.GATE_ENV] + start_gate.INTENT_SUFFIX


def test_a_start_waits_while_calls_are_timed(gate):
    warnings: list[str] = []
    with start_gate.starts_held_off(GPU, warnings, "the reference"):
        starter = start(gate, 0)
        await_waiter(intent(gate), lambda pid: pid == starter.pid)
        released = time.time()
    assert stamp(starter, "in") >= released
    assert starter.wait(60) == 0 and warnings == []


def test_a_timing_waits_for_the_starts_under_way_and_goes_before_later_ones(gate):
    later = start(gate, 0, now=False)
    first = start(gate, 1.5)
    first_in = stamp(first, "in")
    timed: dict[str, float] = {}

    def timing():
        with start_gate.starts_held_off(GPU, [], "the candidate"):
            timed["from"] = time.time()
            time.sleep(0.5)
            timed["to"] = time.time()

    thread = threading.Thread(target=timing)
    thread.start()
    await_holder(intent(gate), os.getpid())  # the timing waits for the first start to end
    go(later)  # begins while the timing waits: it must let the timing go first
    await_waiter(intent(gate), lambda pid: pid == later.pid)
    thread.join(120)
    first_out, later_in = stamp(first, "out"), stamp(later, "in")
    assert first_in < first_out <= timed["from"], "the timing began while a start was under way"
    assert later_in >= timed["to"], "a start that began while the timing waited went before it"
    assert later.wait(60) == 0


def timed_beside(subject: str) -> str:
    """The one warning of a timing that gave up waiting for the gate (START_WAIT_S set to 0.5 s)."""
    warnings: list[str] = []
    began = time.monotonic()
    with start_gate.starts_held_off(GPU, warnings, subject):
        waited = time.monotonic() - began
    assert 0.5 <= waited < 5 and len(warnings) == 1, (waited, warnings)
    return warnings[0]


def test_a_start_that_outlasts_the_wait_is_timed_beside_and_said(gate, monkeypatch):
    monkeypatch.setattr(start_gate, "START_WAIT_S", 0.5)
    stuck = start(gate, 30)
    try:
        stamp(stuck, "in")
        warning = timed_beside("the candidate")
        assert "still making its CUDA context" in warning and "the candidate's timing" in warning
    finally:
        stuck.kill()
        stuck.wait()


ROGUE = ("import fcntl, sys, time; gate = open(sys.argv[1], 'rb'); fcntl.flock(gate, fcntl.LOCK_EX); "
         "print('holding', flush=True); time.sleep(60)")


def test_a_process_holding_the_gate_hangs_no_timing(gate, monkeypatch):
    """A sandbox's own code can take the gate's lock (its path is no secret). A start then holds
    the intent lock while it waits for the gate; the timing neither hangs on it nor on the gate."""
    monkeypatch.setattr(start_gate, "START_WAIT_S", 0.5)
    path = gate[start_gate.GATE_ENV]
    rogue = subprocess.Popen([sys.executable, "-c", ROGUE, path], stdout=subprocess.PIPE, text=True)
    try:
        assert rogue.stdout.readline().strip() == "holding"
        starter = start(gate, 0)
        await_waiter(path, lambda pid: pid == starter.pid)
        assert "held evo's start gate" in timed_beside("the reference")
    finally:
        rogue.kill()
        rogue.wait()
    assert stamp(starter, "in") > 0 and starter.wait(60) == 0  # the rogue gone, the start goes on


def test_a_start_waits_for_the_gate_only_so_long(gate):
    """The sandbox's wait is cut by a timer signal: it is a blocking wait, seen in /proc/locks."""
    sandbox_gate = importlib.import_module("evo.sandbox.start_gate")
    path = gate[start_gate.GATE_ENV]
    handler = signal.getsignal(signal.SIGALRM)
    with open(path, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiter = os.open(path, os.O_RDONLY)
        try:
            began = time.monotonic()
            assert not sandbox_gate._shared_within(waiter, 0.3)
            assert 0.3 <= time.monotonic() - began < 3
        finally:
            os.close(waiter)
    assert signal.getsignal(signal.SIGALRM) == handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_off_a_gpu_or_without_the_gate_nothing_waits(gate):
    assert start_gate.sandbox_env(CPU) == {}
    warnings: list[str] = []
    with start_gate.starts_held_off(GPU, warnings, "the reference"):
        # A process without the variable (a sandbox off a GPU) takes no lock: it starts at once.
        loose = start({key: value for key, value in gate.items() if key != start_gate.GATE_ENV}, 0)
        assert stamp(loose, "in") < stamp(loose, "out")  # within the timing
        with start_gate.starts_held_off(CPU, warnings, "the reference"):  # no file is even opened
            pass
    assert warnings == []


@pytest.mark.parametrize("fork_server", [True, False])
def test_a_candidate_process_keeps_to_the_gate_forked_or_fresh(tmp_path, monkeypatch, cache_dir, fork_server):
    """A real candidate process, forked by the session's fork server or started afresh, given the
    gate as on a GPU (on a CPU a sandbox gets none): it waits while calls are timed, then is ready."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    session = TaskSession(EXAMPLE_TASKS / "relu.py", VerifyPolicy(device="cpu", fork_server=fork_server), cache_dir)
    try:
        session.start_fork_server()
        with start_gate.starts_held_off(GPU, [], "the reference"):
            process = session.sandbox("candidate.py", "candidate process", start_gate.sandbox_env(GPU))
            process.send({"op": "ready"})
            await_waiter(start_gate.gate_path(GPU) + start_gate.INTENT_SUFFIX,
                         lambda pid: descends_from(pid, process.pid))
        assert await_started(process, 120, "starting a candidate process")["ready"]
        assert (process.fork_server is not None) is fork_server
        session.release(process)
    finally:
        session.close()


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_a_candidate_process_makes_its_context_only_after_the_timing(tmp_path, monkeypatch, cache_dir):
    """A real candidate process, started as a search starts its spares: while calls are timed it
    holds no context on the GPU (the driver lists the processes that do), and once the timing
    ends it makes one and says it is ready."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a gate of this test's own
    session = TaskSession(TASKS / "cuda_relu_odd.py", VerifyPolicy(device="cuda", fork_server=False), cache_dir)
    gate = start_gate.gate_path(session.device)

    def has_context(process) -> bool:
        return any(descends_from(pid, process.pid) for pid in nvml.compute_processes(session.device.visible) or ())

    try:
        with start_gate.starts_held_off(session.device, [], "the reference"):
            process = session.start_candidate_process(profiler=False)
            python = await_waiter(gate + start_gate.INTENT_SUFFIX, lambda pid: descends_from(pid, process.pid))
            assert not has_context(process), f"process {python} made its context while calls were timed"
        assert await_started(process, 120, "starting a candidate process")["ready"]
        assert has_context(process)
        session.release(process)
    finally:
        session.close()

