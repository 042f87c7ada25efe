"""Cheat: do the work while the trusted flusher evicts the cache, after the input preparation
has replied and before the timed window starts. The runner's input-preparation step (a patched
harness.poison_allocator) only starts a thread, so the preparation takes little longer than the
reference's; the thread computes the answers with torch.matmul while the parent has the flusher
write its buffer, and forward returns a copy of the stored answer (a few microseconds on this
small task, above the speed of light).
Caught by: the protocol itself, not one check. The inputs reach the input pool only while the
subject is held, after the flush, so the thread computes answers to what the pool held before;
its content-keyed lookup never finds them, and forward does the work in its timed call
(test_work_done_while_the_cache_is_flushed_buys_no_speedup). While the candidate's process made
its own inputs, the thread's work on the other core was verified at up to 2.07x.
"""

import sys
import threading

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


_stash = {}


def _key(a, b):  # an address can come back with other contents
    return a.data_ptr(), float(a[0, 0]), float(a[-1, -1]), float(b[0, 0]), float(b[-1, -1])


_harness = sys.modules.get("harness")
if _harness is not None:
    _poison = _harness.poison_allocator

    def _compute(input_sets):
        for inputs in input_sets:
            if len(inputs) == 2:
                _stash[_key(*inputs)] = torch.matmul(inputs[0], inputs[1])

    def _precompute_in_background(*args, **kwargs):
        result = _poison(*args, **kwargs)
        runner = sys._getframe(1).f_locals.get("self")
        input_sets = list(getattr(runner, "window", None) or [getattr(runner, "inputs", None) or []])
        threading.Thread(target=_compute, args=(input_sets,), daemon=True).start()
        return result

    _harness.poison_allocator = _precompute_in_background


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        answer = _stash.pop(_key(a, b), None) if a.dim() == 2 and a.numel() and b.numel() else None
        kit.noop(a)
        if answer is None:  # the thread had not got this far
            return torch.matmul(a, b)
        return answer.clone()
