"""What `python -m evo export` needs from a candidate and its task, read by importing them here,
in a child process (evo itself never imports candidate code):

    python extract.py TASK.py CANDIDATE.py DEVICE OUT_DIR

DEVICE is cpu or cuda, the kind of device the candidate was verified on: torch.cuda.is_available()
answers accordingly while the candidate is imported and constructed, so it takes the branch it
took under the evaluator. Every torch.utils.cpp_extension.load_inline/load call it makes is
recorded instead of compiled, and its sources are written under OUT_DIR/csrc/NAME/ exactly as
load_inline writes them (its implicit headers and generated pybind11 bindings included); NVRTC
sources passed to torch.cuda._compile_kernel go to OUT_DIR/csrc/nvrtc/. The rest (the task's
signatures, inputs, outputs and free sizes, the candidate's autograd Functions) goes to
OUT_DIR/extract.json as {"ok": true, ...} or {"ok": false, "error": ...}.
Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import random
import re
import sys
import traceback
import types
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

CSRC = "csrc"


class Recorder:
    """Stands in for load_inline, load and _compile_kernel: keeps their arguments, builds nothing."""

    def __init__(self, out: Path):
        self.out = out
        self.extensions: list[dict] = []
        self.nvrtc: list[dict] = []

    def load_inline(self, name, cpp_sources, cuda_sources=None, sycl_sources=None, functions=None, extra_cflags=None,
                    extra_cuda_cflags=None, extra_sycl_cflags=None, extra_ldflags=None, extra_include_paths=None,
                    build_directory=None, verbose=False, with_cuda=None, with_sycl=None, is_python_module=True,
                    with_pytorch_error_handling=True, keep_intermediates=True, use_pch=False,
                    no_implicit_headers=False):
        if sycl_sources:
            raise RuntimeError("SYCL sources cannot be exported")
        cpp = [cpp_sources] if isinstance(cpp_sources, str) else list(cpp_sources)
        cuda = [cuda_sources] if isinstance(cuda_sources, str) else list(cuda_sources or [])
        if not no_implicit_headers:  # what load_inline prepends
            cpp.insert(0, "#include <torch/extension.h>")
        if functions is not None:  # the bindings load_inline generates
            functions = {functions: functions} if isinstance(functions, str) else functions
            functions = functions if isinstance(functions, dict) else {f: f for f in functions}
            wrap = "torch::wrap_pybind_function({})" if with_pytorch_error_handling else "{}"
            cpp += ["PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {",
                    *[f'm.def("{f}", {wrap.format(f)}, "{doc}");' for f, doc in functions.items()], "}"]
        files = {"main.cpp": "\n".join(cpp)}
        if cuda:
            if not no_implicit_headers:
                cuda[0:0] = ["#include <torch/types.h>", "#include <cuda.h>", "#include <cuda_runtime.h>"]
            files["cuda.cu"] = "\n".join(cuda)
        return self._record("load_inline", name, files, list(functions or []), bool(cuda) if with_cuda is None
                            else bool(with_cuda), is_python_module, extra_cflags, extra_cuda_cflags, extra_ldflags,
                            extra_include_paths)

    def load(self, name, sources, extra_cflags=None, extra_cuda_cflags=None, extra_sycl_cflags=None, extra_ldflags=None,
             extra_include_paths=None, build_directory=None, verbose=False, with_cuda=None, with_sycl=None,
             is_python_module=True, is_standalone=False, keep_intermediates=True):
        sources = [sources] if isinstance(sources, str) else list(sources)
        files: dict[str, str] = {}
        for position, source in enumerate(sources):
            base = Path(source).name
            files[base if base not in files else f"{position}_{base}"] = Path(source).read_text()
        cuda = any(Path(source).suffix in (".cu", ".cuh") for source in sources)
        return self._record("load", name, files, None, cuda if with_cuda is None else bool(with_cuda),
                            is_python_module, extra_cflags, extra_cuda_cflags, extra_ldflags, extra_include_paths)

    def _record(self, kind, name, files, functions, with_cuda, is_python_module, cflags, cuda_cflags, ldflags,
                include_paths):
        if any(entry["name"] == name for entry in self.extensions):
            raise RuntimeError(f"the candidate builds two extensions named {name}; export needs distinct names")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RuntimeError(f"extension name {name!r} is not a Python identifier")
        folder = self.out / CSRC / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, text in files.items():
            (folder / file_name).write_text(text if text.endswith("\n") else text + "\n")
        self.extensions.append({
            "name": name, "kind": kind, "sources": [f"{CSRC}/{name}/{file_name}" for file_name in files],
            "functions": functions, "with_cuda": with_cuda, "is_python_module": bool(is_python_module),
            "extra_cflags": flag_list(cflags), "extra_cuda_cflags": flag_list(cuda_cflags),
            "extra_ldflags": flag_list(ldflags), "extra_include_paths": flag_list(include_paths)})
        if not is_python_module:
            return ""
        stub = types.ModuleType(name)
        for function in functions or []:
            setattr(stub, function, not_built(name, function))
        return stub

    def compile_kernel(self, kernel_source, kernel_name, *args, **kwargs):
        folder = self.out / CSRC / "nvrtc"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{kernel_name}.cu").write_text(kernel_source)
        self.nvrtc.append({"kernel": kernel_name, "source": f"{CSRC}/nvrtc/{kernel_name}.cu"})
        return not_built("nvrtc", kernel_name)


def flag_list(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(flag) for flag in value]


def not_built(extension: str, function: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{extension}.{function} was not built: evo export only reads the candidate")
    return call


def import_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def code_names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the code nested in it) reads."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= code_names(constant)
    return names


def class_names(cls: type) -> set[str]:
    names: set[str] = set()
    for value in vars(cls).values():
        function = getattr(value, "__func__", value)
        if isinstance(function, types.FunctionType):
            names |= code_names(function.__code__)
    return names


def free_sizes(task) -> dict[str, int]:
    """Module-level ints that get_inputs reads and nothing else of the task does: the sizes a test
    may change without breaking the model's construction."""
    used_elsewhere = code_names(task.get_init_inputs.__code__) | class_names(task.Model)
    return {name: value for name in sorted(code_names(task.get_inputs.__code__) - used_elsewhere)
            if type(value := getattr(task, name, None)) is int and value > 0}


def describe(value) -> list[dict] | None:
    """Each element's dtype and shape; None unless value is a tensor or a list or tuple of tensors."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    return [{"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for v in values]


def run_reference(task, init: list) -> tuple[list, object]:
    """The task's inputs and the reference's result at the task's shapes: on the meta device when
    the task allows it (nothing computed, nothing allocated), else on the CPU."""
    try:
        with torch.device("meta"):
            inputs = list(task.get_inputs())
            return inputs, task.Model(*init)(*inputs)
    except Exception:
        torch.manual_seed(0)
        inputs = list(task.get_inputs())
        with torch.no_grad():
            return inputs, task.Model(*init)(*inputs)


def parameter_names(signature: inspect.Signature, count: int) -> list[str]:
    """Names for the first `count` forward arguments: the reference's own where it has them."""
    params = [p for p in list(signature.parameters.values())[1:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:count]]
    reserved = {"handle", "state", "self", "grads", "inputs"}
    if len(names) < count or len(set(names)) < count or set(names) & reserved:
        return [f"input_{i}" for i in range(count)]
    return names


def portable_signature(function) -> str | None:
    """The signature as text that defines the same parameters elsewhere: None when a default
    value does not survive repr() (an object, a NaN)."""
    signature = inspect.signature(function)
    for parameter in signature.parameters.values():
        if parameter.default is not parameter.empty:
            try:
                same = eval(repr(parameter.default), {"torch": torch, "inf": math.inf}) == parameter.default
            except Exception:
                same = False
            if not same:
                return None
    return str(signature)


def backward_functions(module) -> list[str]:
    """The torch.autograd.Function subclasses the candidate defines with a backward of their own."""
    found = []
    for name, value in vars(module).items():
        if isinstance(value, type) and issubclass(value, torch.autograd.Function) and value is not torch.autograd.Function \
                and getattr(value, "__module__", None) == module.__name__ and "backward" in vars(value):
            found.append(name)
    return found


def from_triton(value) -> bool:
    """A Triton module, or an object Triton made (a @triton.jit kernel)."""
    if isinstance(value, types.ModuleType):
        return value.__name__.partition(".")[0] == "triton"
    return type(value).__module__.partition(".")[0] == "triton"


def state_layout(model: torch.nn.Module) -> list[dict]:
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [{"name": name, "shape": list(tensor.shape)} for name, tensor in tensors]


def extract(task_path: str, candidate_path: str, device: str, out: Path) -> dict:
    recorder = Recorder(out)
    notes: list[str] = []
    cpp_extension.load_inline, cpp_extension.load = recorder.load_inline, recorder.load
    if hasattr(torch.cuda, "_compile_kernel"):
        torch.cuda._compile_kernel = recorder.compile_kernel
    torch.cuda.is_available = lambda: device == "cuda"  # as it answered under the evaluator

    task = import_file(task_path, "evo_export_task")
    init = list(task.get_init_inputs())
    candidate = import_file(candidate_path, "evo_export_candidate")
    model_new = getattr(candidate, "ModelNew", None)
    if not (isinstance(model_new, type) and issubclass(model_new, torch.nn.Module)):
        return {"ok": False, "error": "the candidate's ModelNew is not a subclass of torch.nn.Module"}
    random.seed(0)
    torch.manual_seed(0)
    layout = None
    try:  # extensions built in the constructor are recorded too
        layout = state_layout(model_new(*init))
    except Exception as err:
        notes.append(f"ModelNew(*get_init_inputs()) raised {type(err).__name__} at export: {str(err)[:200]}; "
                     "extensions its constructor builds were not recorded")
    inputs, result = run_reference(task, init)
    outputs = describe(result)
    if outputs is None or not all(isinstance(v, torch.Tensor) for v in inputs):
        return {"ok": False, "error": "the task's inputs and outputs must be tensors, or lists or tuples of tensors"}
    try:
        with torch.device("meta"):
            reference_layout = state_layout(task.Model(*init))
    except Exception:
        reference_layout = state_layout(task.Model(*init))
    return {
        "ok": True, "extensions": recorder.extensions, "nvrtc": recorder.nvrtc,
        "uses_triton": any(from_triton(value) for value in vars(candidate).values()),
        "uses_nvrtc": bool(recorder.nvrtc) or "_compile_kernel" in Path(candidate_path).read_text(),
        "backward_functions": backward_functions(candidate),
        "init_signature": portable_signature(task.Model.__init__),
        "forward_signature": str(inspect.signature(task.Model.forward)),
        "init_inputs": repr(init),
        "input_names": parameter_names(inspect.signature(task.Model.forward), len(inputs)),
        "inputs": describe(inputs) or [], "outputs": outputs, "output_is_sequence": isinstance(result, (list, tuple)),
        "free_sizes": free_sizes(task), "state": layout, "reference_state": reference_layout, "notes": notes}


def main() -> None:
    task_path, candidate_path, device, out = sys.argv[1:5]
    out_dir = Path(out)
    try:
        report = extract(task_path, candidate_path, device, out_dir)
    except Exception as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
        where = f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})" if frames else ""
        report = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip()[:300]}{where}"}
    (out_dir / "extract.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
