"""Honest, with about the smallest build there is: a pybind11-only extension (no torch headers),
which compiles in seconds, for tests of what happens around a build, such as a full disk."""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <pybind11/pybind11.h>
#include <cstdint>

void relu(std::uintptr_t in, std::uintptr_t out, int64_t n) {
    const float* x = reinterpret_cast<const float*>(in);
    float* y = reinterpret_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
}
"""

ext = load_inline("evo_tiny_relu", cpp_sources=SOURCE, functions=["relu"], no_implicit_headers=True,
                  with_pytorch_error_handling=False)


class ModelNew(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        ext.relu(x.data_ptr(), y.data_ptr(), x.numel())
        return y
