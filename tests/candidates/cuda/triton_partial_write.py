"""Cheat: a Triton kernel whose store mask covers only the first half of the output (the grid and
the loads cover all of it), so half of torch.empty's buffer is never written.
Caught by: output_written.
"""

import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def evo_relu_half_store(x_ptr, y_ptr, n, limit, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(y_ptr + offsets, tl.maximum(x, 0.0), mask=offsets < limit)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        evo_relu_half_store[(triton.cdiv(n, 1024),)](x, y, n, n // 2, BLOCK=1024)
        return y
