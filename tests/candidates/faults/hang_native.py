"""Fault: forward blocks forever inside native code (libc pause() through ctypes, GIL released)."""

import ctypes

import torch.nn as nn

libc = ctypes.CDLL(None)


class ModelNew(nn.Module):
    def forward(self, x):
        while True:
            libc.pause()
