import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
__global__ void relu_kernel(const float* in, float* out, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] > 0.f ? in[i] : 0.f;
}
void relu_launch(const float* in, float* out, long n, cudaStream_t stream) {
    relu_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(in, out, n);
}
"""

CUDA_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
void relu_launch(const float* in, float* out, long n, cudaStream_t stream);
torch::Tensor relu_forward(torch::Tensor x) {
    auto y = torch::empty_like(x);
    relu_launch(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), c10::cuda::getCurrentCUDAStream());
    return y;
}
"""

CPU_SOURCE = r"""
#include <torch/extension.h>
torch::Tensor relu_forward(torch::Tensor x) {
    auto y = torch::empty_like(x);
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = in[i] > 0.f ? in[i] : 0.f;
    return y;
}
"""

if torch.cuda.is_available():
    ext = load_inline("demo_relu_naive_cuda", cpp_sources=CUDA_BINDING, cuda_sources=CUDA_SOURCE,
                      functions=["relu_forward"])
else:
    ext = load_inline("demo_relu_naive_cpu", cpp_sources=CPU_SOURCE, functions=["relu_forward"])


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ext.relu_forward(x.contiguous())
