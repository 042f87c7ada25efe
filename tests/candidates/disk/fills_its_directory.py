"""Fault: fills the disk with a file in its own directory as it is imported, then fails on the
full disk. Its directory is removed when its processes end, so the disk has room again: the
failure is the candidate's (rejected by load), not the machine's."""

import os

import torch.nn as nn

CHUNK = b"\0" * (1 << 20)

with open(os.path.join(os.getcwd(), "hog"), "wb") as hog:
    while True:
        hog.write(CHUNK)
        hog.flush()


class ModelNew(nn.Module):
    def forward(self, x):
        return x.relu()
