"""Builds the kernel's extensions from __evo_package__/csrc/ (`pip install --no-build-isolation .`;
without --no-build-isolation pip would fetch another torch to build against).

TORCH_CUDA_ARCH_LIST defaults to the architecture of the GPU evo measured the kernel on; set it
to build for others (e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0"). EVO_EXPORT_JIT=1 skips the build: the
package then builds its extensions just in time, on first import.
"""

import json
import os
from pathlib import Path

from setuptools import setup

PACKAGE = "__evo_package__"
MANIFEST = json.loads((Path(__file__).resolve().parent / PACKAGE / "_manifest.json").read_text())


def extensions() -> list:
    if os.environ.get("EVO_EXPORT_JIT") == "1" or not MANIFEST["extensions"]:
        return []
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if MANIFEST["arch"]:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", MANIFEST["arch"])
    built = []
    for entry in MANIFEST["extensions"]:
        kind = CUDAExtension if entry["with_cuda"] else CppExtension
        built.append(kind(name=f"{PACKAGE}.{entry['name']}",  # the module name evo built it under
                          sources=[f"{PACKAGE}/{source}" for source in entry["sources"]],
                          include_dirs=entry["extra_include_paths"],
                          extra_compile_args={"cxx": entry["extra_cflags"], "nvcc": entry["extra_cuda_cflags"]},
                          extra_link_args=entry["extra_ldflags"]))
    return built


def command_classes(modules: list) -> dict:
    if not modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


modules = extensions()
setup(ext_modules=modules, cmdclass=command_classes(modules))
