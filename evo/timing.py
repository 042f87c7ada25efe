"""The timing protocol, driven from the parent, and the statistics of its samples.

Calls are timed in windows of K. The checker makes K fresh input sets from seeds only it
learns, and the subject is told where they will be (evo/handover.py); the subject is held still,
the checker copies the inputs there, and the trusted flusher evicts the device cache, so every
call reads inputs that nothing has touched since; the parent lets the subject go and tells it to
run; the subject synchronizes the whole device, runs the calls back to back with device events
around each, synchronizes the whole device again, and replies with its times and a checksum of
all outputs as they were then. The parent's clock runs from the handing over of the inputs (on a
CPU, from the subject's release) to that reply. The outputs follow and the checker judges every
one of them.

The reference is timed by the same protocol, so the time it leaves outside its event windows
calibrates the candidate's: a candidate whose timer under-reports, or whose work runs after
its clock stops (on a side stream, in a thread), leaves more time unaccounted. No host
synchronize sits between the calls of a window, so the protocol's own jitter (the message
round trip, the switch of GPU context after the flush) is paid once per window, not per call.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evo.sandbox_runner import SandboxProcess
from evo.verdict import Check, TimingStats

# A window should hold about this much of the reference's work, so that the protocol's own
# jitter is small against it; but never more than MAX_WINDOW calls.
WINDOW_TARGET_MS = 2.0
MAX_WINDOW = 32
# Unaccounted time per window may exceed the reference's by (milliseconds, fraction of the
# reference's) before the candidate's timer is disbelieved: this bounds what a tampered timer
# hides. On an H200, honest candidates landed within 0.13 ms of the reference per 32-call
# window with about 2.2 ms unaccounted; on a loaded 2-core CPU, within 0.3 ms per call.
OVERHEAD_SLACK = {"cuda": (0.1, 0.15), "cpu": (0.4, 0.25)}
# Beyond the slack, unaccounted time is charged to the candidate (a loaded host makes some
# honestly); it is rejected as tampering when it exceeds the slack by more than all the work
# its timer saw in the window, or by this many milliseconds if that is more. On a GPU, honest
# candidates on a loaded H200 host went up to 0.25 ms past the slack, timer cheats 5 ms and more.
TAMPERING_MS = {"cuda": 1.0, "cpu": 0.2}
WARM_SECONDS = 0.2  # of device work before each timing phase, so clocks are up for both subjects
# Whether the parent's clock for a window starts before its inputs are handed over, covering the
# hold, the copy and the flush: on a GPU, a held subject's device work runs on (a kernel left
# waiting for the inputs to land would compute as they do); on a CPU, a held subject does no work,
# and a flush takes milliseconds whose jitter would only blur the run's.
CLOCK_COVERS_HANDOVER = {"cuda": True, "cpu": False}
# A call whose kernels keep the device busy for less than this share of it is paced by the host
# launching them, and a host's pace moves between verifications far more than a device's.
HOST_PACED_SHARE = 0.5


class SubjectError(Exception):
    """The subject's code raised during a timed call; the message says what."""


@dataclass
class Samples:
    event_ms: list[float] = field(default_factory=list)  # each call, as the subject's timer reported it
    window_wall_ms: list[float] = field(default_factory=list)  # each window's run, as the parent's clock saw it
    window_event_ms: list[float] = field(default_factory=list)  # each window, the sum of its calls' times
    window_prepare_ms: list[float] = field(default_factory=list)  # each window's preparation, before its clock

    def add_window(self, elapsed: list[float], wall_ms: float, prepare_ms: float) -> None:
        self.event_ms.extend(elapsed)
        self.window_wall_ms.append(wall_ms)
        self.window_event_ms.append(sum(elapsed))
        self.window_prepare_ms.append(prepare_ms)

    def dump(self, label: str) -> None:
        """Per-window figures, for studying the protocol's jitter (EVO_TIMING_DUMP=FILE)."""
        path = os.environ.get("EVO_TIMING_DUMP")
        if path:
            with open(path, "a") as sink:
                sink.write(json.dumps({"subject": label, "wall_ms": self.window_wall_ms,
                                       "event_ms": self.window_event_ms, "prepare_ms": self.window_prepare_ms,
                                       "calls": self.event_ms}) + "\n")

    def window_call_ms(self) -> list[float]:
        """Each window's mean call: its calls' times summed, over their number. A window's calls
        run back to back on input sets that all exist when it starts, so one call could do the
        work of the others (the whole window's in its first); only the window's total is theirs."""
        per_window = len(self.event_ms) // len(self.window_event_ms)
        return [total / per_window for total in self.window_event_ms]

    def stats(self, charged_ms: float = 0.0) -> TimingStats:
        ordered = sorted(ms + charged_ms for ms in self.window_call_ms())
        quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
        calls = len(self.event_ms)
        return TimingStats(median_ms=statistics.median(ordered), charged_ms=charged_ms, iqr_ms=quartiles[2] - quartiles[0],
                           min_ms=ordered[0], mean_ms=statistics.fmean(ordered), calls=calls,
                           wall_median_ms=statistics.median(w / (calls / len(self.window_wall_ms))
                                                            for w in self.window_wall_ms))

    def overhead_ms(self) -> float:
        """Time per window's run that the parent saw outside the subject's event windows: the
        lower quartile, since an under-reporting timer shifts every window while the protocol's
        own jitter (a context switch, a page fault) only adds outliers."""
        return lower_quartile([w - e for w, e in zip(self.window_wall_ms, self.window_event_ms)])


@dataclass(frozen=True)
class Plan:
    """How many timed calls, in windows of how many: decided from the reference alone."""

    window: int
    windows: int

    def seeds(self, new_seeds: Callable[[int], list[int]]) -> list[list[int]]:
        return [new_seeds(self.window) for _ in range(self.windows)]


def plan(reference_ms: float, budget_s: float, lowest: int, highest: int, max_window: int = MAX_WINDOW) -> Plan:
    calls = max(lowest, min(highest, int(budget_s * 1e3 / max(reference_ms, 1e-4))))
    window = max(1, min(max_window, calls, math.ceil(WINDOW_TARGET_MS / max(reference_ms, 1e-4))))
    return Plan(window=window, windows=max(3, math.ceil(calls / window)))


@dataclass(frozen=True)
class Calibration:
    """What the reference's windows show of the protocol itself: the time per window its timer
    leaves out. The least over its timings: a reference slowed by a busy host (one timed while
    other processes started on the device) would otherwise widen what a candidate may hide, for
    as long as that timing is reused."""

    overhead_ms: float


def calibration(*timings: Samples) -> Calibration:
    return Calibration(overhead_ms=min(samples.overhead_ms() for samples in timings))


def window_allocations(task_facts: dict, window: int) -> list[int]:
    """The bytes of each device allocation a candidate's window takes, in order: two NaN-filled
    blocks per output of each call (harness.poison_allocator); its inputs are in the pool."""
    return [meta["nbytes"] for meta in task_facts["outputs"] for _ in range(2)] * window


def lower_quartile(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 4]


def expect(reply: dict, doing: str) -> dict:
    if "error" in reply:
        raise SubjectError(f"{doing}: {reply['error']}")
    return reply


def timed_window(subject: SandboxProcess, flusher: SandboxProcess, inputs, seeds: list[int], run_message: dict,
                 timeout: float, device_kind: str) -> tuple[dict, float, float]:
    """One window under the protocol: the subject's reply, and the parent's milliseconds for the
    run and for the preparation before it. `inputs` hands the window's inputs over
    (evo.handover): prepared before the clock, published into the subject's reach after it started.

    The subject is held still while its inputs are copied and the flusher works, so no thread of
    it computes there. Its device is not held: on a GPU, work it left queued runs on and delays
    the flush, so there the clock covers all of it."""
    before = time.perf_counter()
    inputs.prepare(subject, seeds, timeout)
    prepare_ms = (time.perf_counter() - before) * 1e3
    started = time.perf_counter()
    try:
        inputs.publish(subject, timeout)
        flusher.request({"op": "flush"}, timeout=timeout)
        # The clock starts before the subject is let go: were this process preempted between the
        # two, a clock started after could miss part of the window and make its timer look slow.
        if not CLOCK_COVERS_HANDOVER[device_kind]:
            started = time.perf_counter()
    finally:
        subject.release()
    subject.send(run_message, timeout=timeout * len(seeds))
    reply, _ = subject.receive(timeout * len(seeds))
    elapsed = expect(reply, "the call").get("elapsed_ms")
    if not (isinstance(elapsed, list) and len(elapsed) == len(seeds)
            and all(isinstance(ms, (int, float)) and 0 <= ms < math.inf for ms in elapsed)):
        raise SubjectError(f"the subject's timer reported {str(elapsed)[:80]} for a window of {len(seeds)} calls")
    return reply, (subject.last_arrival - started) * 1e3, prepare_ms


def time_reference(checker: SandboxProcess, flusher: SandboxProcess, inputs, windows: list[list[int]], model: str,
                   keep_expected: bool, timeout: float, device_kind: str) -> Samples:
    samples = Samples()
    for seeds in windows:
        reply, wall, prepare = timed_window(checker, flusher, inputs, seeds, {"op": "run", "model": model,
                                                                              "keep_expected": keep_expected},
                                            timeout, device_kind)
        samples.add_window(reply["elapsed_ms"], wall, prepare)
    return samples


def time_candidate(candidate: SandboxProcess, checker: SandboxProcess, flusher: SandboxProcess, inputs,
                   windows: list[list[int]], exchange_bytes: int, timeout: float, device_kind: str,
                   judge: Callable[[list[dict]], None], judge_details: Callable[[dict, dict], None]) -> Samples:
    """Time the candidate on the given windows of seeds. What the candidate says of its outputs
    goes to `judge_details`; the outputs themselves go to the checker through the exchange
    buffer, and the checker's checks go to `judge`. Both raise to stop at the first failure."""
    samples = Samples()
    run = {"op": "run", "send_outputs": True, "exchange_bytes": exchange_bytes}
    for seeds in windows:
        reply, wall, prepare = timed_window(candidate, flusher, inputs, seeds, run, timeout, device_kind)
        details, _ = candidate.receive(timeout)
        expect(details, "describing the outputs")
        samples.add_window(reply["elapsed_ms"], wall, prepare)
        judge_details(details, reply)
        verdict, _ = checker.request({"op": "compare_timed", "seeds": seeds, **exchanged(details, reply, exchange_bytes)},
                                     timeout=timeout)
        judge(expect(verdict, "comparing timed outputs")["checks"])
    return samples


def exchanged(details: dict, reply: dict, exchange_bytes: int) -> dict:
    """What the checker needs to read a call's outputs from the exchange buffer (of
    `exchange_bytes` in use) and bind them to the checksum taken when the call ended."""
    return {"tensors": details.get("tensors"), "outputs": details["outputs"], "exchanged": details.get("exchanged") is True,
            "checksum": reply.get("checksum"), "exchange_bytes": exchange_bytes}


def warm_up(subject: SandboxProcess, flusher: SandboxProcess, inputs, seeds: list[int], run_message: dict,
            timeout: float, drain_details: bool, device_kind: str) -> list[float]:
    """Calls whose times are thrown away (module loading, JIT compilation, allocator growth)."""
    times = []
    for seed in seeds:
        reply, _, _ = timed_window(subject, flusher, inputs, [seed], run_message, timeout, device_kind)
        if drain_details:
            expect(subject.receive(timeout)[0], "describing the outputs")
        times.extend(reply["elapsed_ms"])
    return times


def timer_consistency(reference: Calibration, candidate: Samples, device_kind: str) -> tuple[Check, float]:
    """Per window, the time outside the event windows must not exceed the reference's: more
    means the timer under-reported, or work ran after it stopped. Returns the check and the
    milliseconds per call charged to the candidate: what it left unaccounted beyond the slack,
    so that hiding work never pays, while a noisy host costs an honest candidate a little speed
    instead of its verdict."""
    ref_overhead, cand_overhead = reference.overhead_ms, candidate.overhead_ms()
    slack_ms, slack_fraction = OVERHEAD_SLACK[device_kind]
    slack = slack_ms + slack_fraction * ref_overhead
    calls = len(candidate.event_ms) // len(candidate.window_wall_ms)
    beyond = cand_overhead - ref_overhead - slack
    median_event = statistics.median(candidate.window_call_ms())
    if beyond > max(TAMPERING_MS[device_kind], statistics.median(candidate.window_event_ms)):
        return Check(name="timer_consistency", passed=False, detail=(
            f"the candidate's timer reports {median_event:.4f} ms per call, but the parent's clock saw "
            f"{cand_overhead - ref_overhead:.4f} ms more per window of {calls} calls outside the timer than the "
            f"reference leaves under the same protocol (allowed {slack:.4f} ms): the timer was tampered with or "
            "work ran outside it")), 0.0
    charged = max(0.0, beyond) / calls
    if charged:
        return Check(name="timer_consistency", passed=True, detail=(
            f"the parent's clock saw {cand_overhead - ref_overhead:.4f} ms more per window of {calls} calls outside "
            f"the timer than the reference leaves (allowed {slack:.4f} ms); the excess, {charged:.4f} ms per call, "
            "is added to the candidate's time")), charged
    return Check(name="timer_consistency", passed=True, detail=(
        f"event times agree with the parent's wall clock ({cand_overhead:.4f} ms per window outside the timer; "
        f"reference {ref_overhead:.4f} ms)")), 0.0


def failed_protocol_checks(reference: Calibration, candidate: Samples, device_kind: str) -> list[str]:
    """The names of the timing protocol's own checks that a candidate's timing fails."""
    check = timer_consistency(reference, candidate, device_kind)[0]
    return [] if check.passed else [check.name]


def host_pace_warning(median_ms: float, kernels: dict) -> str | None:
    """A warning when the candidate's timed calls were mostly its host launching kernels, from
    the kernels' device time in its one profiled call (`judgement.classify_kernels`)."""
    device_us = sum(kernels["own_kernels_us"].values()) + sum(kernels["library_kernels_us"].values())
    median_us = median_ms * 1e3
    if device_us >= HOST_PACED_SHARE * median_us:
        return None
    return (f"the candidate's kernels kept the GPU busy for {device_us:.1f} µs of its {median_us:.1f} µs per call: "
            "the rest is the host launching them, whose pace moves between verifications far more than the GPU's, "
            "and this speedup with it; compare the medians of several verifications, or time a larger size")
