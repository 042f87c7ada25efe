"""Hooks installed before a candidate is imported: where its extensions are built,
which compiler flags it may use, and whether its compiled functions are called.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

# Flags that trade accuracy for speed; refused unless reduced precision is allowed.
REDUCED_PRECISION_FLAGS = ("-use_fast_math", "--use_fast_math", "-ffast-math", "-Ofast", "--ftz=true",
                           "-ftz=true", "--prec-div=false", "-prec-div=false", "--prec-sqrt=false",
                           "-prec-sqrt=false", "-funsafe-math-optimizations", "-ffinite-math-only")


class ExtensionLedger:
    """What the candidate built and called: filled by the hooks, read by the runner."""

    def __init__(self) -> None:
        self.extensions: list[dict] = []  # name, build directory, flags of each extension loaded
        self.refused_flags: list[str] = []
        self.calls = 0  # calls into compiled extension functions


def install(cache_root: str, private_root: str, allow_reduced_precision: bool, ledger: ExtensionLedger) -> None:
    """Route load_inline/load through the build cache and the flag policy.

    Each extension is built in `private_root`, a directory of this sandbox's own, starting from
    a copy of its entry in `cache_root` when there is one (read-only here; only the parent adds
    to it, after a build), so nothing a candidate writes reaches another candidate's build.
    """
    original_load_inline = cpp_extension.load_inline
    original_load = cpp_extension.load

    def guarded(original, kind):
        @functools.wraps(original)
        def wrapper(name, *args, **kwargs):
            flags = _flags_of(kwargs)
            refused = [flag for flag in flags if any(bad in flag for bad in REDUCED_PRECISION_FLAGS)]
            if refused and not allow_reduced_precision:
                ledger.refused_flags.extend(refused)
                raise RuntimeError(
                    f"compiler flags {' '.join(refused)} reduce floating-point precision, which the evaluator's policy forbids"
                )
            digest = hashlib.sha256(repr((kind, name, args, sorted(kwargs.items(), key=lambda kv: kv[0]), flags,
                                          torch.__version__, os.environ.get("TORCH_CUDA_ARCH_LIST"))).encode()).hexdigest()[:24]
            entry = f"{name}-{digest}"
            build_dir = Path(private_root) / entry
            cached = Path(cache_root) / entry
            if (cached / f"{name}.so").is_file() and kwargs.get("is_python_module", True):
                # torch's build files name absolute paths, so a copy elsewhere would rebuild:
                # load the cached library itself, from a private copy.
                build_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(cached / f"{name}.so", build_dir / f"{name}.so")
                module = cpp_extension._import_module_from_library(name, str(build_dir), True)
            else:
                build_dir.mkdir(parents=True, exist_ok=True)
                kwargs["build_directory"] = str(build_dir)
                kwargs.pop("verbose", None)
                module = original(name, *args, **kwargs)
            ledger.extensions.append({"name": name, "entry": entry, "build_directory": str(build_dir), "flags": flags})
            if not isinstance(module, str):
                _count_calls(module, ledger)
            return module

        return wrapper

    cpp_extension.load_inline = guarded(original_load_inline, "load_inline")
    cpp_extension.load = guarded(original_load, "load")


# Variables through which compilers take flags the call's arguments do not show.
FLAG_VARIABLES = ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "PYTORCH_NVCC", "CFLAGS", "CXXFLAGS", "CPPFLAGS",
                  "LDFLAGS", "NVCC_CCBIN", "TORCH_NVCC_FLAGS")


def _flags_of(kwargs: dict) -> list[str]:
    flags = [f"{name}={os.environ[name]}" for name in FLAG_VARIABLES if os.environ.get(name)]
    for key in ("extra_cflags", "extra_cuda_cflags", "extra_ldflags"):
        value = kwargs.get(key) or []
        flags.extend([value] if isinstance(value, str) else list(value))
    return [str(flag) for flag in flags]


def _count_calls(module, ledger: ExtensionLedger) -> None:
    for attribute in dir(module):
        if attribute.startswith("_"):
            continue
        function = getattr(module, attribute)
        if callable(function) and not isinstance(function, type):
            setattr(module, attribute, _counted(function, ledger))


def _counted(function, ledger: ExtensionLedger):
    @functools.wraps(function)
    def call(*args, **kwargs):
        ledger.calls += 1
        return function(*args, **kwargs)

    return call
