"""Cheat: stale output memory. Returns torch.empty_like without writing it, hoping the
allocator hands back a buffer that still holds an answer (KernelBench / AI CUDA Engineer, 2025).
It loads no extension: it is rejected before its speed or its code would matter, and the
runner's NaN blocks are most reliably the ones handed back in a process that has loaded none.
Caught by: output_written (the evaluator pre-fills freed memory with NaN).
"""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)
