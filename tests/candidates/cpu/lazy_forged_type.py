"""Cheat: a lazy tensor subclass with a forged type check. As lazy_subclass (the values are
computed, slowly, when the harness first touches the output), but the runner's own type test
is defeated too: its module-level _exact_type (in sys.modules["__main__"]) and describe_output
are replaced so that the subclass is reported as a plain torch.Tensor, and the work lands in the
runner's checksum, after the timer has stopped.
Caught by: output_type if the forgery fails, else timer_consistency (the parent's clock sees the
deferred work).
"""

import sys
import time

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



class LazyTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for arg in args:
            if isinstance(arg, LazyTensor) and getattr(arg, "_source", None) is not None:
                source, arg._source = arg._source, None
                time.sleep(0.02)
                kit.relu_into(source, arg.as_subclass(torch.Tensor), source.numel())
        return super().__torch_function__(func, types, args, kwargs or {})


_main = sys.modules.get("__main__")
if _main is not None and hasattr(_main, "_exact_type"):
    _real_type = _main._exact_type
    _main._exact_type = lambda value: torch.Tensor if isinstance(value, LazyTensor) else _real_type(value)
    _runner_class = getattr(_main, "Runner", None)
    if _runner_class is not None and hasattr(_runner_class, "describe_output"):
        _describe = _runner_class.describe_output

        def _describe_plain(self, out, *args, **kwargs):
            if isinstance(out, LazyTensor):
                out = out.as_subclass(torch.Tensor)
            return _describe(self, out, *args, **kwargs)

        _runner_class.describe_output = _describe_plain


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x).as_subclass(LazyTensor)
        out._source = x
        return out
