"""The checker's judgement of a timed window's outputs, called directly (no processes)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sandbox"))

import numerics  # noqa: E402

TOLERANCE = {"l2": 1e-5, "max": 1e-5}


def window(calls: int = 6) -> tuple[list[list], list[list]]:
    """Reference outputs of `calls` calls (a float matrix, an integer vector, a scalar), and exact copies."""
    generator = torch.Generator().manual_seed(7)
    expected = [[torch.randn(5, 7, generator=generator), torch.arange(4) * call, torch.tensor(float(call))]
                for call in range(calls)]
    return [[tensor.clone() for tensor in outputs] for outputs in expected], expected


def test_exact_outputs_pass():
    outputs, expected = window()
    assert numerics.check_timed_window(outputs, expected, TOLERANCE)["passed"]


def test_rounding_within_twice_the_trial_tolerance_passes():
    outputs, expected = window()
    for call in outputs:
        call[0] += call[0].abs().max() * 2e-6
    assert numerics.check_timed_window(outputs, expected, TOLERANCE)["passed"]


@pytest.mark.parametrize("position, spoil, words", [
    (0, lambda t: t.mul_(1.01), "relative L2 error"),
    (0, lambda t: t.view(-1)[3].fill_(float("nan")), "NaN or Inf"),
    (1, lambda t: t.view(-1)[2].add_(1), "differs from the reference"),
    (2, lambda t: t.add_(0.5), "relative L2 error"),
])
def test_the_first_failing_call_and_output_is_named(position, spoil, words):
    outputs, expected = window()
    spoil(outputs[4][position])
    spoil(outputs[5][0])  # a later call fails too: the earlier one is reported
    check = numerics.check_timed_window(outputs, expected, TOLERANCE)
    assert not check["passed"] and check["name"] == "timed_outputs"
    assert f"output {position} of a timed call" in check["detail"] and words in check["detail"]


def test_a_wrong_value_before_a_malformed_call_is_reported_first():
    outputs, expected = window()
    outputs[1][0].mul_(2)
    outputs[3][0] = outputs[3][0].double()
    check = numerics.check_timed_window(outputs, expected, TOLERANCE)
    assert check["name"] == "timed_outputs" and "output 0" in check["detail"]


def test_a_malformed_call_fails_the_shape_check():
    outputs, expected = window()
    outputs[3][1] = outputs[3][1][:2]
    check = numerics.check_timed_window(outputs, expected, TOLERANCE)
    assert (check["name"], check["passed"]) == ("output_shape", False) and "shape (2,)" in check["detail"]


def test_windows_larger_than_a_chunk_are_judged_whole(monkeypatch):
    monkeypatch.setattr(numerics, "TIMED_CHUNK_ELEMENTS", 40)  # one call per chunk
    outputs, expected = window()
    assert numerics.check_timed_window(outputs, expected, TOLERANCE)["passed"]
    outputs[5][2].add_(1)
    check = numerics.check_timed_window(outputs, expected, TOLERANCE)
    assert not check["passed"] and "output 2" in check["detail"]
