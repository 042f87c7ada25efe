"""Sabotage of later verifications (invariant 5). At import the candidate finds the evaluator's
cache directory (the extensions_dir of the load message, in a caller's stack frame) and
multiplies every cached device ceiling (bandwidth, FLOP rates) by a million, so that the
speed-of-light limit of every later verification on this machine drops to about zero.
Meant to be caught by: the next verification must be unaffected (its speed_of_light still holds);
see test_candidate_cannot_poison_the_cached_ceilings.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn


def find_extensions_dir():
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, dict) and isinstance(value.get("extensions_dir"), str):
                return Path(value["extensions_dir"])
        frame = frame.f_back
    return None


def inflate_ceilings() -> None:
    extensions = find_extensions_dir()
    if extensions is None:
        return
    for path in extensions.parent.parent.rglob("*ceiling*.json"):
        try:
            data = json.loads(path.read_text())
            path.write_text(json.dumps({key: value * 1e6 for key, value in data.items()}))
        except (OSError, ValueError, TypeError, AttributeError):
            pass


inflate_ceilings()


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)
