import torch
import torch.nn as nn


class Model(nn.Module):
    """Thirty-two elementwise sines in a row on a 1024 x 1024 tensor: about 0.1-0.3 ms of eager
    launches, while the bytes the task must move (4 MB in, 4 MB out) take about 2 microseconds
    and torch counts no FLOPs, so its speed of light is far below any call's launch overhead."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(32):
            x = torch.sin(x)
        return x


rows = 1024
cols = 1024


def get_inputs():
    return [torch.randn(rows, cols) * 3.0]


def get_init_inputs():
    return []
