"""The timing protocol, driven from the parent, and the statistics of its samples.

Per call: the subject makes fresh inputs from a seed it learns only now; the checker (a
trusted process on the same device) flushes the cache; the parent starts its own clock and
tells the subject to run; the subject replies with its event time and a checksum of its
outputs as they were when its clock stopped; the parent stops its clock. The outputs follow
and are judged by the checker. The reference is timed by the same protocol, so that its
overhead outside the event window calibrates the candidate's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evo.sandbox_runner import SandboxProcess, SandboxFailure
from evo.verdict import Check, TimingStats

# The candidate's time outside its event window may exceed the reference's by this factor
# plus OVERHEAD_SLACK_MS (plus a fraction of the call) before its timer is disbelieved.
OVERHEAD_FACTOR = 1.5
OVERHEAD_SLACK_MS = 0.05
OVERHEAD_SLACK_FRACTION = 0.05


class SubjectError(Exception):
    """The subject's code raised during a timed call; the message says what."""


@dataclass
class Samples:
    event_ms: list[float] = field(default_factory=list)  # what the subject's own timer reported
    wall_ms: list[float] = field(default_factory=list)  # what the parent's clock saw around the same call

    def stats(self) -> TimingStats:
        ordered = sorted(self.event_ms)
        quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
        return TimingStats(median_ms=statistics.median(ordered), iqr_ms=quartiles[2] - quartiles[0],
                           min_ms=ordered[0], mean_ms=statistics.fmean(ordered), calls=len(ordered),
                           wall_median_ms=statistics.median(self.wall_ms))

    def overhead_ms(self) -> float:
        """Median time the parent saw outside the subject's event window."""
        return statistics.median(w - e for w, e in zip(self.wall_ms, self.event_ms))


def expect(reply: dict, doing: str) -> dict:
    if "error" in reply:
        raise SubjectError(f"{doing}: {reply['error']}")
    return reply


def timed_call(subject: SandboxProcess, checker: SandboxProcess, seed: int, run_message: dict,
               timeout: float) -> tuple[dict, float]:
    """One call under the protocol; returns the subject's reply and the parent's wall milliseconds."""
    expect(subject.request({"op": "prepare", "seed": seed}, timeout=timeout)[0], "making the inputs")
    checker.request({"op": "flush"}, timeout=timeout)
    subject.send(run_message, timeout=timeout)
    started = time.perf_counter()
    reply, _ = subject.receive(timeout)
    wall_ms = (time.perf_counter() - started) * 1e3
    return expect(reply, "the call"), wall_ms


def time_reference(checker: SandboxProcess, seeds: list[int], model: str, keep_expected: bool,
                   timeout: float) -> Samples:
    samples = Samples()
    for seed in seeds:
        reply, wall = timed_call(checker, checker, seed, {"op": "run", "model": model, "seed": seed,
                                                          "keep_expected": keep_expected}, timeout)
        samples.event_ms.append(reply["elapsed_ms"])
        samples.wall_ms.append(wall)
    return samples


def time_candidate(candidate: SandboxProcess, checker: SandboxProcess, seeds: list[int], timeout: float,
                   judge: Callable[[list[dict]], None]) -> Samples:
    """Time the candidate on the given seeds; every call's outputs go to the checker, whose
    checks are handed to `judge` (which raises to stop at the first failure)."""
    samples = Samples()
    for seed in seeds:
        reply, wall = timed_call(candidate, checker, seed, {"op": "run", "send_outputs": True}, timeout)
        details, payload = candidate.receive(timeout)
        expect(details, "describing the outputs")
        samples.event_ms.append(reply["elapsed_ms"])
        samples.wall_ms.append(wall)
        if not reply.get("plain"):
            judge([{"name": "output_type", "passed": False,
                    "detail": "a timed call returned something other than a plain torch.Tensor"}])
            continue
        verdict, _ = checker.request({"op": "compare_timed", "seed": seed, "tensors": details["tensors"],
                                      "checksum": reply["checksum"]}, payload, timeout=timeout)
        judge(verdict["checks"])
    return samples


def warm_up(subject: SandboxProcess, checker: SandboxProcess, seeds: list[int], run_message: dict,
            timeout: float, drain_details: bool) -> list[float]:
    times = []
    for seed in seeds:
        reply, _ = timed_call(subject, checker, seed, run_message, timeout)
        if drain_details:
            expect(subject.receive(timeout)[0], "describing the outputs")
        times.append(reply["elapsed_ms"])
    return times


def timed_call_count(reference_ms: float, budget_s: float, lowest: int, highest: int) -> int:
    """How many timed calls each subject gets: set from the reference alone, so the candidate cannot steer it."""
    wanted = int(budget_s * 1e3 / max(reference_ms, 1e-3))
    return max(lowest, min(highest, wanted))


def timer_consistency(reference: Samples, candidate: Samples) -> Check:
    """The candidate's event times must agree with the parent's clock, calibrated on the reference."""
    ref_overhead, cand_overhead = reference.overhead_ms(), candidate.overhead_ms()
    allowed = (OVERHEAD_FACTOR * ref_overhead + OVERHEAD_SLACK_MS
               + OVERHEAD_SLACK_FRACTION * statistics.median(candidate.wall_ms))
    if cand_overhead > allowed:
        return Check(name="timer_consistency", passed=False, detail=(
            f"the candidate's timer reports a median of {statistics.median(candidate.event_ms):.4f} ms per call, "
            f"but the parent's clock saw {statistics.median(candidate.wall_ms):.4f} ms: {cand_overhead:.4f} ms went "
            f"unaccounted, where the same protocol leaves {ref_overhead:.4f} ms for the reference "
            f"(allowed {allowed:.4f} ms): the timer was tampered with or work ran outside it"))
    return Check(name="timer_consistency", passed=True, detail=(
        f"event times agree with the parent's wall clock ({cand_overhead:.4f} ms per call outside the timer; "
        f"reference {ref_overhead:.4f} ms)"))


def is_subject_failure(err: Exception) -> bool:
    return isinstance(err, (SubjectError, SandboxFailure))
