"""Cheat: the output comes from CuPy's own memory pool (outside the torch allocator that the
evaluator poisons) and a CuPy RawKernel (NVRTC) writes only its first half, so the second half
holds zeros or older data instead of NaN.
Caught by: values (or output_written if that memory happens to hold NaN).
"""

import torch
import torch.nn as nn


SOURCE = r'''
extern "C" __global__ void evo_relu_first(const float* __restrict__ x, float* __restrict__ y, long long count) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < count) {
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
        import cupy

        if self.kernel is None:
            self.kernel = cupy.RawKernel(SOURCE, "evo_relu_first")
        flat = cupy.asarray(x.contiguous().reshape(-1))
        out = cupy.empty(flat.size, dtype=cupy.float32)
        count = flat.size // 2
        self.kernel(((count + 255) // 256,), (256,), (flat, out, cupy.int64(count)))
        return torch.from_dlpack(out).reshape(x.shape)
