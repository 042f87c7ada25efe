"""The exported kernel's own tests: its outputs against the task's PyTorch reference (reference.py)
at the task's shapes and at other sizes, torch.library.opcheck of its custom op, torch.compile
with fullgraph=True (no graph break), swap_in, and its backward (or the clear error in its place).

    pytest tests        # after `pip install --no-build-isolation .`, from this folder

Outputs are judged as evo judged them: the error against the reference computed in float64 may
be 16 times what the float32 reference itself makes, and at least 1e-5 (8 machine epsilons for
16-bit outputs), in relative L2 and in the largest element relative to the largest magnitude.
At sizes other than the task's a kernel may refuse (raise), which skips the test with its reason;
it may never answer wrongly.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

# Read before the package is imported: importing it loads (or builds) the kernel for its device.
MANIFEST = json.loads((Path(importlib.util.find_spec("__evo_package__").submodule_search_locations[0])
                       / "_manifest.json").read_text())
if MANIFEST["device"] == "cuda" and not torch.cuda.is_available():
    pytest.skip("the kernel runs on a CUDA GPU and none is visible", allow_module_level=True)

import __evo_package__ as kernel  # noqa: E402
from __evo_package__ import reference  # noqa: E402

DEVICE = MANIFEST["device"]
POLICY = MANIFEST["policy"]
HAS_BACKWARD = MANIFEST["backward"] is not None
ERROR_FACTOR, FP32_FLOOR, EPSILON_FLOOR, REDUCED_PRECISION_ERROR = 16.0, 1e-5, 8.0, 2e-2


def seeded(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def task_sizes(changes: dict):
    """The task module with some of its module-level sizes changed, for get_inputs()."""
    saved = {name: getattr(reference, name) for name in changes}
    for name, value in changes.items():
        setattr(reference, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(reference, name, value)


def make_inputs(changes: dict, seed: int = 1) -> list:
    with task_sizes(changes):
        seeded(seed)
        return [tensor.to(DEVICE) for tensor in reference.get_inputs()]


def make_models(seed: int = 0):
    """The reference and the kernel, built after the same seed (as evo built them), on the device."""
    init = reference.get_init_inputs()
    seeded(seed)
    ours = reference.Model(*init).to(DEVICE)
    seeded(seed)
    theirs = kernel.Model(*init).to(DEVICE)
    return ours, theirs


def size_variants() -> list:
    free = MANIFEST["free_sizes"]
    variants = [pytest.param({}, id="task-sizes")]
    for label, rule in (("about-half", lambda v: v // 2 + 1), ("about-an-eighth", lambda v: max(1, v // 8) + 3)):
        changes = {name: rule(value) for name, value in free.items()}
        if changes and changes != free:
            variants.append(pytest.param(changes, id=label))
    return variants


def as_list(result) -> list:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def relative_errors(value: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, largest error relative to the largest magnitude) over finite truth."""
    truth = truth.double()
    finite = torch.isfinite(truth)
    diff = torch.where(finite, value.double() - truth, torch.zeros_like(truth))
    scale_l2 = float(torch.linalg.vector_norm(torch.where(finite, truth, torch.zeros_like(truth))))
    scale_max = float(torch.where(finite, truth.abs(), torch.zeros_like(truth)).max()) if truth.numel() else 0.0
    if not diff.numel():
        return 0.0, 0.0
    return float(torch.linalg.vector_norm(diff)) / max(scale_l2, 1e-30), float(diff.abs().max()) / max(scale_max, 1e-30)


def tolerance(ref32: torch.Tensor, ref64: torch.Tensor | None) -> dict:
    floor = FP32_FLOOR if torch.finfo(ref32.dtype).bits >= 32 else EPSILON_FLOOR * torch.finfo(ref32.dtype).eps
    base_l2, base_max = relative_errors(ref32, ref64) if ref64 is not None else (floor, floor)
    bound = {"l2": max(ERROR_FACTOR * base_l2, floor), "max": max(ERROR_FACTOR * base_max, floor)}
    if POLICY.get("allow_reduced_precision"):
        bound = {key: max(value, REDUCED_PRECISION_ERROR) for key, value in bound.items()}
    if POLICY.get("tolerance") is not None:
        bound = {key: float(POLICY["tolerance"]) for key in bound}
    return bound


def reference_outputs(model: torch.nn.Module, inputs: list) -> tuple[list, list | None]:
    """The reference's outputs in float32, and in float64 where the reference can run so."""
    with torch.no_grad():
        ref32 = as_list(model(*inputs))
        try:
            wide = [t.double() if t.is_floating_point() else t for t in inputs]
            ref64 = as_list(copy.deepcopy(model).double()(*wide))
        except Exception:  # an op without a float64 kernel: judge against float32, as evo does
            ref64 = None
    return ref32, ref64


def assert_matches(outputs: list, ref32: list, ref64: list | None) -> None:
    assert len(outputs) == len(ref32), f"the kernel returned {len(outputs)} outputs, the reference {len(ref32)}"
    for position, (out, expected) in enumerate(zip(outputs, ref32)):
        assert out.shape == expected.shape and out.dtype == expected.dtype, (
            f"output {position} is {out.dtype} {tuple(out.shape)}, the reference's {expected.dtype} {tuple(expected.shape)}")
        if not out.is_floating_point():
            assert torch.equal(out, expected), f"output {position} differs from the reference"
            continue
        truth = ref64[position] if ref64 is not None else expected
        assert torch.equal(torch.isfinite(out), torch.isfinite(truth)), \
            f"output {position} has NaN or Inf where the reference does not, or the other way round"
        bound = tolerance(expected, ref64[position] if ref64 is not None else None)
        l2, worst = relative_errors(out, truth)
        assert l2 <= bound["l2"] and worst <= bound["max"], (
            f"output {position} is wrong: relative L2 error {l2:.2e} (allowed {bound['l2']:.2e}), largest error "
            f"{worst:.2e} of the output's scale (allowed {bound['max']:.2e})")


@pytest.mark.parametrize("changes", size_variants())
def test_matches_the_reference(changes):
    try:
        inputs = make_inputs(changes)
        ours, theirs = make_models()
        ref32, ref64 = reference_outputs(ours, inputs)
    except Exception as err:
        pytest.skip(f"the reference itself does not run with {changes}: {type(err).__name__}: {err}")
    try:
        with torch.no_grad():
            outputs = as_list(theirs(*inputs))
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # a fault in the kernel shows here, not in a later test
    except Exception as err:
        if not changes or "CUDA error" in str(err):  # a refusal is a check that raises, never a fault
            raise
        pytest.skip(f"the kernel refuses the sizes {changes}: {type(err).__name__}: {str(err).strip()[:300]}")
    assert_matches(outputs, ref32, ref64)


def test_the_op_and_the_eager_path_agree():
    """Eager calls without gradients run the kernel directly; the op runs the same implementation."""
    _, theirs = make_models()
    inputs = make_inputs({})
    with torch.no_grad():
        direct = as_list(theirs(*inputs))
        through_op = as_list(torch.ops.__evo_package__.forward(*kernel.op_arguments(theirs, *inputs)))
    for got, expected in zip(through_op, direct):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_opcheck():
    _, theirs = make_models()
    torch.library.opcheck(torch.ops.__evo_package__.forward.default, kernel.op_arguments(theirs, *make_inputs({})))


@pytest.mark.skipif(not HAS_BACKWARD, reason="the kernel has no backward")
def test_opcheck_with_gradients():
    _, theirs = make_models()
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs({})]
    torch.library.opcheck(torch.ops.__evo_package__.forward.default,
                          kernel.op_arguments(theirs, *inputs, detach=False))


def test_torch_compile_keeps_the_kernel_in_one_graph():
    _, theirs = make_models()
    inputs = make_inputs({})
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        eager = as_list(theirs(*inputs))
        torch._dynamo.reset()
        recorded = as_list(torch.compile(theirs, backend=record, fullgraph=True)(*inputs))
        torch._dynamo.reset()
        compiled = as_list(torch.compile(theirs, fullgraph=True)(*inputs))  # the default backend, inductor
    assert len(graphs) == 1
    assert any("__evo_package__.forward" in str(node.target) for node in graphs[0].graph.nodes)
    for got, again, expected in zip(recorded, compiled, eager):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_swap_in_then_torch_compile():
    init = reference.get_init_inputs()
    inputs = make_inputs({})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = reference.Model(*init)

        def forward(self, *args):
            return self.block(*args)

    seeded(0)
    net = Net().to(DEVICE)
    ref32, ref64 = reference_outputs(net.block, inputs)
    try:
        replaced = kernel.swap_in(net, reference.Model)
    except ValueError as err:  # the kernel keeps its weights in another layout: build it as evo did
        assert "pass make=" in str(err)
        replaced = kernel.swap_in(net, reference.Model, make=lambda old: make_models()[1])
    assert replaced == ["block"] and isinstance(net.block, kernel.Model)
    torch._dynamo.reset()
    with torch.no_grad():
        outputs = as_list(torch.compile(net, fullgraph=True)(*inputs))
    assert_matches(outputs, ref32, ref64)


def test_copies_run_on_their_own_state():
    _, theirs = make_models()
    inputs = make_inputs({})
    twin = copy.deepcopy(theirs)
    assert twin._evo_handle != theirs._evo_handle
    del theirs
    with torch.no_grad():
        assert all(torch.isfinite(out).all() for out in as_list(twin(*inputs)) if out.is_floating_point())


def differentiable(inputs: list) -> list:
    return [t.requires_grad_() if t.is_floating_point() else t for t in inputs]


@pytest.mark.skipif(HAS_BACKWARD, reason="the kernel has a backward")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_backward_without_one_is_a_clear_error(compiled):
    _, theirs = make_models()
    torch._dynamo.reset()
    model = torch.compile(theirs, fullgraph=True) if compiled else theirs
    outputs = [out for out in as_list(model(*differentiable(make_inputs({})))) if out.requires_grad]
    assert outputs, "no output requires a gradient, though the inputs do"
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])


@pytest.mark.skipif(not HAS_BACKWARD, reason="the kernel has no backward")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_gradients_match_the_reference(compiled):
    """evo verifies forward passes only: this is the one check of the candidate's backward."""
    ours, theirs = make_models()
    torch._dynamo.reset()
    model = torch.compile(theirs, fullgraph=True) if compiled else theirs
    inputs = make_inputs({})
    expected_inputs, our_inputs = differentiable([t.clone() for t in inputs]), differentiable([t.clone() for t in inputs])
    expected_out, got_out = as_list(ours(*expected_inputs)), as_list(model(*our_inputs))
    seeded(2)
    cotangents = [torch.randn_like(out) for out in expected_out]
    # The kernel's parameters that correspond to the reference's (by name, else in order).
    our_parameters = list(theirs.named_parameters())
    counterparts = kernel.matching_state(our_parameters, list(ours.named_parameters()))
    pairs = [(want, have) for (_, have), want in zip(our_parameters, counterparts) if want is not None]
    expected = torch.autograd.grad(expected_out, [t for t in expected_inputs if t.requires_grad] + [w for w, _ in pairs],
                                   cotangents, allow_unused=True)
    got = torch.autograd.grad(got_out, [t for t in our_inputs if t.requires_grad] + [h for _, h in pairs],
                              cotangents, allow_unused=True)
    bound = REDUCED_PRECISION_ERROR if POLICY.get("allow_reduced_precision") else 1e-4
    for position, (want, have) in enumerate(zip(expected, got)):
        if want is None:
            continue
        assert have is not None, f"gradient {position} is missing"
        l2, _ = relative_errors(have, want)
        assert l2 <= bound, f"gradient {position}: relative L2 error {l2:.2e} against the reference's (allowed {bound:.0e})"
