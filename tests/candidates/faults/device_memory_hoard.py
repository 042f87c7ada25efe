"""Fault (GPU): takes nearly all of the device's free memory as it is constructed and keeps it in
its caching allocator, then computes the ReLU correctly with torch. Every other process on the
device (the checker comparing its outputs, the processes of the evaluations queued behind it)
finds the device's memory full. It must cost only its own verdict.
"""

import torch
import torch.nn as nn

LEFT_FREE = 64 << 20  # enough for its own outputs, not for another process's context


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        free, _ = torch.cuda.mem_get_info()
        if free > 2 * LEFT_FREE:  # another of its processes may hold it already
            # Freed at once, the block stays reserved by this process's allocator, for its outputs.
            torch.empty(free - LEFT_FREE, dtype=torch.uint8, device="cuda")

    def forward(self, x):
        return torch.relu(x)
