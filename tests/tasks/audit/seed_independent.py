"""Audit: ignores its input and returns (a copy of) a fixed parameter: the same for every input seed."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * 1.0


def get_inputs():
    return [torch.randn(64, 256)]


def get_init_inputs():
    return [32, 32]
