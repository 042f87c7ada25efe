"""Cheat: custom code only when watched. torch.relu does the work; the compiled extension is
called (a no-op) only while torch's profiler is active, which is when the evaluator profiles
the call that decides whether the candidate's own code runs.
Meant to be caught by: custom_code. The profiled call counts one extension call, its checked
calls none: verified before session 24, which compares the two.
"""

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


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._autograd._profiler_enabled():
            kit.noop(x)
        return torch.relu(x)
