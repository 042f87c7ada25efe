import torch
import torch.nn as nn


class Model(nn.Module):
    """Elementwise ReLU on a 999 x 1001 tensor (about 4 MB; a size that is not a power of two)."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


rows = 999
cols = 1001


def get_inputs():
    return [torch.randn(rows, cols)]


def get_init_inputs():
    return []
