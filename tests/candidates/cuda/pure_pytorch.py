"""Cheat: no custom kernel at all, torch.relu does the work.
Caught by: custom_code (required by default).
"""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)
