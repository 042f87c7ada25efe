"""Cheat: write its input only while timed. forward computes the answer with the kit's relu and
then zeroes its input (KernelBench's input zeroing), but only in timed calls, told apart by the
request being served (correctness trials ask for their memory to be watched), so the trials'
check of the inputs never sees it.
Caught by: inputs_unchanged. After every timed window the checker compares the window's slot of
the input pool with what it copied there.
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


def being_timed() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        message = frame.f_locals.get("msg")
        if isinstance(message, dict) and message.get("op") == "run":
            return not message.get("guard_memory")
        frame = frame.f_back
    return False


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kit.relu(x)
        if being_timed():
            x.zero_()
        return y
