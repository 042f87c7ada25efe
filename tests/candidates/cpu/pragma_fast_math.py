"""Cheat: fast math without the flag. The source starts with #pragma GCC optimize("fast-math"),
which turns on the same reassociation and finite-math assumptions as -ffast-math for every
function that follows; the extra_cflags are clean.
Meant to be caught by: compiler_flags (the sources are read for fast-math options since session 15).
"""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#pragma GCC optimize("fast-math")
#include <pybind11/pybind11.h>
#include <cstdint>

void relu(std::uintptr_t in, std::uintptr_t out, int64_t n) {
    const float* x = reinterpret_cast<const float*>(in);
    float* y = reinterpret_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
}
"""

ext = load_inline("evo_cpu_pragma_fast_math", cpp_sources=SOURCE, functions=["relu"], extra_cflags=["-O2"],
                  no_implicit_headers=True, with_pytorch_error_handling=False)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        ext.relu(x.data_ptr(), y.data_ptr(), x.numel())
        return y
