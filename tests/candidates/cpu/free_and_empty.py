"""Cheat: free the reference output and return empty (AI CUDA Engineer, 2025): in a harness
that runs the reference in the same process, the freed reference output is the block the next
torch.empty of that size gets. This candidate drops what it can (gc.collect) and returns
torch.empty of the output's size without computing anything. It loads no extension (it is
rejected before its speed or its code would matter).
Caught by: output_written (the reference never ran in this process; freed memory is NaN), or by
values when the collection frees a block of an earlier call that the allocator prefers to the
runner's NaN blocks (about one run in four on the CPU: the poison is not exclusive).
"""

import gc

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gc.collect()
        return torch.empty(x.shape, dtype=x.dtype)
