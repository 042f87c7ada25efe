"""The task audit: warns when a task's outputs barely depend on its inputs, since such
tasks reward candidates that skip the work.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import torch

# Relative spread under which outputs count as not depending on what varies.
CONSTANT_SPREAD = 1e-6


def spread(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger magnitude; infinite where the NaN/Inf patterns differ."""
    a, b = a.double(), b.double()
    if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    finite = torch.isfinite(a)
    a, b = a[finite], b[finite]
    if not a.numel():
        return 0.0
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def audit_task(make_inputs, call_reference, seeds: list[int]) -> list[str]:
    """Warnings (one sentence each) about outputs that are constant, an input, or seed-independent."""
    runs = []
    for seed in seeds:
        inputs = make_inputs(seed)
        outputs = [out.detach().cpu() for out in call_reference(inputs)]
        runs.append(([t.detach().cpu() for t in inputs], outputs))
    warnings = []
    first_inputs, first_outputs = runs[0]
    for position, out in enumerate(first_outputs):
        if out.numel() == 0:
            continue
        if out.numel() > 1 and spread(out, out.reshape(-1)[0].expand_as(out)) <= CONSTANT_SPREAD:
            warnings.append(f"output {position} is nearly constant ({out.reshape(-1)[0].item():.4g} everywhere): "
                            "a candidate can pass by writing that constant")
            continue
        if all(spread(outputs[position], out) <= CONSTANT_SPREAD for _, outputs in runs[1:]):
            warnings.append(f"output {position} is the same for every input seed: a candidate can pass by "
                            "returning a stored answer")
            continue
        for index, tensor in enumerate(first_inputs):
            if tensor.shape == out.shape and tensor.is_floating_point() and spread(tensor, out) <= CONSTANT_SPREAD:
                warnings.append(f"output {position} equals input {index} on the task's input domain: "
                                "a candidate can pass by copying its input")
                break
    return warnings
