"""Fault: forward sleeps forever in Python."""

import time

import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, x):
        while True:
            time.sleep(3600)
