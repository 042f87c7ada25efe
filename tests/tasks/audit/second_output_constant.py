"""Audit: two outputs; the first is honest, the second is the constant 2."""

import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, x: torch.Tensor):
        return torch.tanh(x), x * 0 + 2


def get_inputs():
    return [torch.randn(64, 256)]


def get_init_inputs():
    return []
