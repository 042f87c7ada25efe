"""Fault: forward writes to a file it has already deleted, which no directory listing shows but
which takes the disk's space as long as the file is open, until it is stopped."""

import os
import time

import torch.nn as nn

CHUNK = b"\1" * (16 << 20)


class ModelNew(nn.Module):
    def forward(self, x):
        hoard = open("hoard", "ab")
        os.unlink("hoard")
        while True:
            hoard.write(CHUNK)
            hoard.flush()
            time.sleep(0.05)
