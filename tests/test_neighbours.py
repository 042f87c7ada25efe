"""Processes outside evo computing on the GPU while it times (evo/neighbours.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from conftest import CUDA_CANDIDATES, ROOT, TASKS, gpu_alone
from evo import devices, neighbours, nvml
from evo.live_sandboxes import descends_from
from evo.session import TaskSession
from evo.verdict import Check

GPU = devices.Device(kind="cuda", visible="0", name="a GPU", arch="9.0")


def under_this_process():
    """A process under this one (as evo's sandboxes are under evo), killed at the end."""
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


ours = pytest.fixture(under_this_process)  # the timed evaluation's process
another_of_ours = pytest.fixture(under_this_process)  # another evaluation's, or a build's


def test_a_process_is_ours_when_we_are_among_its_ancestors(ours):
    assert descends_from(ours, os.getpid())
    assert descends_from(os.getpid(), os.getpid())
    assert not descends_from(os.getppid(), os.getpid())
    assert not descends_from(2**22 + 1, os.getpid())  # above any pid_max: no such process


def test_only_the_timed_evaluations_processes_may_compute(ours, another_of_ours, monkeypatch):
    outsider = os.getppid()  # alive, and not under this process
    monkeypatch.setattr(nvml, "busy_processes", lambda gpu, since: {ours: 60, another_of_ours: 20, outsider: 35})
    monkeypatch.setattr(nvml, "compute_processes", lambda gpu: {ours, another_of_ours, outsider})
    found = {n.pid: n for n in neighbours.beside(GPU, time.time(), [ours])}
    assert {pid: (n.sm_percent, n.evo_own) for pid, n in found.items()} == {another_of_ours: (20, True),
                                                                             outsider: (35, False)}
    assert found[outsider].command == neighbours.shortened(neighbours.command_line(outsider))
    said = neighbours.warnings([], list(found.values()))
    assert len(said) == 1 and f"PID {outsider} " in said[0] and "while the candidate was timed" in said[0]
    assert f"PID {another_of_ours} (sleep 60, one of this evo's own processes) at 20%" in said[0]
    # What the timed processes started counts as theirs: with this process among them, both children.
    assert [n.pid for n in neighbours.beside(GPU, time.time(), [ours, os.getpid()])] == [outsider]


def test_nothing_is_said_where_the_driver_cannot_tell_whose_work_it_saw(ours, monkeypatch):
    child = ours
    outsider = os.getppid()
    monkeypatch.setattr(nvml, "busy_processes", lambda gpu, since: {outsider: 35})
    monkeypatch.setattr(nvml, "compute_processes", lambda gpu: {child, outsider})
    assert [n.pid for n in neighbours.beside(GPU, time.time(), [child])] == [outsider]  # ours too small to show as busy
    # None of the processes on the GPU is ours, though ours hold contexts there: the driver's
    # PIDs are not this namespace's (evo in a container), so the PID it names may be anyone here.
    monkeypatch.setattr(nvml, "compute_processes", lambda gpu: {outsider})
    assert neighbours.beside(GPU, time.time(), [child]) == []
    monkeypatch.setattr(nvml, "compute_processes", lambda gpu: None)
    assert neighbours.beside(GPU, time.time(), [child]) == []
    monkeypatch.setattr(nvml, "busy_processes", lambda gpu, since: None)  # no NVML
    monkeypatch.setattr(nvml, "compute_processes", lambda gpu: {child, outsider})
    assert neighbours.beside(GPU, time.time(), [child]) == []
    monkeypatch.setattr(nvml, "busy_processes", lambda gpu, since: {child: 60, outsider: 35})
    assert neighbours.beside(devices.Device(kind="cpu", visible="", name="a CPU", arch=""), time.time(), [child]) == []


def test_a_failed_check_of_time_beside_a_neighbour_is_no_verdict_on_the_candidate_within_its_share():
    near = [neighbours.Neighbour(pid=4321, command="python train.py", sm_percent=40)]
    failed = Check(name="timer_consistency", passed=False, detail="2 ms more per window outside the timer")
    with pytest.raises(neighbours.GpuShared, match="PID 4321 .*idle GPU"):
        neighbours.judge_timing_beside(near, failed, unaccounted_ms=2.0, window_ms=5.5)
    # Timer cheats on the H200, beside other tests' processes at 15% and 7% of the SMs, left 65.5
    # and 3.9 ms per window outside their timers (their windows' walls are at least that, their
    # calls' time and the protocol's): beyond those shares, so the failure stands.
    neighbours.judge_timing_beside([neighbours.Neighbour(pid=4321, command="checker.py", sm_percent=15)], failed,
                                   unaccounted_ms=65.5, window_ms=66.9)
    neighbours.judge_timing_beside([neighbours.Neighbour(pid=4321, command="checker.py", sm_percent=7)], failed,
                                   unaccounted_ms=3.9, window_ms=6.8)
    neighbours.judge_timing_beside([], failed, unaccounted_ms=0.1, window_ms=5.5)  # alone on the GPU
    neighbours.judge_timing_beside(near, Check(name="timer_consistency", passed=True, detail="agree"),
                                   unaccounted_ms=0.0, window_ms=5.5)


def test_a_reference_timed_beside_a_neighbour_is_not_reused():
    def fresh(near):
        reference = SimpleNamespace(neighbours=near, measured_at=time.monotonic())
        return TaskSession.reference_fresh(SimpleNamespace(reference=reference))

    assert fresh([])
    assert not fresh([neighbours.Neighbour(pid=4321, command="python train.py", sm_percent=70)])


# ---- on a GPU ----------------------------------------------------------------------------------

MATMULS_UNTIL_KILLED = """
import torch
a = torch.randn(8192, 8192, device="cuda")
torch.cuda.synchronize()
print("computing", flush=True)
while True:
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
"""


@pytest.mark.gpu
def test_a_process_outside_evo_computing_while_it_times_is_named(tmp_path, cache_dir, run_verify):
    """Kernels of another process run between the timed calls and look like work hidden outside
    the timer: an honest candidate is not rejected for them, and the verdict names the process.
    The test holds the machine's device lock, so no other test's evaluation is timed beside the
    load; the evo it runs takes a lock of its own (TMPDIR)."""
    task, candidate = TASKS / "cuda_relu_odd.py", CUDA_CANDIDATES / "honest_relu.py"
    alone = run_verify(task, candidate, device="cuda")  # builds it into the cache, before the lock is held
    env = {**os.environ, "EVO_CACHE_DIR": str(cache_dir), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "evo", "verify", str(task), str(candidate), "--device", "cuda", "--json"]
    with gpu_alone():
        load = subprocess.Popen([sys.executable, "-c", MATMULS_UNTIL_KILLED], stdout=subprocess.PIPE, text=True)
        try:
            assert load.stdout.readline().strip() == "computing"
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        finally:
            load.kill()
            load.wait()
    verdict = json.loads(result.stdout)
    failed = [check["name"] for check in verdict["checks"] if not check["passed"]]
    for subject in ("the reference", "the candidate"):
        named = [warning for warning in verdict["warnings"] if f"while {subject} was timed" in warning]
        assert len(named) == 1 and f"PID {load.pid} " in named[0], verdict["warnings"]
    assert verdict["verdict"] in ("verified", "error"), (verdict["summary"], failed)
    if verdict["verdict"] == "error":
        assert f"PID {load.pid} " in verdict["summary"] and failed == ["timer_consistency"], verdict["summary"]
    print(f"\nalone: {alone.verdict}, {alone.speedup}; beside the load: {verdict['verdict']}, {verdict['speedup']}, "
          f"{verdict['summary']}")


@pytest.mark.gpu
def test_a_process_of_this_evo_computing_while_it_times_is_named(tmp_path, monkeypatch, run_verify):
    """Only the timed evaluation's processes may compute while it times: one of this evo's own
    (here a child of the test, which runs evo in its process; in a search, a build that gave
    itself the GPU back, say) is named as an outsider is."""
    task, candidate = TASKS / "cuda_relu_odd.py", CUDA_CANDIDATES / "honest_relu.py"
    run_verify(task, candidate, device="cuda")  # builds it into the cache, before the lock is held
    with gpu_alone():
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this evo's lock: the machine's is held above
        load = subprocess.Popen([sys.executable, "-c", MATMULS_UNTIL_KILLED], stdout=subprocess.PIPE, text=True)
        try:
            assert load.stdout.readline().strip() == "computing"
            verdict = run_verify(task, candidate, device="cuda")
        finally:
            load.kill()
            load.wait()
    for subject in ("the reference", "the candidate"):
        named = [warning for warning in verdict.warnings if f"while {subject} was timed" in warning]
        assert len(named) == 1 and f"PID {load.pid} (" in named[0], verdict.warnings
        assert "one of this evo's own processes" in named[0]
    assert verdict.verdict in ("verified", "error"), verdict.summary
    print(f"\nbeside a process of its own: {verdict.verdict}, {verdict.speedup}, {verdict.summary}")
