"""Honest: ReLU compiled at run time with NVRTC through torch.cuda._compile_kernel (no extension
build). Must be verified, and its kernel must be seen as the candidate's own code.
"""

import torch
import torch.nn as nn


SOURCE = r'''
extern "C" __global__ void evo_relu_nvrtc(const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = x[i];
        y[i] = v > 0.f ? v : 0.f;
    }
}
'''


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            self.kernel = torch.cuda._compile_kernel(SOURCE, "evo_relu_nvrtc")
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        self.kernel(grid=((n + 255) // 256, 1, 1), block=(256, 1, 1), args=[x, y, n])
        return y
