"""Honest: ReLU in Triton (compiled in the candidate process at the first call). Must be verified,
and its kernel must be seen as the candidate's own code.
"""

import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def evo_relu_triton(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(y_ptr + offsets, tl.maximum(x, 0.0), mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        evo_relu_triton[(triton.cdiv(n, 1024),)](x, y, n, BLOCK=1024)
        return y
