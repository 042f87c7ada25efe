"""Fault: forward forks until the kernel refuses (each child exits at once and is never reaped,
so each holds a process ID), then raises, saying how many forks it got.

Unchecked, this takes process IDs from the whole machine: on a host with 32768 of them (the
kernel's default) evo itself, and everything else, could then start no process. The sandbox is
stopped once it holds more than its task limit (the check `processes`).
"""

import os

import torch.nn as nn

MOST = 200_000


class ModelNew(nn.Module):
    def forward(self, x):
        made = 0
        try:
            while made < MOST:
                if os.fork() == 0:
                    os._exit(0)
                made += 1
        except OSError as err:
            raise RuntimeError(f"evo-fault: fork failed after {made} processes ({err.strerror})") from None
        raise RuntimeError(f"evo-fault: {made} processes made, and fork never failed")
