"""The input pool (sandbox/pool.py): what the checker lays out and copies is what a candidate's
process reads, strides and storage offsets included, each input with a storage of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from evo.sandbox import pool

SANDBOX = pool.__file__.rsplit("/", 1)[0]


def awkward_window(device: str) -> list[list[torch.Tensor]]:
    """Two calls' inputs: a transposed view, a slice that starts mid-storage, odd byte counts."""
    base = torch.arange(35, dtype=torch.float32, device=device).reshape(5, 7)
    return [[base.t(), torch.arange(10, dtype=torch.int64, device=device)[3:],
             torch.tensor([True, False, True], device=device)],
            [base * 2, torch.arange(3, dtype=torch.int64, device=device), torch.ones(1, dtype=torch.float16,
                                                                                        device=device)]]


def handed_over(device: str, start: int = 100):
    window = awkward_window(device)
    specs, end = pool.layout(window, start)
    made = pool.Pool.create(end, device)
    made.bytes[start:end].copy_(pool.gather(window, specs, start, end))
    return window, specs, made


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_input_read_from_the_pool_is_the_input_that_was_laid_out(device, gpu_alone_if_gpu):
    window, specs, made = handed_over(device)
    reader = pool.Pool(os.dup(made.fd), made.nbytes, device)  # as a candidate's process maps it
    for inputs, call in zip(window, specs):
        for tensor, spec in zip(inputs, call):
            assert spec["offset"] % pool.ALIGNMENT == 0
            read = reader.tensor(spec)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape
            assert read.stride() == tensor.stride() and read.storage_offset() == tensor.storage_offset()
            assert torch.equal(read, tensor)
            # a storage of its own: an output aliasing one input is not taken for aliasing all of them
            assert read.untyped_storage().nbytes() == tensor.untyped_storage().nbytes()


def test_layouts_leave_a_gap_after_each_input_and_stay_within_the_room_made_for_a_call():
    """A write just past an input lands in a gap of the slot, whose bytes the checker reads back."""
    window = awkward_window("cpu")
    specs, end = pool.layout(window, 7)
    spans = sorted((spec["offset"], spec["offset"] + spec["storage_bytes"]) for call in specs for spec in call)
    assert all(second[0] - first[1] >= pool.GAP for first, second in zip(spans, spans[1:]))
    assert spans[0][0] >= 7 and end - spans[-1][1] == pool.GAP
    per_call = max(pool.layout([inputs], 0)[1] for inputs in window) + pool.ALIGNMENT
    assert end - 7 <= len(window) * per_call


def test_a_pool_handed_to_another_process_shows_what_was_copied_there_later():
    """The reader maps the pool before anything is copied in (as a candidate's process does
    before its code is imported) and sees the bytes the checker copies afterwards."""
    made = pool.Pool.create(4096, "cpu")
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import pool\n"
              "reader = pool.Pool(int(sys.argv[2]), 4096, 'cpu'); print(int(reader.bytes.sum()), flush=True)\n"
              "sys.stdin.readline(); print(int(reader.bytes.sum()), flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", script, SANDBOX, str(made.fd)], pass_fds=[made.fd],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "0"
        made.bytes[:16].fill_(3)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "48"
    finally:
        child.kill()
        child.wait()
