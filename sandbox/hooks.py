"""Hooks installed before a candidate is imported: where its extensions are built,
which compiler flags it may use, and whether its compiled functions are called.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
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


def install(extensions_root: str, allow_reduced_precision: bool, ledger: ExtensionLedger) -> None:
    """Route load_inline/load through the build cache and the flag policy."""
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
            digest = hashlib.sha256(repr((kind, name, args, sorted(kwargs.items(), key=lambda kv: kv[0]),
                                          torch.__version__, os.environ.get("TORCH_CUDA_ARCH_LIST"))).encode()).hexdigest()[:24]
            build_dir = Path(extensions_root) / f"{name}-{digest}"
            build_dir.mkdir(parents=True, exist_ok=True)
            kwargs["build_directory"] = str(build_dir)
            kwargs.pop("verbose", None)
            with _exclusive(build_dir):
                module = original(name, *args, **kwargs)
            ledger.extensions.append({"name": name, "build_directory": str(build_dir), "flags": flags})
            if not isinstance(module, str):
                _count_calls(module, ledger)
            return module

        return wrapper

    cpp_extension.load_inline = guarded(original_load_inline, "load_inline")
    cpp_extension.load = guarded(original_load, "load")


def _flags_of(kwargs: dict) -> list[str]:
    flags = []
    for key in ("extra_cflags", "extra_cuda_cflags", "extra_ldflags"):
        value = kwargs.get(key) or []
        flags.extend([value] if isinstance(value, str) else list(value))
    return [str(flag) for flag in flags]


class _exclusive:
    """An exclusive lock on a build directory that dies with its holder.

    torch's own lock file outlives a killed build and would block the next one forever,
    so it is removed while this lock is held.
    """

    def __init__(self, build_dir: Path):
        self.path = build_dir / "evo.lock"

    def __enter__(self):
        self.handle = open(self.path, "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        stale = self.path.parent / "lock"
        if stale.exists():
            stale.unlink()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


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
