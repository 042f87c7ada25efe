import torch
import torch.nn as nn


class Model(nn.Module):
    """a * b + c elementwise: three inputs."""

    def __init__(self):
        super().__init__()

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a * b + c


shape = (64, 8192)


def get_inputs():
    return [torch.randn(*shape), torch.randn(*shape), torch.randn(*shape)]


def get_init_inputs():
    return []
