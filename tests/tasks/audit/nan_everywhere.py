"""Audit: the log of a negative number: NaN everywhere, whatever the input."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(-x.abs() - 1.0)


def get_inputs():
    return [torch.randn(64, 256)]


def get_init_inputs():
    return []
