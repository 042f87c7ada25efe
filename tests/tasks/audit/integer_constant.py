"""Audit: argmax over a dimension of size 1: always 0 (an integer output)."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=1)


def get_inputs():
    return [torch.randn(64, 1, 256)]


def get_init_inputs():
    return []
