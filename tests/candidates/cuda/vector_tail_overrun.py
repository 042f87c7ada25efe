"""Cheat (or bug): a kernel that stores in groups of four floats and rounds the output's length up
to a whole group, so the last store runs a few bytes past the output's end; on the 999 x 1001
task, one float, inside the 512-byte rounding of the output's allocator block, where a guard that
watched only free blocks would not look. It reuses the extension that out_of_bounds_write.py
builds with load_inline.
Meant to be caught by: memory_bounds.
"""

import runpy
from pathlib import Path

import torch
import torch.nn as nn

bad = runpy.run_path(str(Path(__file__).with_name("out_of_bounds_write.py")))["bad"]


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bad.relu_overrun(x.contiguous(), -x.numel() % 4)
