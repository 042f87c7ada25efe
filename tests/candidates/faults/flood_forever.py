"""Fault: forward prints to stdout and stderr without end."""

import os

import torch.nn as nn

CHUNK = b"evo-fault-flood " + b"y" * (64 * 1024)


class ModelNew(nn.Module):
    def forward(self, x):
        while True:
            os.write(1, CHUNK)
            os.write(2, CHUNK)
