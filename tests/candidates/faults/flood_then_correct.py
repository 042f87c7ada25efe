"""Fault: the first call prints 8 MiB to stdout and 8 MiB to stderr, then every call returns a correct
answer from the same C++ ReLU as examples/candidates/relu_cpu.py (same source, same build)."""

import os
import sys

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>

torch::Tensor relu_forward(torch::Tensor x) {
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "expects contiguous float32");
    auto y = torch::empty_like(x);
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    const int64_t n = x.numel();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) out[i] = in[i] > 0.f ? in[i] : 0.f;
    });
    return y;
}
"""

relu_ext = load_inline("evo_example_relu_cpu", cpp_sources=SOURCE, functions=["relu_forward"])

LINE = "evo-fault-flood " + "x" * 1007 + "\n"  # 1 KiB


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.flooded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flooded:
            self.flooded = True
            for _ in range(8 * 1024):
                sys.stdout.write(LINE)
                sys.stderr.write(LINE)
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(1, LINE.encode() * 1024)  # and straight to the file descriptor
        return relu_ext.relu_forward(x.contiguous())
