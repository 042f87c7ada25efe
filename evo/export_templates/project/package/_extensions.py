"""The kernel's compiled extensions: the ones `pip install` built from csrc/, or, where there are
none (the package used from its folder, or installed with EVO_EXPORT_JIT=1) or they do not load
(a different torch), the same sources built just in time on first use by
torch.utils.cpp_extension.load, with the candidate's own flags.

candidate.py is the verified file, unchanged: while it is imported or constructed (as_verified()),
its load_inline/load calls are answered here, and torch.cuda.is_available() answers as it did
when evo verified it, so it takes the same branch and gets the extension evo measured.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
MANIFEST = json.loads((HERE / "_manifest.json").read_text())
PACKAGE = __package__
_load_inline, _load = cpp_extension.load_inline, cpp_extension.load  # torch's own, never the stand-ins
_loaded: dict[str, object] = {}
BUILDS: dict[str, str] = {}  # extension name -> "prebuilt PATH" or "built just in time PATH"


def extension(name: str, *args, **kwargs):
    """What load_inline(name, ...) or load(name, ...) returned to the candidate under evo: the
    extension built from csrc/NAME/ (the arguments are those sources, already in csrc/)."""
    entry = next((entry for entry in MANIFEST["extensions"] if entry["name"] == name), None)
    if entry is None:
        known = ", ".join(entry["name"] for entry in MANIFEST["extensions"]) or "none"
        raise RuntimeError(f"the kernel asked for an extension named {name!r}, which is not part of {PACKAGE} "
                           f"(it has {known}); export the candidate again with `python -m evo export`")
    if name not in _loaded:
        _loaded[name] = _prebuilt(entry)
        if _loaded[name] is None:
            _loaded[name] = _just_in_time(entry)
    return _loaded[name]


def _prebuilt(entry: dict):
    qualified = f"{PACKAGE}.{entry['name']}"
    spec = importlib.util.find_spec(qualified) or _installed_copy(qualified)
    if spec is None or spec.origin is None:
        return None
    try:
        if not entry["is_python_module"]:
            result = _load_library(spec.origin)
        elif qualified in sys.modules:
            result = sys.modules[qualified]
        else:
            result = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(result)
            sys.modules[qualified] = result
    except (ImportError, OSError, RuntimeError) as err:
        warnings.warn(f"{PACKAGE}: the prebuilt extension {entry['name']} does not load ({err}); "
                      "building it just in time instead", stacklevel=3)
        return None
    BUILDS[entry["name"]] = f"prebuilt {spec.origin}"
    return result


def _installed_copy(qualified: str):
    """The extension pip installed for this same export, when the package itself is imported from
    its source folder (benchmark.py, or pytest run from the project's folder)."""
    name = qualified.rpartition(".")[2]
    for distribution in importlib.metadata.distributions(name=MANIFEST["distribution"]):
        files = {file.parts: file for file in distribution.files or [] if file.parts[:1] == (PACKAGE,)}
        manifest = files.get((PACKAGE, "_manifest.json"))
        if manifest is None or json.loads(Path(manifest.locate()).read_text()) != MANIFEST:
            continue  # not installed from this export
        for parts, file in files.items():
            if len(parts) == 2 and file.name.startswith(name + ".") and file.name.endswith(
                    tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                return importlib.util.spec_from_file_location(qualified, file.locate())
    return None


def _load_library(path: str) -> str:
    torch.ops.load_library(path)
    return path


def _just_in_time(entry: dict):
    try:
        result = _load(name=entry["name"], sources=[str(HERE / source) for source in entry["sources"]],
                       extra_cflags=entry["extra_cflags"], extra_cuda_cflags=entry["extra_cuda_cflags"],
                       extra_ldflags=entry["extra_ldflags"], extra_include_paths=entry["extra_include_paths"],
                       with_cuda=entry["with_cuda"], is_python_module=entry["is_python_module"])
    except Exception as err:
        needs = "the CUDA toolkit and a CUDA build of torch" if entry["with_cuda"] else "a C++ compiler"
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(f"{PACKAGE}: the extension {entry['name']} was not prebuilt here, and building it just in "
                           f"time failed ({type(err).__name__}: {first}); the build needs {needs}, or install the "
                           "package with `pip install --no-build-isolation` where it can be built") from err
    BUILDS[entry["name"]] = f"built just in time {result if isinstance(result, str) else result.__file__}"
    return result


@contextlib.contextmanager
def as_verified():
    """While the candidate's code runs at import or construction: its extension builds answered
    from csrc/, and torch.cuda.is_available() as it was when evo verified the kernel."""
    saved = cpp_extension.load_inline, cpp_extension.load, torch.cuda.is_available
    cpp_extension.load_inline = cpp_extension.load = extension
    torch.cuda.is_available = lambda: MANIFEST["device"] == "cuda"
    try:
        yield
    finally:
        cpp_extension.load_inline, cpp_extension.load, torch.cuda.is_available = saved


def build_report() -> dict[str, str]:
    """How each extension was loaded in this process: prebuilt (by pip install) or just in time."""
    return dict(BUILDS)
