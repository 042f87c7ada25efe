import torch
import torch.nn as nn


class Model(nn.Module):
    """Natural log of values near one (log-likelihood ratios): the outputs are about 1e-3, so an
    approximation with a small absolute error (such as __logf) has a large relative error."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


rows = 2048
cols = 2048


def get_inputs():
    return [1.0 + 1e-3 * torch.randn(rows, cols)]


def get_init_inputs():
    return []
