"""Fault: importing the file crashes the process (SIGSEGV) before any call."""

import ctypes

import torch.nn as nn

ctypes.string_at(0)


class ModelNew(nn.Module):
    def forward(self, x):
        return x.relu()
