"""Judging outputs: the checks the checker applies to what a candidate hands back.

Each check is a dict {name, passed, detail}; the detail is written for the user.
Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import torch

import harness
from wire import HOST_POISON_BYTE

# How many times the fp32 reference's own error an honest fp32 candidate may reach.
ERROR_FACTOR = 16.0
# The error always tolerated, relative to the output's scale. For 32-bit outputs it is what an
# honest fp32 kernel reaches with the plainest summation order: a sequential sum of 65536
# normal values lands near 6e-6 against float64, ten to fifty times torch's own reductions,
# while TF32 (~3e-4) and bf16 or fp16 arithmetic (~1e-3 and up) stay far above it.
FP32_FLOOR = 1e-5
# For 16-bit outputs: this many machine epsilons of their dtype.
EPSILON_FLOOR = 8.0
# What reduced precision (TF32, bf16 operands, fast math) is allowed to reach when the user permits it.
REDUCED_PRECISION_ERROR = 2e-2


def result(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def index_text(flat_index: int, shape) -> str:
    coords = []
    for size in reversed(list(shape)):
        coords.append(flat_index % size if size else 0)
        flat_index //= max(size, 1)
    return "[" + ", ".join(str(c) for c in reversed(coords)) + "]"


def check_binding(outputs: list, reported_checksum) -> dict:
    actual = harness.checksum(outputs)
    if reported_checksum is None or actual != reported_checksum:
        return result("output_binding", False,
                      "the output handed back after the call differs from the output at the moment the call "
                      "reported completion: the candidate kept working after its timer stopped")
    return result("output_binding", True, "the output delivered is the output present when the call completed")


def check_output_meta(outputs: list, expected: list) -> dict:
    if len(outputs) != len(expected):
        return result("output_shape", False, f"the candidate returned {len(outputs)} outputs, the reference {len(expected)}")
    for position, (out, ref) in enumerate(zip(outputs, expected)):
        if out.dtype != ref.dtype:
            return result("output_shape", False,
                          f"output {position} has dtype {str(out.dtype)[6:]}, the reference's is {str(ref.dtype)[6:]}")
        if tuple(out.shape) != tuple(ref.shape):
            return result("output_shape", False,
                          f"output {position} has shape {tuple(out.shape)}, the reference's is {tuple(ref.shape)}")
    return result("output_shape", True, "every output has the reference's shape and dtype")


def poison_pattern(dtype: torch.dtype) -> torch.Tensor:
    """One element of `dtype` made of the host poison byte."""
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.tensor([HOST_POISON_BYTE] * size, dtype=torch.uint8).view(dtype)


def check_written(outputs: list, expected: list) -> dict:
    """Memory was poisoned before the call (device blocks with NaN, host allocations with a
    fixed byte): an element still holding the poison where the reference differs was never written."""
    for position, (out, ref) in enumerate(zip(outputs, expected)):
        if not out.is_floating_point():
            continue
        stale = torch.isnan(out) | (out.reshape(-1).view(torch.uint8).reshape(-1, out.element_size())
                                    == HOST_POISON_BYTE).all(dim=1).reshape(out.shape) if out.numel() else torch.isnan(out)
        poison = poison_pattern(out.dtype).to(out.device)
        unwritten = stale & torch.isfinite(ref.to(out.dtype)) & (ref.to(out.dtype) != poison)
        if unwritten.any():
            first = int(unwritten.reshape(-1).nonzero()[0])
            count = int(unwritten.sum())
            return result("output_written", False,
                          f"output {position} element {index_text(first, out.shape)} still holds the poison where the reference is finite "
                          f"({count} of {out.numel()} elements): the candidate did not write it (memory is pre-filled "
                          "with NaN on the device, with the byte 0x7F on the host)")
    return result("output_written", True, "every output element was written")


def relative_errors(value: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, int]:
    """(relative L2 error, largest error relative to the largest magnitude, where it is) over finite truth."""
    truth = truth.double()
    diff = (value.double() - truth)
    finite = torch.isfinite(truth)
    diff = torch.where(finite, diff, torch.zeros_like(diff))
    scale_l2 = float(torch.linalg.vector_norm(torch.where(finite, truth, torch.zeros_like(truth))))
    scale_max = float(torch.where(finite, truth.abs(), torch.zeros_like(truth)).max()) if truth.numel() else 0.0
    tiny = 1e-30
    worst = int(diff.abs().reshape(-1).argmax()) if diff.numel() else 0
    return (float(torch.linalg.vector_norm(diff)) / max(scale_l2, tiny),
            float(diff.abs().max()) / max(scale_max, tiny) if diff.numel() else 0.0, worst)


def nonfinite_mismatch(value: torch.Tensor, truth: torch.Tensor) -> int | None:
    """Flat index of the first element whose finiteness differs from the reference's, if any."""
    truth_nonfinite = ~torch.isfinite(truth)
    value_nonfinite = ~torch.isfinite(value)
    mismatch = truth_nonfinite != value_nonfinite
    if mismatch.any():
        return int(mismatch.reshape(-1).nonzero()[0])
    return None


def error_floor(dtype: torch.dtype) -> float:
    if torch.finfo(dtype).bits >= 32:
        return FP32_FLOOR
    return EPSILON_FLOOR * torch.finfo(dtype).eps


def tolerance_for(ref32: torch.Tensor, ref64: torch.Tensor | None, policy: dict) -> dict:
    """The error an honest candidate may reach on this output, from the fp32 reference's own error."""
    floor = error_floor(ref32.dtype)
    if ref64 is None:
        base_l2 = base_max = floor
    else:
        base_l2, base_max, _ = relative_errors(ref32, ref64)
    tolerance = {"l2": max(ERROR_FACTOR * base_l2, floor), "max": max(ERROR_FACTOR * base_max, floor)}
    if policy.get("allow_reduced_precision"):
        tolerance = {key: max(value, REDUCED_PRECISION_ERROR) for key, value in tolerance.items()}
    if policy.get("tolerance") is not None:
        tolerance = {key: float(policy["tolerance"]) for key in tolerance}
    return tolerance


def check_values(outputs: list, ref32: list, ref64: list | None, policy: dict) -> tuple[dict, dict | None]:
    """Compare with the float64 reference; the bound is what the fp32 reference itself achieves."""
    widest = None
    against = "the float64 reference" if ref64 is not None else "the fp32 reference (no float64 reference could run)"
    for position, out in enumerate(outputs):
        ref = ref32[position]
        truth = ref64[position] if ref64 is not None else ref
        if not out.is_floating_point():
            if not torch.equal(out, ref):
                first = int((out != ref).reshape(-1).nonzero()[0])
                return result("values", False, f"output {position} differs from the reference at "
                              f"{index_text(first, out.shape)}: got {out.reshape(-1)[first].item()}, "
                              f"expected {ref.reshape(-1)[first].item()}"), None
            continue
        bad = nonfinite_mismatch(out, truth)
        if bad is not None:
            return result("values", False, f"output {position} element {index_text(bad, out.shape)} is "
                          f"{out.reshape(-1)[bad].item()} where {against} has {truth.reshape(-1)[bad].item()}"), None
        tolerance = tolerance_for(ref, ref64[position] if ref64 is not None else None, policy)
        l2, worst_rel, worst = relative_errors(out, truth)
        if l2 > tolerance["l2"] or worst_rel > tolerance["max"]:
            measure = (f"relative L2 error {l2:.2e} (allowed {tolerance['l2']:.2e})" if l2 > tolerance["l2"]
                       else f"largest error {worst_rel:.2e} of the output's scale (allowed {tolerance['max']:.2e})")
            hint = "" if policy.get("allow_reduced_precision") else \
                "; reduced precision (TF32, bf16, fast math) is off unless --allow-reduced-precision is given"
            return result("values", False,
                          f"output {position} is wrong: {measure} against {against}; largest error at "
                          f"{index_text(worst, out.shape)}: got {out.reshape(-1)[worst].item():.6g}, expected "
                          f"{truth.reshape(-1)[worst].item():.6g}{hint}"), None
        widest = tolerance if widest is None else {k: max(widest[k], tolerance[k]) for k in tolerance}
    return result("values", True, f"outputs match {against} within what fp32 code achieves on this task"), widest


# Elements per output position compared at once across a window's calls; bounds the float64
# copies a window's comparison makes, whatever the window's size.
TIMED_CHUNK_ELEMENTS = 1 << 25


def check_timed_window(calls: list[list], expected: list[list], tolerance: dict | None) -> dict:
    """A window of timed calls' outputs against the fp32 reference of the same inputs, judged
    call by call in order; the first failure is reported.

    The bound is twice the trial tolerance: the fp32 reference is itself within a sixteenth of
    it from the float64 truth. The calls are compared together, one batch per output position,
    and their verdicts reach the host in one transfer: a window costs one synchronize, not one
    per output.
    """
    failed_shape = next((index for index, (outs, refs) in enumerate(zip(calls, expected))
                         if not check_output_meta(outs, refs)["passed"]), len(calls))
    first, start = None, 0
    while first is None and start < failed_shape:
        per_call = max(1, sum(out.numel() for out in calls[start]))
        stop = min(failed_shape, start + max(1, TIMED_CHUNK_ELEMENTS // per_call))
        first = _first_timed_failure(calls[start:stop], expected[start:stop], tolerance)
        if first is not None:
            first = (first[0] + start, *first[1:])
        start = stop
    if first is not None:
        _, position, code, l2, limit = first
        if code == _DIFFERS:
            return result("timed_outputs", False, f"output {position} of a timed call differs from the reference")
        if code == _NONFINITE:
            return result("timed_outputs", False, f"output {position} of a timed call has NaN or Inf where the "
                          "reference does not (unwritten or stale memory during timing)")
        return result("timed_outputs", False,
                      f"output {position} of a timed call is wrong (relative L2 error {l2:.2e}, allowed {limit:.2e}): "
                      "the candidate computed a different result while it was being timed")
    if failed_shape < len(calls):
        return check_output_meta(calls[failed_shape], expected[failed_shape])
    return result("timed_outputs", True, "the outputs of every timed call are correct")


_PASSED, _DIFFERS, _NONFINITE, _WRONG = 0, 1, 2, 3


def _first_timed_failure(calls: list[list], expected: list[list], tolerance: dict | None):
    """(call, position, code, relative L2 error, limit) of the first failing output, or None."""
    codes, errors, limits = [], [], []
    count = len(calls)
    if not calls[0]:
        return None
    for position in range(len(calls[0])):
        outs = torch.stack([call[position] for call in calls]).reshape(count, -1 if calls[0][position].numel() else 0)
        refs = torch.stack([call[position] for call in expected]).reshape(outs.shape).to(outs.device)
        if not outs.is_floating_point():
            codes.append(torch.where((outs != refs).any(dim=1), _DIFFERS, _PASSED))
            errors.append(torch.zeros(count, dtype=torch.float64, device=outs.device))
            limits.append(0.0)
            continue
        finite = torch.isfinite(refs)
        nonfinite = (finite != torch.isfinite(outs)).any(dim=1)
        diff = torch.where(finite, outs.double() - refs.double(), 0.0)
        scale = torch.linalg.vector_norm(torch.where(finite, refs.double(), 0.0), dim=1).clamp_min(1e-30)
        l2 = torch.linalg.vector_norm(diff, dim=1) / scale
        limit = 2 * (tolerance or {"l2": error_floor(refs.dtype)})["l2"]
        codes.append(torch.where(nonfinite, _NONFINITE, torch.where(l2 > limit, _WRONG, _PASSED)))
        errors.append(l2)
        limits.append(limit)
    verdicts = torch.stack([torch.stack(codes).double(), torch.stack(errors)]).cpu()
    failing = (verdicts[0] != _PASSED).any(dim=0).nonzero()
    if not len(failing):
        return None
    call = int(failing[0])
    position = int((verdicts[0, :, call] != _PASSED).nonzero()[0])
    return call, position, int(verdicts[0, position, call]), float(verdicts[1, position, call]), limits[position]


def check_inputs_unchanged(after: list, before: list) -> dict:
    for position, (now, then) in enumerate(zip(after, before)):
        if now.shape != then.shape or now.dtype != then.dtype or not torch.equal(
                now.reshape(-1).view(torch.uint8) if now.numel() else now,
                then.reshape(-1).view(torch.uint8) if then.numel() else then):
            changed = "its shape or dtype" if now.shape != then.shape or now.dtype != then.dtype else "its contents"
            return result("inputs_unchanged", False,
                          f"input {position} was modified by the call ({changed} changed); a kernel must not write its inputs")
    return result("inputs_unchanged", True, "no input was modified by the call")
