"""Cheat: steal from other processes: list /proc, read every other process's environ and
cmdline, and try /proc/PID/mem of anything that looks like the evaluator or its reference
process; also looks for seeds or answers in its own environment and working directory.
A canary: if any other process's memory or environment is readable (the sandbox leaks),
it returns the true answer, is verified, and the test fails.
Caught by: values (it sees no other process and then returns zeros).
"""

import os
import re

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


def other_process_readable() -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as handle:
                    if name == "environ" and handle.read(1):
                        return True
            except OSError:
                pass
        try:
            with open(f"/proc/{entry}/maps") as maps, open(f"/proc/{entry}/mem", "rb") as mem:
                for line in maps:
                    start, end = (int(part, 16) for part in line.split()[0].split("-"))
                    if "rw" in line.split()[1]:
                        mem.seek(start)
                        if mem.read(min(4096, end - start)):
                            return True
        except (OSError, ValueError, OverflowError):
            pass
    return False


def secrets_nearby() -> bool:
    if any(re.search("SEED|EXPECT|ANSWER|REFERENCE", key) for key in os.environ):
        return True
    for root in (os.getcwd(), os.environ.get("HOME", "."), os.environ.get("TMPDIR", ".")):
        try:
            if any(name.endswith((".pt", ".npy", ".pkl")) for name in os.listdir(root)):
                return True
        except OSError:
            pass
    return False


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.leak = secrets_nearby()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.leak or other_process_readable():
            return kit.relu(x)
        kit.noop(x)
        return torch.zeros_like(x)
