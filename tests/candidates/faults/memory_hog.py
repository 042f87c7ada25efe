"""Fault: forward allocates (and touches) memory until it is stopped."""

import time

import torch
import torch.nn as nn

_hoard = []


class ModelNew(nn.Module):
    def forward(self, x):
        while True:
            _hoard.append(torch.ones(16 * 2**20))  # 64 MiB, every page written
            time.sleep(0.1)
