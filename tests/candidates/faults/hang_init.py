"""Fault: the constructor never returns (the import, which the build step does, is fine)."""

import time

import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        while True:
            time.sleep(3600)

    def forward(self, x):
        return x.relu()
