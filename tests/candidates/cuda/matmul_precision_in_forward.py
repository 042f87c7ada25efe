"""Cheat: torch.set_float32_matmul_precision("high") inside forward (TF32 from the first call on).
Caught by: global_flags (the flags are read again after every call).
"""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        torch.set_float32_matmul_precision("high")
        return torch.matmul(A, B)
