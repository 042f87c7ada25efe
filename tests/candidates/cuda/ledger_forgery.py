"""Cheat: a forged record of custom code. The runner counts calls into compiled extensions in an
ExtensionLedger object living in the candidate's own process; the candidate finds it through gc
and adds one per call, while torch.relu does the work and no kernel of its own exists.
Caught by: custom_code. On a GPU the evaluator reads the profiler's list of kernels, which the
ledger cannot change; the forged count is never consulted (rejected on the H200).
"""

import gc

import torch
import torch.nn as nn


def find_ledgers() -> list:
    return [obj for obj in gc.get_objects() if type(obj).__name__ == "ExtensionLedger"]


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.ledgers = find_ledgers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ledger in self.ledgers:
            ledger.calls += 1
        return torch.relu(x)
