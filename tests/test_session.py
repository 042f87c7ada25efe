"""A task's session serves many evaluations, as in a search: its checker, flusher and reference
timing are reused, every candidate still gets fresh processes and fresh secret seeds, and
nothing one candidate does reaches the next (invariants 4 and 5 of DESIGN.md). CPU versions."""

from __future__ import annotations

import mmap
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import CPU_CANDIDATES, EXAMPLE_TASKS, ROOT, failed_names
from evo.config import VerifyPolicy
from evo import evaluator
from evo.evaluator import Evaluation
from evo.live_sandboxes import stat_field
from evo.sandbox_runner import SandboxProcess
from evo.session import TaskSession
from evo.timing import calibration
from test_faults import descendants

RELU = EXAMPLE_TASKS / "relu.py"
HONEST = ROOT / "examples" / "candidates" / "relu_cpu.py"
FAULTS = ROOT / "tests" / "candidates" / "faults"
POLICY = VerifyPolicy(device="cpu", trials=2, timing_budget_s=0.2, call_timeout_s=5, load_timeout_s=120)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def session(cache_dir):
    with TaskSession(RELU, POLICY, cache_dir, standby=1) as session:
        yield session


def evaluate(session: TaskSession, candidate=HONEST) -> Evaluation:
    evaluation = Evaluation(RELU, candidate, POLICY, session=session)
    evaluation.verdict_seen = evaluation.run()
    return evaluation


def test_reference_and_checker_are_reused_and_candidates_get_fresh_processes_and_seeds(session):
    first, second = evaluate(session), evaluate(session)
    assert first.verdict_seen.verdict == second.verdict_seen.verdict == "verified", second.verdict_seen.summary
    assert not first.timings.reference_reused and second.timings.reference_reused
    assert first.timings.reference_eager == second.timings.reference_eager
    assert first.checker is second.checker and first.checker.running()
    assert first.runner.pid != second.runner.pid
    assert first.profiler.pid != second.profiler.pid
    assert not first.runner.running() and not first.profiler.running()  # used once, then killed
    assert not set(first.trial_seeds) & set(second.trial_seeds)
    first_timed = {seed for window in first.timed_seeds for seed in window}
    second_timed = {seed for window in second.timed_seeds for seed in window}
    assert first_timed and second_timed and not first_timed & second_timed


@pytest.mark.parametrize("still_warm_s, warm_ups", [(600.0, 1), (0.0, 3)])
def test_a_candidate_timed_soon_after_the_last_timing_skips_the_clock_warm_up(session, monkeypatch, still_warm_s,
                                                                              warm_ups):
    """Two candidates: the reference's timing warms the device, and each candidate's timing does
    too unless the session's last timing ended within STILL_WARM_S."""
    monkeypatch.setattr(evaluator, "STILL_WARM_S", still_warm_s)
    asked = []
    original = SandboxProcess.request

    def request(process, message, *args, **kwargs):
        asked.append(message.get("op"))
        return original(process, message, *args, **kwargs)

    monkeypatch.setattr(SandboxProcess, "request", request)
    assert [evaluate(session).verdict_seen.verdict for _ in range(2)] == ["verified"] * 2
    assert asked.count("warm") == warm_ups


@pytest.mark.parametrize("recalibrated", [True, False])
def test_a_reference_timed_on_a_busy_host_does_not_let_a_timer_hide_that_much(session, monkeypatch, recalibrated):
    """The session's reference timing, reused for minutes, was taken while the host was busy:
    each of its windows left a second outside its timer. A patched timer is still caught, by the
    reference's windows timed again beside the candidate's. Without them (the control case), the
    slowed reference lets the same timer through."""
    evaluate(session)
    slowed = session.reference.samples
    slowed.window_wall_ms[:] = [wall + 1000.0 for wall in slowed.window_wall_ms]
    if not recalibrated:
        monkeypatch.setattr(Evaluation, "calibrate", lambda self: calibration(self.reference.samples))
    cheat = evaluate(session, CPU_CANDIDATES / "timer_patch.py")
    if recalibrated:
        assert cheat.verdict_seen.verdict == "rejected", cheat.verdict_seen.summary
        assert "timer_consistency" in failed_names(cheat.verdict_seen)
    else:
        assert cheat.verdict_seen.verdict == "verified", cheat.verdict_seen.summary


def test_the_profiler_has_ended_before_the_candidate_is_timed(session, monkeypatch):
    """Invariant: no candidate code but the timed process's runs while the candidate is timed.
    The profiler's process is killed when its profile arrives and has ended, with every process
    of its group, when the first timed window starts."""
    seen = []
    timed_calls = Evaluation.timed_calls

    def watched(self, seeds):
        group = self.profiler.pid
        seen.append([pid for pid in os.listdir("/proc") if pid.isdigit() and process_group(int(pid)) == group])
        return timed_calls(self, seeds)

    monkeypatch.setattr(Evaluation, "timed_calls", watched)
    evaluation = evaluate(session)
    assert evaluation.verdict_seen.verdict == "verified", evaluation.verdict_seen.summary
    assert seen and seen[0] == []


def test_the_next_candidate_loads_while_the_last_ends_and_is_checked_only_once_it_has_ended(cache_dir, monkeypatch,
                                                                                          tmp_path):
    """An evaluation gives the device up as soon as its processes are killed; the next one loads
    its candidate while they end, and waits for them to be gone before its first trial (nothing
    of theirs runs beside its checked or timed calls, and the exchange was cleared after them).
    Their ending is made slow here, as a large device context's is."""
    # Device locks of its own, so that no evaluation of another test worker (each holds the
    # machine's CPU lock for seconds) comes between these two turns.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ending_s = 4.0
    events: dict[tuple[str, int], float] = {}
    kill, load, correctness = SandboxProcess.kill, Evaluation.load_candidate, Evaluation.correctness

    def slow_kill(process):
        turn = getattr(process, "turn", None)  # a process that loaded a candidate
        if turn is not None and process.proc is not None:
            time.sleep(ending_s)
        kill(process)
        if turn is not None:
            events.setdefault(("ended", turn), time.monotonic())

    def loading(evaluation):
        evaluation.runner.turn = turn = len({key[1] for key in events if key[0] == "load"})
        events[("load", turn)] = time.monotonic()
        load(evaluation)

    def checking(evaluation):
        events[("trials", evaluation.runner.turn)] = time.monotonic()
        correctness(evaluation)

    monkeypatch.setattr(SandboxProcess, "kill", slow_kill)
    monkeypatch.setattr(Evaluation, "load_candidate", loading)
    monkeypatch.setattr(Evaluation, "correctness", checking)
    with TaskSession(RELU, POLICY, cache_dir, standby=2) as session, ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda _: Evaluation(RELU, HONEST, POLICY, session=session).run(), range(2)))
    assert [verdict.verdict for verdict in verdicts] == ["verified"] * 2, [verdict.summary for verdict in verdicts]
    assert events[("load", 1)] < events[("ended", 0)], "the second candidate waited for the first's processes to load"
    assert events[("trials", 1)] > events[("ended", 0)], "the second candidate's trials began before the first's " \
                                                         "processes had ended"


def test_no_more_evaluations_hold_candidate_processes_at_once_than_the_session_keeps_spares_for(cache_dir, monkeypatch):
    """Evaluations build as many at once as they are, but take their processes only while fewer
    than `standby` hold some: on a device, more processes starting and ending slow every turn."""
    holding, most, lock = [0], [0], threading.Lock()
    spawn, release = Evaluation.spawn_processes, Evaluation.release_processes

    def spawning(evaluation):
        with lock:
            holding[0] += 1
            most[0] = max(most[0], holding[0])
        evaluation.counted = True
        spawn(evaluation)

    def releasing(evaluation):
        release(evaluation)
        if getattr(evaluation, "counted", False):
            evaluation.counted = False
            with lock:
                holding[0] -= 1

    monkeypatch.setattr(Evaluation, "spawn_processes", spawning)
    monkeypatch.setattr(Evaluation, "release_processes", releasing)
    with TaskSession(RELU, POLICY, cache_dir, standby=1) as session, ThreadPoolExecutor(3) as pool:
        verdicts = list(pool.map(lambda _: Evaluation(RELU, HONEST, POLICY, session=session).run(), range(3)))
    assert [verdict.verdict for verdict in verdicts] == ["verified"] * 3, [verdict.summary for verdict in verdicts]
    assert most[0] == 1, f"{most[0]} evaluations held candidate processes at once with one spare kept"


def test_evaluations_on_one_device_say_when_they_held_it_and_their_turns_never_overlap(cache_dir):
    """What a verdict reports of its turn (device_at, device_s) lets anyone check, from the verdicts
    alone, that no two candidates were on one device at once."""
    with TaskSession(RELU, POLICY, cache_dir, standby=2) as session, ThreadPoolExecutor(3) as pool:
        before = time.time()
        verdicts = list(pool.map(lambda _: Evaluation(RELU, HONEST, POLICY, session=session).run(), range(3)))
        after = time.time()
    assert [verdict.verdict for verdict in verdicts] == ["verified"] * 3, [verdict.summary for verdict in verdicts]
    turns = sorted((verdict.timings.device_at, verdict.timings.device_at + verdict.timings.device_s)
                   for verdict in verdicts)
    assert before < turns[0][0] and turns[-1][1] < after
    assert all(verdict.timings.device_s > 0 for verdict in verdicts)
    assert all(earlier[1] <= later[0] for earlier, later in zip(turns, turns[1:])), turns


def process_group(pid: int) -> int:
    """The process group of a process that has not exited (-1 for one that has: a zombie runs
    nothing and holds no memory or device context)."""
    try:
        return -1 if stat_field(pid, 3) in (None, "Z", "X") else os.getpgid(pid)
    except OSError:
        return -1


def test_spares_are_started_ahead_of_need(session):
    evaluate(session)
    spares = session.spares[False] + session.spares[True]
    assert len(spares) == 2 and all(process.running() for process in spares)
    taken = session.take_candidate_process()
    assert taken is spares[0]
    session.release(taken)


def test_a_crashing_candidate_leaves_the_session_working(session):
    evaluate(session)
    crashed = evaluate(session, FAULTS / "segfault.py")
    assert crashed.verdict_seen.verdict == "rejected" and "runs" in failed_names(crashed.verdict_seen)
    after = evaluate(session)
    assert after.verdict_seen.verdict == "verified", after.verdict_seen.summary
    assert after.timings.reference_reused


def test_a_candidate_rejected_in_its_outputs_does_not_change_the_next_verdict(session):
    cheat = evaluate(session, CPU_CANDIDATES / "stale_empty.py")
    assert cheat.verdict_seen.verdict == "rejected"
    after = evaluate(session)
    assert after.verdict_seen.verdict == "verified", after.verdict_seen.summary
    assert after.timings.reference_eager == cheat.timings.reference_eager


def test_a_dead_checker_is_started_again(session):
    first = evaluate(session)
    os.killpg(first.checker.pid, signal.SIGKILL)
    first.checker.proc.wait()
    after = evaluate(session)
    assert after.verdict_seen.verdict == "verified", after.verdict_seen.summary
    assert after.checker is not first.checker and not after.timings.reference_reused


def exchange_bytes(session: TaskSession, length: int) -> bytes:
    with mmap.mmap(session.exchange.fd, length, prot=mmap.PROT_READ) as view:
        return view[:]


def test_the_exchange_buffer_is_cleared_between_candidates(session):
    """Outputs cross from a candidate's process to the checker through a buffer the session
    keeps; the next candidate must not find the last one's bytes there."""
    verified = evaluate(session)
    assert verified.verdict_seen.verdict == "verified", verified.verdict_seen.summary
    assert os.fstat(session.exchange.fd).st_size >= verified.exchange_bytes > 0
    assert not any(exchange_bytes(session, verified.exchange_bytes))


def test_a_candidate_cannot_shrink_the_exchange_buffer_under_the_checker(session):
    tamper = evaluate(session, FAULTS / "exchange_tamper.py")
    assert tamper.verdict_seen.verdict == "verified", tamper.verdict_seen.summary
    assert os.fstat(session.exchange.fd).st_size > 8 << 30  # it could grow the file, and only that
    assert not any(exchange_bytes(session, tamper.exchange_bytes))
    after = evaluate(session)
    assert after.verdict_seen.verdict == "verified", after.verdict_seen.summary


def test_closing_a_session_leaves_no_process(cache_dir):
    with TaskSession(RELU, POLICY, cache_dir, standby=1) as session:
        evaluate(session)
        assert descendants(os.getpid())
    assert not descendants(os.getpid())


@pytest.mark.gpu
def test_a_corrupted_cuda_context_costs_only_its_own_verdict_in_a_session(cache_dir):
    """An illegal memory access kills its own context; the session's checker, its reference
    timing and the next candidate are untouched."""
    from conftest import CUDA_CANDIDATES

    policy = VerifyPolicy(device="cuda", timing_budget_s=0.3, max_timed_calls=50)
    with TaskSession(RELU, policy, cache_dir, standby=1) as session:
        verdicts = [Evaluation(RELU, CUDA_CANDIDATES / name, policy, session=session).run()
                    for name in ("honest_relu.py", "illegal_address.py", "honest_relu.py")]
    assert [v.verdict for v in verdicts] == ["verified", "rejected", "verified"], [v.summary for v in verdicts]
    assert verdicts[2].timings.reference_reused
    assert verdicts[2].timings.reference_eager == verdicts[0].timings.reference_eager


def test_two_evaluations_failing_at_once_release_the_trusted_processes_once(cache_dir):
    """Two evaluations of a search can fail at once, each discarding the session's checker and
    flusher: each process must be released by one of them only (releasing it twice at once
    raised AttributeError in the second, seen on the H200 with a device-memory hoarder)."""
    for _ in range(3):
        session = TaskSession(RELU, POLICY, cache_dir).start()
        session.facts()  # the task loaded: both trusted processes are up
        trusted = [session.checker, session.flusher]
        barrier, errors = threading.Barrier(2), []

        def discard() -> None:
            barrier.wait()
            try:
                session.discard_trusted()
            except Exception as err:  # noqa: BLE001 - any error is the failure
                errors.append(repr(err))

        threads = [threading.Thread(target=discard) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        session.close()
        assert not errors, errors
        assert not any(process.running() for process in trusted)


def test_two_evaluations_starting_the_trusted_processes_at_once_leave_none_behind(cache_dir, monkeypatch):
    """Two evaluations that begin at once after a failure each find no checker running: one
    starts the pair, and none is left running once the session closes."""
    started = []
    sandbox = TaskSession.sandbox

    def recording(self, *args, **kwargs):
        process = sandbox(self, *args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(TaskSession, "sandbox", recording)
    session = TaskSession(RELU, POLICY, cache_dir)
    barrier = threading.Barrier(2)

    def begin() -> None:
        barrier.wait()
        session.start_trusted()

    threads = [threading.Thread(target=begin) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        session.close()
    assert len(started) == 2, f"{len(started)} trusted processes were started"
    assert not any(process.running() for process in started)
