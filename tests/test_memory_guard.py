"""The memory guard (sandbox/memory_guard.py) and the memory_bounds check made of what it saw."""

from __future__ import annotations

import pytest
import torch

from evo.judgement import Judgement, MemoryWatch, Rejected
from evo.sandbox.memory_guard import MemoryGuard, _bytes_at, _subtract


@pytest.mark.parametrize("ranges, holes, left", [
    ([(0, 10), (20, 30)], [(5, 25)], [(0, 5), (25, 30)]),
    ([(0, 10)], [(0, 10)], []),
    ([(0, 10)], [], [(0, 10)]),
    ([(0, 10), (12, 14)], [(4, 5), (2, 3), (13, 20)], [(0, 2), (3, 4), (5, 10), (12, 13)]),
    ([(0, 100)], [(0, 50), (10, 20), (60, 60)], [(50, 100)]),  # overlapping and empty holes
])
def test_subtracting_ranges(ranges, holes, left):
    assert _subtract(ranges, holes) == left


def test_a_changed_byte_rejects_with_where_it_lies():
    judgement = Judgement()
    judgement.memory_bounds(MemoryWatch(watched_bytes=4096, changed_bytes=0), "trial 1 of 3")
    assert judgement.by_name["memory_bounds"].passed
    with pytest.raises(Rejected):
        judgement.memory_bounds(MemoryWatch(watched_bytes=4096, changed_bytes=8, first_changed_output=1,
                                            first_changed_past_end=0), "trial 2 of 3")
    check = judgement.by_name["memory_bounds"]
    assert not check.passed
    assert check.detail.startswith("trial 2 of 3: 8 bytes") and "0 bytes past the end of output 1" in check.detail


def test_the_pass_reports_the_most_memory_watched_and_nothing_is_said_without_a_watch():
    judgement = Judgement()
    judgement.memory_bounds(None, "trial 1 of 2")  # a CPU: no guard
    assert "memory_bounds" not in judgement.by_name
    judgement.memory_bounds(MemoryWatch(watched_bytes=3_000_000, changed_bytes=0), "trial 1 of 2")
    judgement.memory_bounds(MemoryWatch(watched_bytes=1_000_000, changed_bytes=0), "trial 2 of 2")
    assert "3.0 MB watched" in judgement.by_name["memory_bounds"].detail
    empty = Judgement()
    empty.memory_bounds(MemoryWatch(watched_bytes=0, changed_bytes=0, unwatched="the call made too many allocations"),
                        "trial 1 of 1")
    assert "too many allocations" in empty.by_name["memory_bounds"].detail


# ---- on a GPU, in this process ------------------------------------------------------------------

def _call_with_guard(call) -> dict:
    """Arm a guard, run `call` (which returns its outputs), synchronize, read the guard."""
    guard = MemoryGuard()
    spare = [torch.empty(n, device="cuda") for n in (1000, 50_000, 300_000)]
    del spare  # free blocks of a few sizes for the guard to watch
    guard.arm()
    outputs = call()
    torch.cuda.synchronize()
    return guard.findings(outputs)


@pytest.mark.gpu
def test_the_guard_sees_a_store_one_float_past_an_output(gpu_alone_if_gpu):
    x = torch.randn(999, 1001, device="cuda")

    def overrun():
        y = torch.relu(x)
        _bytes_at(y.data_ptr() + y.nbytes, 4).fill_(7)  # inside the block's rounding slack
        return [y]

    seen = _call_with_guard(overrun)
    assert seen["changed_bytes"] == 4, seen
    assert (seen["first_changed_output"], seen["first_changed_past_end"]) == (0, 0), seen


@pytest.mark.gpu
def test_the_guard_counts_every_byte_of_a_long_overrun_into_free_memory(gpu_alone_if_gpu):
    x = torch.randn(999, 1001, device="cuda")

    def overrun():
        y = torch.relu(x)
        _bytes_at(y.data_ptr() + y.nbytes, 262144).zero_()
        return [y]

    seen = _call_with_guard(overrun)
    assert seen["changed_bytes"] == 262144, seen


@pytest.mark.gpu
def test_the_guard_sees_nothing_in_an_honest_call_that_allocates_and_frees(gpu_alone_if_gpu):
    x = torch.randn(512, 777, device="cuda")
    w = torch.randn(777, 300, device="cuda")

    def honest():
        scratch = torch.empty(12345, device="cuda")  # freed within the call: its memory was the call's
        scratch.fill_(1.0)
        del scratch
        return [torch.softmax(x @ w, dim=1), torch.cumsum(x, dim=0)]

    seen = _call_with_guard(honest)
    assert seen["watched_bytes"] > 0 and seen["changed_bytes"] == 0, seen
