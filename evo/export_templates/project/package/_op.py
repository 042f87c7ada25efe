"""The kernel as torch.library custom ops, which torch.compile keeps whole in its graph:

    PACKAGE::forward(int handle, Tensor[] state, Tensor <input>, ...) -> Tensor or (Tensor, ...)
    PACKAGE::backward(int handle, Tensor[] state, Tensor[] inputs, Tensor?[] grads) -> Tensor[]

`handle` names the Model instance whose code and settings a call uses; `state` is its parameters
and buffers, passed as tensors so that autograd and torch.compile see them. The CPU or CUDA
implementation runs the verified candidate's forward with that state. The fake implementation
runs the task's reference forward on fake tensors, so shapes and dtypes come from the reference.
backward recomputes the candidate's forward with autograd, through the torch.autograd.Function
with a backward that the candidate defines (or through plain PyTorch, when that is all its forward
is); for compiled code without such a Function it raises a clear error instead.
Eager calls that record no gradient skip the dispatch and run the implementation directly (call()).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref

import torch

from ._extensions import MANIFEST, PACKAGE

DEVICE = MANIFEST["device"]
HAS_BACKWARD = MANIFEST["backward"] is not None
TUPLE = MANIFEST["output_is_sequence"] and len(MANIFEST["outputs"]) > 1  # else the op returns one Tensor
NO_BACKWARD = (f"{PACKAGE}.Model has no backward: the compiled kernel evo verified (candidate "
               f"c{MANIFEST['candidate_id']}) defines no torch.autograd.Function with a backward, and evo verifies "
               "forward passes only. Run it under torch.no_grad() or torch.inference_mode(), or train with "
               f"{PACKAGE}.reference.Model")

_modules: dict[int, tuple[weakref.ref, torch.nn.Module]] = {}  # handle -> (the Model, its reference on meta)
_handles = itertools.count(1)
_bound: dict[str, object] = {}  # "candidate", "reference" (the task module), "model": set by define()


def define(candidate_class: type, reference_module, model_class: type) -> None:
    """Register the ops (once per process, when the package is imported)."""
    _bound.update(candidate=candidate_class, reference=reference_module, model=model_class)
    arguments = ", ".join(["int handle", "Tensor[] state", *(f"Tensor {name}" for name in MANIFEST["input_names"])])
    outputs = f"({', '.join(['Tensor'] * len(MANIFEST['outputs']))})" if TUPLE else "Tensor"
    forward = torch.library.custom_op(f"{PACKAGE}::forward", _forward, mutates_args=(), device_types=DEVICE,
                                      schema=f"({arguments}) -> {outputs}")
    forward.register_fake(_forward_fake)
    backward = torch.library.custom_op(f"{PACKAGE}::backward", _backward, mutates_args=(), device_types=DEVICE,
                                       schema="(int handle, Tensor[] state, Tensor[] inputs, Tensor?[] grads) -> Tensor[]")
    backward.register_fake(_backward_fake)
    forward.register_autograd(_gradients, setup_context=_save_for_backward)


# ---- modules and their state ----------------------------------------------------------------

def register(module: torch.nn.Module, *init_args, **init_kwargs) -> None:
    """Give a new Model (or a copy of one) its handle, and the reference model its fake forward runs."""
    handle = next(_handles)
    object.__setattr__(module, "_evo_handle", handle)
    object.__setattr__(module, "_evo_init", (init_args, init_kwargs))
    _modules[handle] = (weakref.ref(module, lambda _, handle=handle: _modules.pop(handle, None)),
                        _reference_on_meta(init_args, init_kwargs))


def _reference_on_meta(args: tuple, kwargs: dict) -> torch.nn.Module:
    reference = _bound["reference"].Model
    try:
        with torch.device("meta"):
            return reference(*args, **kwargs)
    except Exception:  # a constructor that computes on its tensors
        return reference(*args, **kwargs).to("meta")


def _entry(handle: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    found = _modules.get(handle)
    module = found[0]() if found else None
    if module is None:
        raise RuntimeError(f"{PACKAGE}: no live Model has handle {handle}; call the Model, not the op, directly")
    return module, found[1]


def state_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters, then its buffers, in registration order (the op's `state`)."""
    return ([tensor for _, tensor in module.named_parameters(remove_duplicate=False)]
            + [tensor for _, tensor in module.named_buffers(remove_duplicate=False)])


def _slots(module: torch.nn.Module) -> list[tuple[dict, str]]:
    """Where each tensor of state_of(module) lives: (the owner's _parameters or _buffers, its key)."""
    slots = []
    for table, names in (("_parameters", module.named_parameters(remove_duplicate=False)),
                         ("_buffers", module.named_buffers(remove_duplicate=False))):
        for name, _ in names:
            owner, _, key = name.rpartition(".")
            slots.append((getattr(module.get_submodule(owner), table), key))
    return slots


@contextlib.contextmanager
def _swapped(module: torch.nn.Module, tensors: list[torch.Tensor]):
    """The module with `tensors` in place of its own state, for the duration."""
    slots = _slots(module)
    saved = [table[key] for table, key in slots]
    if len(saved) != len(tensors):
        raise RuntimeError(f"{PACKAGE}: the op was given {len(tensors)} state tensors; the Model has {len(saved)}")
    if all(mine is given for mine, given in zip(saved, tensors)):
        yield
        return
    for (table, key), tensor in zip(slots, tensors):
        table[key] = tensor
    try:
        yield
    finally:
        for (table, key), tensor in zip(slots, saved):
            table[key] = tensor


def matching_state(target: list[tuple[str, torch.Tensor]], source: list[tuple[str, torch.Tensor]]) -> list:
    """For each of target's tensors, source's counterpart: by name when both have the same names,
    else by position when the shapes agree in order (evo checked the kernel against the reference
    with both built after the same seed, so their tensors are made in the same order); else None."""
    if sorted(name for name, _ in target) == sorted(name for name, _ in source):
        by_name = dict(source)
        return [by_name[name] for name, _ in target]
    if [tuple(t.shape) for _, t in target] == [tuple(t.shape) for _, t in source]:
        return [tensor for _, tensor in source]
    return [None] * len(target)


def _named_state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))


# ---- the implementations --------------------------------------------------------------------

def _device(tensors) -> contextlib.AbstractContextManager:
    first = next((t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None)
    return torch.cuda.device(first.device) if first is not None else contextlib.nullcontext()


def _outputs(result, fresh: bool = False):
    """The op's result as its schema says: one tensor or a tuple, dense and contiguous (the fake
    implementation promises contiguous outputs, so the real one delivers them)."""
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    values = [torch.empty(v.shape, dtype=v.dtype, device=v.device) if fresh else v.contiguous() for v in values]
    return tuple(values) if TUPLE else values[0]


def _forward(handle: int, state: list[torch.Tensor], *inputs: torch.Tensor):
    module, _ = _entry(handle)
    with torch.no_grad(), _device(inputs), _swapped(module, state):
        result = _outputs(_bound["candidate"].forward(module, *inputs))
    # evo rejects outputs that share memory with an input, but not with the module's own tensors;
    # an op's outputs may alias neither.
    taken = {t.untyped_storage().data_ptr() for t in (*state, *inputs)}
    values = [v.clone() if v.untyped_storage().data_ptr() in taken else v for v in
              (result if isinstance(result, tuple) else (result,))]
    return tuple(values) if TUPLE else values[0]


def _forward_fake(handle: int, state: list[torch.Tensor], *inputs: torch.Tensor):
    module, reference = _entry(handle)
    device = next((t.device for t in (*inputs, *state)), torch.device("cpu"))
    given = list(zip((name for name, _ in _named_state(module)), state))
    wanted = _named_state(reference)
    tensors = {}
    for (name, meta), mine in zip(wanted, matching_state(wanted, given)):
        usable = mine is not None and tuple(mine.shape) == tuple(meta.shape)
        tensors[name] = mine if usable else torch.empty(meta.shape, dtype=meta.dtype, device=device)
    with torch.device(device):
        return _outputs(torch.func.functional_call(reference, tensors, tuple(inputs)), fresh=True)


def _save_for_backward(ctx, inputs, output) -> None:
    handle, state, *tensors = inputs
    ctx.handle, ctx.state_count = handle, len(state)
    ctx.save_for_backward(*state, *tensors)


def _gradients(ctx, *grads):
    saved = list(ctx.saved_tensors)
    state, inputs = saved[:ctx.state_count], saved[ctx.state_count:]
    found = torch.ops.__evo_package__.backward(ctx.handle, state, inputs, list(grads))
    found = [g if t.is_floating_point() or t.is_complex() else None for g, t in zip(found, saved)]
    return (None, found[:ctx.state_count], *found[ctx.state_count:])


def _backward(handle: int, state: list[torch.Tensor], inputs: list[torch.Tensor], grads: list):
    if not HAS_BACKWARD:
        raise RuntimeError(NO_BACKWARD)
    module, _ = _entry(handle)
    return _on_fresh_thread(_recompute, module, state, inputs, grads)


def _backward_fake(handle: int, state: list[torch.Tensor], inputs: list[torch.Tensor], grads: list):
    return [torch.empty_like(t) for t in (*state, *inputs)]


def _recompute(module, state, inputs, grads) -> list[torch.Tensor]:
    """The candidate's forward again, with autograd recording, then its gradients."""
    leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in (*state, *inputs)]
    with torch.enable_grad(), _device(leaves), _swapped(module, leaves[:len(state)]):
        result = _bound["candidate"].forward(module, *leaves[len(state):])
        outputs = list(result) if isinstance(result, (list, tuple)) else [result]
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                         allow_unused=True) if pairs and wanted else [None] * len(wanted))
    # An op's outputs may not alias its inputs or each other (autograd hands x + y's gradient to
    # both x and y as one tensor): copies where they would.
    taken = {t.untyped_storage().data_ptr() for t in (*state, *inputs, *grads) if t is not None}
    result = []
    for leaf in leaves:
        grad = next(found) if leaf.requires_grad else None
        grad = torch.zeros_like(leaf) if grad is None else grad
        if grad.untyped_storage().data_ptr() in taken:
            grad = grad.clone()
        taken.add(grad.untyped_storage().data_ptr())
        result.append(grad)
    return result


def _on_fresh_thread(function, *args):
    """Run `function` on a new thread and wait for it. A custom op's implementation runs with
    autograd's dispatch keys excluded for its thread; a new thread starts from torch's defaults,
    so autograd records there (on the caller's CUDA stream)."""
    stream = torch.cuda.current_stream() if DEVICE == "cuda" and torch.cuda.is_available() else None
    box: dict = {}

    def run():
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                box["value"] = function(*args)
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=run, name=f"{PACKAGE}-backward")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- what the package offers ----------------------------------------------------------------

def call(module: torch.nn.Module, *inputs: torch.Tensor):
    """Model.forward: the op on the module's handle, state and inputs; or, in eager mode when no
    gradient is recorded and the inputs are plain tensors on the kernel's device, the candidate's
    forward directly, which is the op's own implementation without the dispatch (tens of
    microseconds of host time per call, as much as a short kernel takes)."""
    if not torch.compiler.is_compiling() and _plain(inputs) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *state_of(module)))):
        result = _outputs(_bound["candidate"].forward(module, *inputs))
    else:
        result = torch.ops.__evo_package__.forward(module._evo_handle, state_of(module), *inputs)
    return (result,) if MANIFEST["output_is_sequence"] and not TUPLE else result  # as the reference returns it


def _plain(inputs: tuple) -> bool:
    return all(type(t) is torch.Tensor and t.device.type == DEVICE for t in inputs)


def op_arguments(module: torch.nn.Module, *inputs: torch.Tensor, detach: bool = True) -> tuple:
    """The arguments the forward op takes for this module and inputs, e.g. for torch.library.opcheck."""
    state = state_of(module)
    return (module._evo_handle, [t.detach() for t in state] if detach else state, *inputs)


def swap_in(model: torch.nn.Module, target, *, make=None) -> list[str]:
    """Put this kernel's Model in place of every submodule of `model` that `target` matches (a
    class, or a function of (name, module) that returns True), in place; returns their names.

    Each replacement is make(old) when given; else Model(*reference.get_init_inputs()), with
    old's parameters and buffers copied in (by name, or in order when only the names differ),
    on old's device and floating dtype, in old's training mode.
    """
    model_class = _bound["model"]
    matches = (lambda name, module: isinstance(module, target)) if isinstance(target, type) else target
    if matches("", model):
        raise ValueError(f"{PACKAGE}.swap_in replaces submodules; the model itself matches, so use "
                         f"{PACKAGE}.Model in its place")
    replaced: list[str] = []
    for name, old in list(model.named_modules()):
        inside = any(name.startswith(done + ".") for done in replaced)
        if not name or inside or isinstance(old, model_class) or not matches(name, old):
            continue
        new = make(old) if make is not None else _replacement(old, model_class)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, new)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"{PACKAGE}.swap_in found no submodule matching {target!r} in the model")
    return replaced


def _replacement(old: torch.nn.Module, model_class: type) -> torch.nn.Module:
    new = model_class(*_bound["reference"].get_init_inputs())
    tensors = [t for _, t in _named_state(old)]
    floating = next((t for t in tensors if t.is_floating_point()), None)
    if tensors:
        new.to(device=tensors[0].device)
    if floating is not None:
        new.to(dtype=floating.dtype)
    mine, theirs = _named_state(new), _named_state(old)
    if len(mine) != len(theirs):
        raise ValueError(f"{PACKAGE}.swap_in cannot carry {type(old).__name__}'s {len(theirs)} parameters and buffers "
                         f"over to the kernel's {len(mine)}; pass make= to build each replacement yourself")
    found = matching_state(mine, theirs)
    if any(t is None for t in found):
        raise ValueError(f"{PACKAGE}.swap_in cannot match {type(old).__name__}'s parameters and buffers "
                         f"({', '.join(n for n, _ in theirs)}) to the kernel's ({', '.join(n for n, _ in mine)}); "
                         "pass make= to build each replacement yourself")
    with torch.no_grad():
        for (_, target), source in zip(mine, found):
            target.copy_(source)
    return new.train(old.training)
