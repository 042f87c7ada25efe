"""Candidates that crash, hang, exit, flood, exhaust memory or escape (CPU versions, and the
device-memory hoarders on a GPU).

Each fault must end in a clean verdict naming the check, within its time limit, leave no
process behind, and the next verification in this same Python process must still work
(invariant 4 of DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASKS, ROOT, failed_names
from evo import live_sandboxes
from evo.neighbours import command_line

FAULTS = ROOT / "tests" / "candidates" / "faults"
RELU = EXAMPLE_TASKS / "relu.py"
HONEST = ROOT / "examples" / "candidates" / "relu_cpu.py"

CALL_TIMEOUT = 3.0
# Timeouts of a faulty run: small, so hangs end fast; the load limit also covers the reference's start-up.
FAULT_POLICY = dict(device="cpu", call_timeout_s=CALL_TIMEOUT, load_timeout_s=60, build_timeout_s=300, trials=1)
# The honest follow-up: one correctness trial, the fixture's short timing budget.
HONEST_POLICY = dict(device="cpu", trials=1)
# Start-up of the checker and candidate processes plus the calls before the fault, on a slow shared machine.
SLACK_S = 40.0

pytestmark = pytest.mark.timeout(300)


# ---- processes, seen through /proc -----------------------------------------------------------

def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process that is not a zombie."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int) -> list[int]:
    table = live_processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def describe(pid: int) -> str:
    return command_line(pid)[:300]


def processes_mentioning(token: str) -> list[int]:
    """Live processes (other than this one) whose whole command line contains token."""
    return [pid for pid in live_processes() if pid != os.getpid() and token in command_line(pid)]


def assert_no_process_left() -> None:
    deadline = time.monotonic() + 5
    while (left := descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "processes left behind by the verification: " + "; ".join(f"{p}: {describe(p)}" for p in left)


# ---- the shared shape of a fault test -------------------------------------------------------------

@pytest.fixture
def honest_next(run_verify):
    """After a fault: no process behind, and the next verification in this process still works."""

    def check() -> None:
        assert_no_process_left()
        for _ in range(3):  # timer_consistency alone can fail an honest run on a loaded 2-core machine: retry
            verdict = run_verify(RELU, HONEST, **HONEST_POLICY)
            if failed_names(verdict) != ["timer_consistency"]:
                break
        assert verdict.verdict == "verified", (verdict.summary, failed_names(verdict))
        assert_no_process_left()

    return check


# PROFILED_FIRST: the profiled call is collected as soon as the candidate has loaded, before the
# trials (its process then ends while they run), so a forward that always fails fails there
# first, in the candidate's profiler process, and the detail names the profiled call.


def run_fault(run_verify, name: str, **policy):
    settings = {**FAULT_POLICY, **policy}
    started = time.monotonic()
    verdict = run_verify(RELU, FAULTS / name, **settings)
    return verdict, time.monotonic() - started


def only_failure(verdict):
    """The first failed check of a rejected verdict, which its summary must name."""
    assert verdict.verdict == "rejected", verdict.summary
    failed = verdict.failed()
    assert failed, f"a rejected verdict names no failed check: {verdict.summary}"
    assert verdict.summary.startswith(f"rejected by check {failed[0].name}:")
    return failed[0]


@pytest.fixture(scope="module", autouse=True)
def warm_build(cache_dir):
    """Build the honest example and measure the CPU ceilings once, so that no fault test pays for them
    inside its time bound."""
    from evo.config import VerifyPolicy
    from evo.evaluator import verify

    verify(RELU, HONEST, VerifyPolicy(**HONEST_POLICY), cache_dir=cache_dir)


# ---- files that cannot be used, and a forward that raises ---------------------------------------

def test_syntax_error_is_rejected_by_build(run_verify):
    verdict, _ = run_fault(run_verify, "syntax_error.py")
    check = only_failure(verdict)
    assert check.name in ("build", "load")
    assert "syntax error" in check.detail and "line 6" in check.detail
    assert "Traceback" not in check.detail
    assert_no_process_left()


def test_missing_modelnew_is_rejected_by_load(run_verify):
    verdict, _ = run_fault(run_verify, "no_modelnew.py")
    check = only_failure(verdict)
    assert check.name == "load"
    assert "ModelNew" in check.detail
    assert_no_process_left()


def test_compile_error_is_rejected_by_build_with_the_compiler_line(run_verify):
    verdict, _ = run_fault(run_verify, "compile_error.py")
    check = only_failure(verdict)
    assert check.name == "build"
    assert "failed to compile" in check.detail
    error_lines = [line for line in check.detail.splitlines()
                   if "error" in line and "evo_fault_undeclared_name" in line]
    assert error_lines, f"the compiler's error line is missing from the detail:\n{check.detail}"
    assert "main.cpp:3:" in error_lines[0]  # file and line of the fault
    assert_no_process_left()


def test_forward_that_raises_is_rejected_by_runs(run_verify):
    verdict, _ = run_fault(run_verify, "raises.py")
    check = only_failure(verdict)
    assert check.name == "runs"
    assert "ValueError" in check.detail and "evo-fault: forward refuses to work" in check.detail
    assert "the profiled call" in check.detail and "raises.py, line 8" in check.detail  # see PROFILED_FIRST
    assert_no_process_left()


# ---- crashes and exits ----------------------------------------------------------------------------

def test_segfault_in_forward_is_rejected_by_runs(run_verify, honest_next):
    verdict, elapsed = run_fault(run_verify, "segfault.py")
    check = only_failure(verdict)
    assert check.name == "runs"
    assert "SIGSEGV" in check.detail or "segmentation fault" in check.detail
    assert "candidate profiler" in check.detail  # see PROFILED_FIRST
    assert elapsed < SLACK_S
    honest_next()


def test_os_exit_in_forward_is_rejected_by_runs(run_verify, honest_next):
    verdict, elapsed = run_fault(run_verify, "exit_zero.py")
    check = only_failure(verdict)
    assert check.name == "runs"
    assert "exited with code 0" in check.detail
    assert elapsed < SLACK_S
    honest_next()


def test_a_task_input_generator_broken_by_the_candidate_is_its_failure(run_verify, honest_next):
    verdict, _ = run_fault(run_verify, "breaks_get_inputs.py")
    check = only_failure(verdict)
    assert check.name == "runs" and "get_inputs()" in check.detail and "no inputs for you" in check.detail, check.detail
    honest_next()


def test_candidate_crash_is_not_blamed_on_the_checker(run_verify):
    verdict, _ = run_fault(run_verify, "exit_blames_checker.py")
    assert verdict.verdict == "rejected", verdict.summary
    assert failed_names(verdict) == ["runs"]
    assert "exited with code 3" in verdict.failed()[0].detail


def test_crash_at_import_is_a_build_failure(run_verify):
    verdict, _ = run_fault(run_verify, "segfault_at_import.py")
    assert verdict.verdict == "rejected", verdict.summary
    assert failed_names(verdict) in (["build"], ["load"])
    assert "SIGSEGV" in verdict.failed()[0].detail


# ---- hangs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hang_loop.py", "hang_native.py"])  # hang_sleep.py: see below
def test_hanging_forward_times_out_as_runs(run_verify, honest_next, name):
    verdict, elapsed = run_fault(run_verify, name)
    check = only_failure(verdict)
    assert check.name == "runs"
    assert "did not answer within" in check.detail and "candidate profiler" in check.detail  # see PROFILED_FIRST
    assert CALL_TIMEOUT <= elapsed < CALL_TIMEOUT + SLACK_S
    assert verdict.isolation is not None and verdict.isolation.call_timeout_s == CALL_TIMEOUT
    honest_next()


def test_hanging_constructor_times_out(run_verify, honest_next):
    load_timeout = 15.0
    verdict, elapsed = run_fault(run_verify, "hang_init.py", load_timeout_s=load_timeout)
    check = only_failure(verdict)
    assert check.name == "load"  # it hung before any call
    assert "did not answer within" in check.detail
    assert load_timeout <= elapsed < load_timeout + SLACK_S
    honest_next()


def test_timeout_detail_names_the_call_and_the_limit(run_verify):
    verdict, _ = run_fault(run_verify, "hang_sleep.py", call_timeout_s=2)
    assert failed_names(verdict) == ["runs"], verdict.summary
    detail = verdict.failed()[0].detail
    assert "the profiled call" in detail  # see PROFILED_FIRST
    assert "2 s" in detail or "2.0 s" in detail or "2 seconds" in detail


# ---- memory and output ---------------------------------------------------------------------------

def test_memory_hog_is_stopped_by_the_memory_check(run_verify, honest_next):
    limit = 2 * 2**30
    # 64 MiB every 0.1 s: the limit is passed after about 3 s, inside a generous call timeout.
    verdict, elapsed = run_fault(run_verify, "memory_hog.py", memory_limit_bytes=limit, call_timeout_s=60)
    check = only_failure(verdict)
    assert check.name == "memory", check.detail
    assert "over the limit of 2.0 GiB" in check.detail and "candidate profiler" in check.detail  # see PROFILED_FIRST
    assert verdict.isolation.memory_limit_bytes == limit
    assert elapsed < 30 + SLACK_S
    honest_next()


@pytest.mark.parametrize("name", ["disk_hog.py", "disk_hog_unlinked.py"])
def test_disk_hog_is_stopped_by_the_disk_check(run_verify, honest_next, name):
    """16 MiB every 0.05 s into its directory, or into a file it deleted but holds open: stopped
    once past the limit, before it can fill the disk beside other candidates' builds."""
    limit = 64 << 20
    verdict, elapsed = run_fault(run_verify, name, disk_limit_bytes=limit, call_timeout_s=60)
    check = only_failure(verdict)
    assert check.name == "disk", check.detail
    assert "to disk, over the limit of 64 MiB" in check.detail and "candidate profiler" in check.detail, check.detail
    assert verdict.isolation.disk_limit_bytes == limit
    assert elapsed < 10 + SLACK_S
    honest_next()


def test_fork_bomb_stops_at_the_task_limit(run_verify, honest_next):
    """Forks that are never reaped, up to 200000 (on this machine, fork fails before: 32768 process
    IDs by default): the sandbox is stopped soon after it passes the limit, long before the
    machine's process IDs run out, and with them evo's own next process."""
    limit = 256
    verdict, elapsed = run_fault(run_verify, "fork_bomb.py", task_limit=limit, call_timeout_s=60)
    check = only_failure(verdict)
    assert check.name == "processes", check.detail
    ran = re.search(r"ran (\d+) processes and threads at once, over the limit of 256", check.detail)
    assert ran and "candidate profiler" in check.detail, check.detail  # see PROFILED_FIRST
    assert int(ran[1]) < 8 * limit, check.detail  # caught within a check or two of passing it
    assert verdict.isolation.task_limit == limit
    assert elapsed < 10 + SLACK_S
    honest_next()


def test_flood_then_correct_answer_is_verified(run_verify, honest_next, capfd):
    """16 MiB printed on the first call change nothing: the verdict is the kernel's, and the
    flood stays in the sandbox (it does not reach this process's stdout or stderr)."""
    # Draining 16 MiB through pipes on a loaded 2-core machine can take seconds: a call limit well above that.
    for _ in range(3):  # timer_consistency alone can fail an honest run on a loaded 2-core machine: retry
        verdict, _ = run_fault(run_verify, "flood_then_correct.py", call_timeout_s=60)
        if failed_names(verdict) != ["timer_consistency"]:
            break
    assert verdict.verdict == "verified", (verdict.summary, failed_names(verdict))
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 64 * 1024 and "evo-fault-flood" not in out + err
    honest_next()


def test_endless_flood_times_out_as_runs(run_verify, honest_next, capfd):
    verdict, elapsed = run_fault(run_verify, "flood_forever.py")
    check = only_failure(verdict)
    assert check.name == "runs"
    assert "did not answer within" in check.detail
    assert len(check.detail) < 4096  # the flood is not pasted into the verdict
    assert CALL_TIMEOUT <= elapsed < CALL_TIMEOUT + SLACK_S
    out, err = capfd.readouterr()
    assert "evo-fault-flood" not in out + err
    honest_next()


# ---- a child that escapes into its own session ----------------------------------------------------

def run_escape(run_verify, tmp_path: Path, **policy):
    candidate = tmp_path / "escape_setsid.py"
    shutil.copy(FAULTS / "escape_setsid.py", candidate)
    marker = tmp_path / "escapee.marker"
    # The forward waits for the escapee's first sign of life, which takes a Python start-up.
    verdict = run_verify(RELU, candidate, **{**FAULT_POLICY, "call_timeout_s": 30, **policy})
    return verdict, marker


def assert_escapee_gone(marker: Path) -> None:
    """No process with the escapee's token in its command line; its marker file (where the sandbox's
    file system let it write one) is no longer growing."""
    deadline = time.monotonic() + 5
    while processes_mentioning(str(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_mentioning(str(marker))
    assert not left, f"the escaped child is still running: {[describe(pid) for pid in left]}"
    if marker.exists():
        size = marker.stat().st_size
        time.sleep(0.5)
        assert marker.stat().st_size == size, "the marker file is still being written"


def kill_escapees(marker: Path) -> None:
    for pid in processes_mentioning(str(marker)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_escaped_child_dies_with_the_sandbox(run_verify, honest_next, tmp_path):
    try:
        verdict, marker = run_escape(run_verify, tmp_path)
        if not verdict.isolation.pid_namespace:
            pytest.skip("no PID namespace on this machine; see test_escaped_child_dies_without_namespaces")
        check = only_failure(verdict)
        assert check.name == "runs" and "escaped child started" in check.detail  # the escape happened
        assert_escapee_gone(marker)
    finally:
        kill_escapees(tmp_path / "escapee.marker")
    honest_next()


def test_escaped_child_dies_without_namespaces(run_verify, tmp_path):
    try:
        verdict, marker = run_escape(run_verify, tmp_path, use_namespaces=False)
        assert verdict.isolation.method == "process-group" and not verdict.isolation.pid_namespace
        assert failed_names(verdict) == ["runs"] and "escaped child started" in verdict.failed()[0].detail
        assert_escapee_gone(marker)
    finally:
        kill_escapees(tmp_path / "escapee.marker")


# ---- evo itself killed ---------------------------------------------------------------------------

def cpu_ticks(pid: int) -> int:
    return sum(int(live_sandboxes.stat_field(pid, number) or 0) for number in (14, 15))  # utime + stime


def spinner(pids: list[int]) -> int | None:
    """One of these processes that kept a core busy for the last second, other than the trusted
    ones (the checker is busy while it times the reference)."""
    before = {pid: cpu_ticks(pid) for pid in pids if not re.search(r"(checker|flusher)\.py", command_line(pid))}
    time.sleep(1.0)
    busy = [pid for pid, ticks in before.items() if cpu_ticks(pid) - ticks >= 0.8 * os.sysconf("SC_CLK_TCK")]
    return busy[0] if busy else None


@pytest.mark.skipif(not live_sandboxes.death_signal_prefix(), reason=(
    "setpriv cannot set a parent-death signal here (the verdict's isolation notes say so)"))
@pytest.mark.parametrize("flags", [[], ["--no-fork-server"]], ids=["forked", "fresh-interpreters"])
def test_sandboxes_end_with_evo_however_it_ends(flags):
    """evo killed with SIGKILL (the OOM killer, kill -9) while a candidate spins in forward and
    its process group is stopped, as evo's hold leaves it while inputs are copied in: none of its
    sandboxes runs on, since a candidate left on the machine would slow every later timing
    there. The test's process adopts evo's orphans, as a service manager or systemd's user
    instance would: this machine's first process kills those it adopts."""
    live_sandboxes.become_subreaper()
    evo = subprocess.Popen([sys.executable, "-m", "evo", "verify", str(RELU), str(FAULTS / "hang_loop.py"),
                            "--device", "cpu", "--call-timeout", "600", *flags], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (spinning := spinner(descendants(evo.pid))) is None and time.monotonic() < deadline:
            assert evo.poll() is None, "evo ended before the candidate spun"
        assert spinning is not None, "the candidate never spun"
        sandboxes = {pid: command_line(pid) for pid in descendants(evo.pid)}
        os.killpg(os.getpgid(spinning), signal.SIGSTOP)
    finally:
        evo.kill()
        evo.wait()
    deadline = time.monotonic() + 10
    while (left := [pid for pid in sandboxes if pid in live_processes()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    for pid in sandboxes:  # adopted: ours to reap
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    assert not left, "running after evo was killed: " + "; ".join(sandboxes[pid][:200] for pid in left)


# ---- device memory (GPU) ---------------------------------------------------------------------------

CUDA_RELU = ROOT / "tests" / "tasks" / "cuda_relu_odd.py"
CUDA_HONEST = ROOT / "tests" / "candidates" / "cuda" / "honest_nvrtc_relu.py"
# The hoarders compute with torch alone: allowed, so that only their memory is in question.
HOARD_POLICY = dict(device="cuda", require_custom_code=False, timing_budget_s=0.3, max_timed_calls=50)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["device_memory_hoard.py", "device_memory_hoard_forward.py"])
def test_a_device_memory_hoard_costs_only_its_own_verdict(cache_dir, name):
    """A candidate keeps nearly all of the device's memory while evaluations queued beside it in
    its session (as a search runs them) wait for the device and start their processes: they, and
    the one after it, are verified, and the hoarder's verdict is its own, not an evaluator error."""
    from evo import devices, nvml
    from evo.config import VerifyPolicy
    from evo.evaluator import verify
    from evo.session import TaskSession

    # Else every turn would wait for its processes to end before the next may start.
    assert nvml.free_fraction(devices.resolve("cuda").visible) is not None, "NVML cannot read the device's memory"
    policy = VerifyPolicy(**HOARD_POLICY)
    session = TaskSession(CUDA_RELU, policy, cache_dir=cache_dir, standby=2).start()
    verdicts = {}

    def evaluate(label: str, candidate: Path, delay_s: float) -> None:
        time.sleep(delay_s)
        verdicts[label] = verify(CUDA_RELU, candidate, policy, cache_dir=cache_dir, session=session)

    try:
        beside = [threading.Thread(target=evaluate, args=args) for args in
                  (("hoard", FAULTS / name, 0.0), ("beside 1", CUDA_HONEST, 0.5), ("beside 2", CUDA_HONEST, 1.0))]
        for thread in beside:
            thread.start()
        for thread in beside:
            thread.join()
        evaluate("after", CUDA_HONEST, 0.0)
    finally:
        session.close()
    assert verdicts["hoard"].verdict != "error", verdicts["hoard"].summary
    for label in ("beside 1", "beside 2", "after"):
        assert verdicts[label].verdict == "verified", (label, verdicts[label].summary)
    assert_no_process_left()


@pytest.mark.gpu
def test_the_next_holder_of_the_device_finds_a_hoarders_memory_given_back(run_verify):
    """A turn that ends with the device's memory nearly full waits for its killed processes to
    end before it gives the device up: the next holder takes device memory at once (its checker,
    its candidate's load), which a killed process gives back only as it ends."""
    from evo import devices, nvml
    from evo.devices import FREE_FOR_OVERLAPPED_TEARDOWN

    device = devices.resolve("cuda")
    free_when_taken: list[float] = []
    finished = threading.Event()

    def next_holder() -> None:
        while not finished.is_set():
            if nvml.free_fraction(device.visible) < FREE_FOR_OVERLAPPED_TEARDOWN:
                break  # the hoarder has filled the device, in its turn
            time.sleep(0.005)
        else:
            return
        with devices.exclusive(device, defer_teardowns=True):  # as the hoarder's turn ends
            free_when_taken.append(nvml.free_fraction(device.visible))

    waiting = threading.Thread(target=next_holder)
    waiting.start()
    try:
        verdict = run_verify(CUDA_RELU, FAULTS / "device_memory_hoard.py", **HOARD_POLICY)
    finally:
        finished.set()
        waiting.join()
    assert verdict.verdict != "error", verdict.summary
    assert free_when_taken, "the hoarder was never seen filling the device"
    assert free_when_taken[0] >= FREE_FOR_OVERLAPPED_TEARDOWN, \
        f"the next holder took the device with {free_when_taken[0]:.1%} of its memory free"
