"""Hooks installed before a candidate is imported: where its extensions are built,
which compiler flags it may use, and whether its compiled functions are called.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

if __package__:  # read as evo.sandbox.hooks (its lists, by the tests)
    from . import precompiled, preprocessed
else:  # in a sandbox, beside the other sandbox modules
    import precompiled
    import preprocessed

# Flags that trade accuracy for speed, -ffast-math's parts included; refused unless reduced
# precision is allowed. A flag containing one of these (-Xcompiler=-ffast-math) counts too.
REDUCED_PRECISION_FLAGS = ("-use_fast_math", "--use_fast_math", "-ffast-math", "-Ofast", "--ftz=true",
                           "-ftz=true", "--prec-div=false", "-prec-div=false", "--prec-sqrt=false",
                           "-prec-sqrt=false", "-funsafe-math-optimizations", "-ffinite-math-only",
                           "-fassociative-math", "-freciprocal-math", "-fno-signed-zeros", "-fno-trapping-math",
                           "-fcx-limited-range", "-fcx-fortran-rules", "-ffp-model=fast", "-ffp-model=aggressive")


class ExtensionLedger:
    """What the candidate built and called: filled by the hooks, read by the runner."""

    def __init__(self) -> None:
        self.extensions: list[dict] = []  # name, build directory, flags of each extension loaded
        self.refused_flags: list[str] = []
        self.calls = 0  # calls into compiled extension functions
        self.profiling = False  # whether calls are timed, into extension_us
        self.extension_us: dict[str, float] = {}  # µs in each extension function (EXTENSION_RANGE + its name)
        self.precompiled = 0  # extensions compiled with a precompiled torch header
        self.headers_wanted: list[dict] = []  # precompiled.spec of builds that found no header for theirs


def install(cache_root: str, private_root: str, allow_reduced_precision: bool, ledger: ExtensionLedger,
            headers_root: str | None = None, compile_elsewhere=None) -> None:
    """Route load_inline/load through the build cache and the flag policy.

    Each extension is built in `private_root`, a directory of this sandbox's own, starting from
    a copy of its entry in `cache_root` when there is one (read-only here; only the parent adds
    to it), so nothing a candidate writes reaches another candidate's build. A load_inline build
    whose flags have a precompiled torch header in `headers_root` (read-only here too) includes
    it first. With `compile_elsewhere` (the build sandbox, where the candidate's import code runs
    beside the hooks), a build missing from the cache is asked of evo, which has it compiled
    from these arguments by a sandbox that runs no candidate code and puts it in the cache.
    """
    original_load_inline = cpp_extension.load_inline
    original_load = cpp_extension.load
    toolchain = _toolchain()  # as the evaluator started this process, before any candidate code

    def guarded(original, kind):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(name, *args, **kwargs):
            # Every argument by its name, however it was passed: flags passed by position count too.
            kwargs = _normalized(signature.bind(name, *args, **kwargs).arguments)
            del kwargs["name"]
            flags = _flags_of(kwargs)
            refusal = _refusal(kwargs, flags, toolchain, allow_reduced_precision)
            if refusal is not None:
                ledger.refused_flags.extend(refusal[0])
                raise RuntimeError(refusal[1])
            entry = _entry_name(kind, name, kwargs, flags, allow_reduced_precision)
            build_dir = Path(private_root) / entry
            cached = Path(cache_root) / entry
            # Only what the arguments hold whole: files that `load` or include paths name may lie where
            # the compiling sandbox cannot read them; such builds stay here, and out of the cache.
            remote = compile_elsewhere is not None and kind == "load_inline" and not kwargs.get("extra_include_paths")
            portable = _portable(kwargs) if remote else None
            library, python_module = cached / f"{name}.so", kwargs.get("is_python_module", True)
            if portable is not None and python_module and not library.is_file():
                compile_elsewhere({"kind": kind, "name": name, "kwargs": portable,
                                   "environment": {key: os.environ.get(key) for key in KEYED_VARIABLES}})
            if python_module and library.is_file():
                # torch's build files name absolute paths, so a copy elsewhere would rebuild:
                # load the cached library itself, from a private copy.
                build_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(library, build_dir / f"{name}.so")
                module = cpp_extension._import_module_from_library(name, str(build_dir), True)
            else:
                build_dir.mkdir(parents=True, exist_ok=True)
                kwargs["build_directory"] = str(build_dir)
                kwargs.pop("verbose", None)
                if kind == "load_inline" and headers_root:
                    _include_precompiled_header(kwargs, Path(headers_root), ledger)
                module = original(name, **kwargs)
                asked = [] if allow_reduced_precision else _fast_math_once_preprocessed(name, build_dir)
                if asked:
                    ledger.refused_flags.extend(asked)
                    raise RuntimeError(f"the source asks for fast math once preprocessed ({asked[0][:200]}), which "
                                       "reduces floating-point precision and the evaluator's policy forbids")
            ledger.extensions.append({"name": name, "entry": entry, "build_directory": str(build_dir), "flags": flags})
            if not isinstance(module, str):
                _count_calls(module, ledger)
            return module

        return wrapper

    cpp_extension.load_inline = guarded(original_load_inline, "load_inline")
    cpp_extension.load = guarded(original_load, "load")


def _entry_name(kind: str, name: str, kwargs: dict, flags: list[str], allow_reduced_precision: bool) -> str:
    """The build's name in the cache: the extension's name and a hash of all that shapes the build.
    The policy is part of it: a build is checked once preprocessed only when it is made, so a
    library built while fast math was allowed must never serve a verification that forbids it."""
    digest = hashlib.sha256(repr((kind, name, sorted(kwargs.items(), key=lambda kv: kv[0]), flags, torch.__version__,
                                  os.environ.get("TORCH_CUDA_ARCH_LIST"), allow_reduced_precision)).encode()).hexdigest()[:24]
    return f"{name}-{digest}"


def _refusal(kwargs: dict, flags: list[str], toolchain: dict, allow_reduced_precision: bool):
    """(what is refused, why) when the evaluator's policy forbids this build, else None."""
    chooser = [flag for flag in flags if TOOL_FLAG.search(flag)]
    if chooser:
        return chooser, (f"compiler flags {' '.join(chooser)} make the compiler run or read programs of the "
                         "candidate's choosing, which the evaluator does not allow")
    now = _toolchain()
    swapped = [name for name, value in now.items() if value != toolchain[name]]
    if swapped:
        return [f"{name}={now[name]}" for name in swapped], (
            f"the candidate changed {', '.join(swapped)}, through which the compiler and what it reads are chosen; "
            "extensions are built with the evaluator's toolchain and flags")
    if allow_reduced_precision:
        return None
    reducing = [flag for flag in flags if any(bad in flag for bad in REDUCED_PRECISION_FLAGS)]
    if reducing:
        return reducing, (f"compiler flags {' '.join(reducing)} reduce floating-point precision, which the "
                          "evaluator's policy forbids")
    asked = _fast_math_in_sources(kwargs)
    if asked:
        return asked, (f"the source asks for fast math ({asked[0]}), which reduces floating-point precision and "
                       "the evaluator's policy forbids")
    return None


def header_key(spec: dict) -> str:
    """Where the header precompiled for `spec` lies under the headers' root: GCC checks neither
    the headers nor the compiler it was made from, so their versions are part of the name."""
    identity = (spec["with_cuda"], spec["extra_cflags"], torch.__version__, torch.version.git_version,
                os.path.dirname(torch.__file__), os.environ.get("CXX", "c++"), sysconfig.get_paths()["include"])
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:24]


def _include_precompiled_header(kwargs: dict, root: Path, ledger: ExtensionLedger) -> None:
    """Put the precompiled header for this build's flags first in its binding file's compile, or
    note that there is none yet."""
    with_cuda = kwargs.get("with_cuda")
    wanted = precompiled.spec(bool(kwargs.get("cuda_sources")) if with_cuda is None else bool(with_cuda),
                              kwargs.get("extra_cflags"))
    if wanted is None:
        return
    header = root / header_key(wanted) / precompiled.HEADER
    if header.with_name(precompiled.HEADER + ".gch").is_file():
        kwargs["extra_cflags"] = [*wanted["extra_cflags"], "-include", str(header)]
        ledger.precompiled += 1
    elif wanted not in ledger.headers_wanted:
        ledger.headers_wanted.append(wanted)


# Variables through which compilers take flags the call's arguments do not show.
FLAG_VARIABLES = ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "PYTORCH_NVCC", "CFLAGS", "CXXFLAGS", "CPPFLAGS",
                  "LDFLAGS", "NVCC_CCBIN", "TORCH_NVCC_FLAGS")


# Flags that make a compiler run a program or load a library of the candidate's choosing: a compiler
# plugin could rewrite what it builds. A response file (@file) could hold any flag. -B takes a
# directory (-Bsymbolic, a linker flag, is not one); flags may come joined by =, commas or spaces.
TOOL_FLAG = re.compile(r"(?:^|[\s=,])(?:-fplugin|-B(?=$|[\s/.~$])|-wrapper|-specs|-ccbin|--compiler-bindir|-iplugindir)"
                       r"|(?:^|[\s=,])@")


def _normalized(arguments) -> dict:
    """The call's arguments as they key a build: tuples as lists and paths as strings, so that
    the same arguments, however spelled, key one build."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return str(value) if isinstance(value, Path) else value
    return {key: plain(value) for key, value in arguments.items()}


def _portable(kwargs: dict) -> dict | None:
    """The arguments as another process can take them (JSON), or None where they cannot go."""
    try:
        portable = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError):
        return None
    return portable if portable == kwargs else None


# Variables that choose which programs compile and link, or what they read besides the sources: a
# wrapper script named by one of them could add any flag unseen.
TOOLCHAIN_VARIABLES = ("CXX", "CC", "CUDAHOSTCXX", "PYTORCH_NVCC", "NVCC_CCBIN", "PATH", "CUDA_HOME", "CUDA_PATH",
                       "COMPILER_PATH", "GCC_EXEC_PREFIX", "LD_PRELOAD", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH")


def _toolchain() -> dict:
    chosen = {name: os.environ.get(name) for name in TOOLCHAIN_VARIABLES}
    chosen["torch.utils.cpp_extension.CUDA_HOME"] = cpp_extension.CUDA_HOME
    return chosen


# The variables a build's key depends on: what a compiling sandbox takes from the one that asks.
KEYED_VARIABLES = (*(name for name in FLAG_VARIABLES if name not in TOOLCHAIN_VARIABLES), "TORCH_CUDA_ARCH_LIST")


def _flags_of(kwargs: dict) -> list[str]:
    flags = [f"{name}={os.environ[name]}" for name in FLAG_VARIABLES if os.environ.get(name)]
    for key in ("extra_cflags", "extra_cuda_cflags", "extra_ldflags"):
        value = kwargs.get(key) or []
        flags.extend([value] if isinstance(value, str) else list(value))
    return [str(flag) for flag in flags]


# A build's preprocessing takes 1.5 s on a 2-core machine (torch/extension.h is 14 MB expanded).
PREPROCESS_TIMEOUT_S = 120

# Fast math's options as a source names them in `#pragma GCC optimize(...)`, `_Pragma` or
# `__attribute__((optimize(...)))`, with or without their leading -f or -; their no- forms, which
# ask for exact math, are not refused, while no-signed-zeros and no-trapping-math are the unsafe ones.
FAST_MATH_WORDS = re.compile(r"(?<!no-)(?:fast-math|Ofast|unsafe-math|associative-math|reciprocal-math|"
                             r"finite-math|cx-limited-range|cx-fortran-rules)|no-signed-zeros|no-trapping-math")
# String and character literals (kept, so a "//" inside one is no comment), then comments (dropped).
_LITERAL_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)
_ADJACENT_LITERALS = re.compile(r'"\s*"')  # "fast" "-math" is one literal to the compiler


def _fast_math_in_sources(kwargs: dict) -> list[str]:
    """Lines of the extension's sources that name a fast-math option. Outside comments such words
    appear where a source asks for that option (two variables `fast-math` subtracted would be
    refused too); a name that macros build from parts shows only once the sources are
    preprocessed (`_fast_math_once_preprocessed`)."""
    texts = []
    for key in ("cpp_sources", "cuda_sources"):
        value = kwargs.get(key) or []
        texts.extend([value] if isinstance(value, str) else [str(part) for part in value])
    for source in ([kwargs["sources"]] if isinstance(kwargs.get("sources"), str) else kwargs.get("sources") or []):
        try:
            texts.append(Path(source).read_text(errors="replace"))
        except OSError:
            pass  # the build itself says that a source cannot be read
    found = []
    for text in texts:
        found.extend(_fast_math_lines(_LITERAL_OR_COMMENT.sub(lambda m: m.group() if m.group()[0] in "\"'" else " ",
                                                              text.replace("\\\n", ""))))
    return found


def _fast_math_once_preprocessed(name: str, build_dir: Path) -> list[str]:
    """Lines of a finished build's preprocessed sources that name a fast-math option. A build
    that cannot be checked fails: its library is not used."""
    try:
        texts = preprocessed.preprocessed_sources(build_dir, PREPROCESS_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError, preprocessed.PreprocessingError) as err:
        raise RuntimeError(f"Error building extension '{name}': it compiled, but its sources could not be "
                           f"preprocessed to check them for fast math: {err}") from None
    return [line for text in texts for line in _fast_math_lines(text)]


def _fast_math_lines(code: str) -> list[str]:
    """The lines of comment-free code that name a fast-math option."""
    code = _ADJACENT_LITERALS.sub("", code)
    lines = []
    for start in sorted({code.rfind("\n", 0, match.start()) + 1 for match in FAST_MATH_WORDS.finditer(code)}):
        end = code.find("\n", start)
        lines.append(code[start:end if end >= 0 else None].strip())
    return lines


def _count_calls(module, ledger: ExtensionLedger) -> None:
    for attribute in dir(module):
        if attribute.startswith("_"):
            continue
        function = getattr(module, attribute)
        if callable(function) and not isinstance(function, type):
            setattr(module, attribute, _counted(function, f"{EXTENSION_RANGE}{attribute}", ledger))


# How a profiled call names the time spent in one of the candidate's extension functions: on a
# CPU, where there is no kernel list, that time is the candidate's own code, and the rest of the
# call the library's.
EXTENSION_RANGE = "evo_extension::"
_clock = time.perf_counter


def _counted(function, range_name: str, ledger: ExtensionLedger):
    @functools.wraps(function)
    def call(*args, **kwargs):
        ledger.calls += 1
        if not ledger.profiling:  # timed calls pay no clock reads
            return function(*args, **kwargs)
        started = _clock()
        try:
            return function(*args, **kwargs)
        finally:
            ledger.extension_us[range_name] = ledger.extension_us.get(range_name, 0.0) + (_clock() - started) * 1e6

    return call
