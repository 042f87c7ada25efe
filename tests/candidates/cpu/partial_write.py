"""Cheat: write only part of the output (a kernel whose grid covers half the tensor); the
rest is whatever torch.empty handed back.
It loads no extension: it is rejected before its speed or its code would matter, and the
runner's NaN blocks are most reliably the ones handed back in a process that has loaded none.
Caught by: output_written (unwritten elements are NaN from the poisoned allocator).
"""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        half = x.numel() // 2
        out.view(-1)[:half] = x.reshape(-1)[:half].clamp(min=0)
        return out
