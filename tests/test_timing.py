"""The timing protocol's judgements on samples: what the reference's windows allow a candidate."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from evo.sandbox import harness
from evo.sandbox_runner import SandboxProcess
from evo.timing import Samples, calibration, host_pace_warning, timer_consistency, window_allocations

CALLS = 8


def windows(event_ms: float, outside_ms: float, prepare_ms: float, count: int = 6) -> Samples:
    """Windows of CALLS calls of `event_ms` each, with `outside_ms` per window outside the timer."""
    samples = Samples()
    for _ in range(count):
        samples.add_window([event_ms] * CALLS, event_ms * CALLS + outside_ms, prepare_ms)
    return samples


QUIET_REFERENCE = windows(0.5, outside_ms=1.0, prepare_ms=2.0)
BUSY_REFERENCE = windows(0.5, outside_ms=6.0, prepare_ms=12.0)  # the host was busy while it was timed
HIDING_TIMER = windows(0.05, outside_ms=1.0 + 0.45 * CALLS, prepare_ms=2.0)  # reports a tenth of 0.5 ms


def test_the_calibration_is_the_least_of_the_reference_timings():
    protocol = calibration(BUSY_REFERENCE, QUIET_REFERENCE)
    assert protocol.overhead_ms == QUIET_REFERENCE.overhead_ms() == 1.0
    assert calibration(BUSY_REFERENCE).overhead_ms == 6.0


def test_a_busy_reference_alone_would_let_a_hiding_timer_through():
    check, _ = timer_consistency(calibration(BUSY_REFERENCE), HIDING_TIMER, "cuda")
    assert check.passed


def test_a_quiet_timing_of_the_reference_beside_the_busy_one_catches_the_timer():
    check, _ = timer_consistency(calibration(BUSY_REFERENCE, QUIET_REFERENCE), HIDING_TIMER, "cuda")
    assert not check.passed and "tampered" in check.detail


def test_an_honest_candidate_beside_a_quiet_reference_passes():
    honest = windows(0.2, outside_ms=1.05, prepare_ms=2.1)
    protocol = calibration(BUSY_REFERENCE, QUIET_REFERENCE)
    assert timer_consistency(protocol, honest, "cuda")[0].passed


def test_work_moved_between_the_calls_of_a_window_moves_no_time_out_of_it():
    """A window's calls run back to back on input sets that all exist when it starts: a first call
    that does the whole window's work, and later calls that only spin, take the honest window's
    total, and that total over its calls is what each call is reported to take."""
    honest, ahead = Samples(), Samples()
    for _ in range(5):
        honest.add_window([0.2] * CALLS, 0.2 * CALLS + 1.0, 0.5)
        ahead.add_window([0.2 * CALLS - 0.01 * (CALLS - 1)] + [0.01] * (CALLS - 1), 0.2 * CALLS + 1.0, 0.5)
    assert ahead.stats().median_ms == pytest.approx(honest.stats().median_ms) == pytest.approx(0.2)
    assert statistics.median(ahead.event_ms) == 0.01  # what the median of its calls would have said
    assert ahead.stats().calls == 5 * CALLS and ahead.stats(charged_ms=0.05).median_ms == pytest.approx(0.25)


def test_the_timing_dump_has_each_windows_figures_preparation_included(tmp_path, monkeypatch):
    dump = tmp_path / "timing.jsonl"
    monkeypatch.setenv("EVO_TIMING_DUMP", str(dump))
    samples = Samples()
    samples.add_window([0.5, 0.7], 3.0, 2.5)
    samples.add_window([0.6, 0.6], 2.0, 4.0)
    samples.dump("candidate")
    samples.dump("again")
    first, second = (json.loads(line) for line in dump.read_text().splitlines())
    assert first == {"subject": "candidate", "wall_ms": [3.0, 2.0], "event_ms": [1.2, 1.2],
                     "prepare_ms": [2.5, 4.0], "calls": [0.5, 0.7, 0.6, 0.6]}
    assert second["subject"] == "again"


def test_a_call_mostly_spent_launching_is_flagged_as_host_paced():
    def kernels(own: list[float], library: list[float]) -> dict:
        return {"own_kernels_us": {f"k{i}": us for i, us in enumerate(own)},
                "library_kernels_us": {f"lib{i}": us for i, us in enumerate(library)}}

    flagged = host_pace_warning(0.017, kernels([3.0], [1.5]))
    assert flagged is not None and "4.5 µs of its 17.0 µs per call" in flagged
    assert host_pace_warning(0.017, kernels([], [])) is not None  # nothing ran on the GPU at all
    # the library's kernels count as device time as the candidate's own do
    assert host_pace_warning(0.017, kernels([4.0], [5.0])) is None
    assert host_pace_warning(0.880, kernels([879.0], [])) is None


def test_a_window_reservation_is_what_making_the_window_allocates_in_order(monkeypatch):
    """TaskSession.reserve_window has a candidate's process take blocks of these sizes, so that
    preparing a window finds each of its allocations cached, and the NaN-filled blocks are still
    the ones the outputs land on: harness.poison_allocator's blocks (the inputs are in the pool)."""
    window, output_sizes = 3, [40, 12]
    poisoned, empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda nbytes, **kwargs: poisoned.append(nbytes) or empty(nbytes, **kwargs))
    harness.poison_allocator("cpu", output_sizes * window)
    facts = {"inputs": [{"nbytes": 60}, {"nbytes": 56}], "outputs": [{"nbytes": nbytes} for nbytes in output_sizes]}
    assert window_allocations(facts, window) == poisoned


def output_shapes_a_window_may_hold(device: str) -> list[torch.Tensor]:
    """Whole-word tensors of every element size, and ones that are not: odd byte counts, a
    transposed view, a view starting mid-word."""
    base = torch.arange(4099, dtype=torch.int64, device=device)
    return [base.float().reshape(1, -1) * 1.5, base.double(), base.half()[:4098], base.to(torch.uint8)[:4096],
            base.bool()[:4096], base.half()[:4097], base.to(torch.uint8)[:4099], base.float()[:4096].reshape(64, 64).t(),
            base.half()[1:4097], base.float()[0:0], torch.tensor(3.25, device=device)]


def test_tensors_in_whole_words_are_read_as_their_own_bytes():
    """The checksum's in-place reading of a tensor as 32-bit words must be its bytes, exactly, and
    must refuse what is not a contiguous run of aligned whole words (the byte path takes those)."""
    for tensor in output_shapes_a_window_may_hold("cpu"):
        words = harness._as_words(tensor)
        raw = tensor.contiguous().numpy().tobytes() if tensor.numel() else b""
        if not tensor.is_contiguous() or len(raw) % 4 or tensor.storage_offset() * tensor.element_size() % 4:
            assert words is None, (tensor.dtype, tensor.shape)
        else:
            assert words is not None and words.numpy().tobytes() == raw, (tensor.dtype, tensor.shape)


@pytest.mark.gpu
def test_a_checksum_on_the_gpu_is_the_checksum_of_the_same_bytes_on_the_host(gpu_alone_if_gpu):
    """The candidate sums its outputs where they live and the checker sums what it received, by
    different paths for some layouts: the two must agree on the same bytes and differ on one
    changed word."""
    on_gpu = output_shapes_a_window_may_hold("cuda")
    on_host = [tensor.cpu() for tensor in on_gpu]
    assert harness.checksum(on_gpu) == harness.checksum(on_host)
    for index in range(len(on_gpu)):
        assert harness.checksum([on_gpu[index]]) == harness.checksum([on_host[index]]), on_gpu[index].dtype
    changed = [tensor.clone() for tensor in on_gpu]
    changed[0][0, 17] += 1
    assert harness.checksum(changed) != harness.checksum(on_gpu)


CHILD_COUNTING = r"""
import os, sys, threading, time
def count(path):
    n = 0
    while True:
        n += 1
        with open(path + ".new", "w") as sink:
            sink.write(str(n))
        os.replace(path + ".new", path)  # whole, even where a stop lands between the two
        time.sleep(0.001)
if os.fork() == 0:  # a process under it, counting too
    count(sys.argv[2])
threading.Thread(target=count, args=(sys.argv[1],), daemon=True).start()
time.sleep(60)
"""


def test_a_held_sandbox_does_nothing_until_it_is_released(tmp_path):
    """The subject is held while the flusher works: no thread of it, nor of a process it forked,
    may run there."""
    counters = [tmp_path / "thread", tmp_path / "forked"]
    child = subprocess.Popen([sys.executable, "-c", CHILD_COUNTING, *map(str, counters)], start_new_session=True)
    process = SandboxProcess.__new__(SandboxProcess)  # only the process handle is needed to hold it
    process.proc, process.held = child, []

    def counts() -> list[int]:
        return [int(path.read_text() or 0) if path.exists() else 0 for path in counters]

    try:
        deadline = time.monotonic() + 10
        while min(counts()) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.hold()
        time.sleep(0.05)  # a write under way when the signal came may still land
        held = counts()
        time.sleep(0.3)
        assert counts() == held and min(held) >= 5
        process.release()
        time.sleep(0.3)
        assert all(after > before for after, before in zip(counts(), held)), (counts(), held)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
