"""Cheat: answer the parent with a malformed description of the outputs. Replaces the frame
writer the runner uses (found in sys.modules["__main__"]) with one that drops "structure" (the
outputs' types, devices and aliasing) from the frame that describes a call's outputs, hoping
the parent skips what it is not told, or crashes. Caught by: runs (the parent requires every
field of the description).
"""

import sys

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

KIT_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>

// Writes relu(x) into the first `count` elements of `out` (which may be `x` itself).
void relu_into(torch::Tensor x, torch::Tensor out, int64_t count) {
    TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.scalar_type() == torch::kFloat, "contiguous float32");
    const float* in = x.data_ptr<float>();
    float* o = out.data_ptr<float>();
    count = std::min(count, std::min(x.numel(), out.numel()));
    for (int64_t i = 0; i < count; ++i) o[i] = in[i] > 0.f ? in[i] : 0.f;
}

torch::Tensor relu(torch::Tensor x) {
    auto y = torch::empty_like(x);
    relu_into(x, y, x.numel());
    return y;
}

// Writes relu(x - shift) only where it is positive; the zeros are left to the allocator.
void shifted_relu_positive_only(torch::Tensor x, torch::Tensor out, double shift) {
    const float* in = x.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const float s = static_cast<float>(shift);
    for (int64_t i = 0; i < x.numel(); ++i)
        if (in[i] > s) o[i] = in[i] - s;
}

// Does nothing: lets a candidate say its extension ran.
void noop(torch::Tensor x) {}

// Naive C = A @ B for square float32 matrices.
torch::Tensor matmul(torch::Tensor a, torch::Tensor b) {
    TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "contiguous");
    const int64_t n = a.size(0), k = a.size(1), m = b.size(1);
    auto c = torch::zeros({n, m}, a.options());
    const float* A = a.data_ptr<float>(); const float* B = b.data_ptr<float>(); float* C = c.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
        for (int64_t p = 0; p < k; ++p) {
            const float s = A[i * k + p];
            for (int64_t j = 0; j < m; ++j) C[i * m + j] += s * B[p * m + j];
        }
    return c;
}
"""

kit = load_inline("evo_cpu_cheat_kit", cpp_sources=KIT_SOURCE,
                  functions=["relu_into", "relu", "noop", "matmul", "shifted_relu_positive_only"])


_main = sys.modules.get("__main__")
if _main is not None and hasattr(_main, "_write_frame"):
    _write = _main._write_frame

    def _drop_structure(fd, header, payload=b""):
        if isinstance(header, dict) and "flags_changed" in header and "structure" in header:
            header = {key: value for key, value in header.items() if key != "structure"}
        return _write(fd, header, payload)

    _main._write_frame = _drop_structure


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kit.relu(x)
