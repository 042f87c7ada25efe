"""Fault (GPU): computes the ReLU correctly with torch, and in every call then takes nearly all
of the device's free memory and keeps it, so that the device is full while its outputs are
checked and its calls timed, and while the evaluations queued behind it start. It must cost only
its own verdict.
"""

import torch
import torch.nn as nn

LEFT_FREE = 64 << 20  # enough for its own outputs, not for another process's context

_hoard = []


class ModelNew(nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        free, _ = torch.cuda.mem_get_info()
        if free > 2 * LEFT_FREE:
            _hoard.append(torch.empty(free - LEFT_FREE, dtype=torch.uint8, device=x.device))
        return y
