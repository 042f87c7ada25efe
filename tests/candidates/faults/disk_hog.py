"""Fault: forward writes to a file in its directory until it is stopped."""

import time

import torch.nn as nn

CHUNK = b"\1" * (16 << 20)


class ModelNew(nn.Module):
    def forward(self, x):
        with open("hoard", "ab") as hoard:
            while True:
                hoard.write(CHUNK)
                hoard.flush()
                time.sleep(0.05)
