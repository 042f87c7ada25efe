"""The sandbox harness seeds every generator a task's get_inputs may use as torch.manual_seed
does, so each process makes the same inputs for a seed; it does it without torch.manual_seed's
per-call cost (it is called once per input set, inside the timed protocol's input making)."""

import random
import sys
from pathlib import Path

import numpy
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sandbox"))

import harness  # noqa: E402


def draws(device: str) -> list:
    return [torch.randn(64, device=device), torch.rand(8, device=device), torch.randint(0, 1000, (8,), device=device),
            random.random(), numpy.random.rand()]


def same(first: list, second: list) -> bool:
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(first, second))


def seeded_by_torch(seed: int, device: str) -> list:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)
    return draws(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_harness_seeds_as_torch_manual_seed_does(device, gpu_alone_if_gpu):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no GPU")
        torch.ones(1, device="cuda")  # started, as in every sandbox on a GPU
    for seed in (1, 2**40 + 7):
        harness.seed_everything(seed)
        ours = draws(device)
        assert same(ours, seeded_by_torch(seed, device))
        harness.seed_everything(seed + 1)
        assert not same(draws(device), ours)  # a different seed draws differently: the comparison can fail
