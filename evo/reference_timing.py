"""Timing the reference: under the same protocol as every candidate, before any candidate code
is loaded, once per task session while that timing is fresh; and a few of its windows again
beside each candidate's, so that what the protocol itself costs is judged from the quietest of
the reference's timings."""

from __future__ import annotations

import time

from evo import neighbours
from evo.config import VerifyPolicy
from evo.devices import Device
from evo.handover import OwnInputs
from evo.judgement import EvaluatorError
from evo.sandbox_runner import SandboxProcess
from evo.session import ReferenceTiming, new_seeds
from evo.timing import WARM_SECONDS, Calibration, SubjectError, calibration, plan, time_reference, warm_up

RECALIBRATION_WINDOWS = 3  # of the reference, timed again beside each candidate's windows


def measure(checker: SandboxProcess, flusher: SandboxProcess, policy: VerifyPolicy, facts: dict,
            device: Device) -> tuple[ReferenceTiming, list[list[int]]]:
    """The reference's timing, and the seeds of its timed windows (whose expected outputs the
    checker kept, where memory allowed, for the candidate timed on the same seeds)."""
    timeout = policy.call_timeout_s
    flusher.request({"op": "warm", "seconds": WARM_SECONDS}, timeout=timeout)
    try:
        inputs = OwnInputs(checker)
        warm = warm_up(checker, flusher, inputs, new_seeds(policy.warmup_calls), {"op": "run"}, timeout, False,
                       device.kind)
        timed_plan = plan(min(warm), policy.timing_budget_s, policy.min_timed_calls, policy.max_timed_calls,
                          device.max_window)
        out_bytes = sum(meta["nbytes"] for meta in facts["outputs"])
        keep = timed_plan.window * timed_plan.windows * out_bytes <= policy.expected_memory_bytes
        timed_seeds = timed_plan.seeds(new_seeds)
        since = time.time()  # after the warm-up: see neighbours.beside
        samples = time_reference(checker, flusher, inputs, timed_seeds, "eager", keep, timeout, device.kind)
        compile_stats = None
        if policy.compile_baseline:
            warm_up(checker, flusher, inputs, new_seeds(policy.warmup_calls), {"op": "run", "model": "compile"},
                    policy.load_timeout_s, False, device.kind)
            compile_stats = time_reference(checker, flusher, inputs, timed_plan.seeds(new_seeds), "compile", False,
                                           timeout, device.kind).stats()
    except SubjectError as err:
        raise EvaluatorError(f"timing the reference failed: {err}") from None
    beside = neighbours.beside(device, since, [checker.pid, flusher.pid], whole_span=True)
    return ReferenceTiming(samples=samples, stats=samples.stats(), compile_stats=compile_stats, plan=timed_plan,
                           measured_at=time.monotonic(), neighbours=beside), timed_seeds


def recalibrate(checker: SandboxProcess, flusher: SandboxProcess, reference: ReferenceTiming,
                timeout: float, device_kind: str) -> Calibration:
    """A few of the reference's windows again, beside a candidate's: what the protocol costs is
    the least the reference showed, then or now. A candidate's code cannot lower it (it can only
    slow the reference), and a reference timed while the host was busy (or reused from such a
    timing) no longer lets a timer hide that much."""
    windows = reference.plan.seeds(new_seeds)[:RECALIBRATION_WINDOWS]
    try:
        again = time_reference(checker, flusher, OwnInputs(checker), windows, "eager", False, timeout, device_kind)
    except SubjectError as err:
        raise EvaluatorError(f"timing the reference again failed: {err}") from None
    return calibration(reference.samples, again)
