"""Fault: forward raises."""

import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        raise ValueError("evo-fault: forward refuses to work")
