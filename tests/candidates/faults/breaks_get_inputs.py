"""Fault: replaces torch.randn as it is imported, so that the task's get_inputs() raises in the
candidate's processes. Before session 25 the profiled call's inputs, made there, failing was an
evaluator error (a candidate could end its own verification in `error` and restart the
session's checker); it is the candidate's failure (runs).
"""

import torch
import torch.nn as nn


def _refused(*args, **kwargs):
    raise RuntimeError("no inputs for you")


torch.randn = _refused


class ModelNew(nn.Module):
    def forward(self, x):
        return torch.relu(x)
