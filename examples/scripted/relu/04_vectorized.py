import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

CUDA_SOURCE = r"""
#include <cuda_runtime.h>

__global__ void relu_kernel(const float4* __restrict__ in, float4* __restrict__ out, long n4) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long stride = (long)gridDim.x * blockDim.x;
    for (; i < n4; i += stride) {
        float4 v = in[i];
        v.x = fmaxf(v.x, 0.f); v.y = fmaxf(v.y, 0.f); v.z = fmaxf(v.z, 0.f); v.w = fmaxf(v.w, 0.f);
        out[i] = v;
    }
}

__global__ void relu_tail(const float* __restrict__ in, float* __restrict__ out, long start, long n) {
    long i = start + blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = fmaxf(in[i], 0.f);
}

void relu_launch(const float* in, float* out, long n, cudaStream_t stream) {
    long n4 = n / 4;
    if (n4 > 0) {
        int blocks = (int)((n4 + 255) / 256 < 4096 ? (n4 + 255) / 256 : 4096);
        relu_kernel<<<blocks, 256, 0, stream>>>((const float4*)in, (float4*)out, n4);
    }
    if (n % 4) relu_tail<<<1, 4, 0, stream>>>(in, out, n4 * 4, n);
}
"""

CUDA_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

void relu_launch(const float* in, float* out, long n, cudaStream_t stream);

torch::Tensor relu_forward(torch::Tensor x) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == torch::kFloat, "expects contiguous float32 CUDA");
    auto y = torch::empty_like(x);
    relu_launch(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), c10::cuda::getCurrentCUDAStream());
    return y;
}
"""

CPU_SOURCE = r"""
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

if torch.cuda.is_available():
    ext = load_inline("demo_relu_vector_cuda", cpp_sources=CUDA_BINDING, cuda_sources=CUDA_SOURCE,
                      functions=["relu_forward"], extra_cuda_cflags=["-O3"])
else:
    ext = load_inline("demo_relu_parallel_cpu", cpp_sources=CPU_SOURCE, functions=["relu_forward"])


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ext.relu_forward(x.contiguous())
