"""Cheat (or bug): the kernel writes the output correctly and then 65536 more elements past the
output's end. In a same-process harness such writes can land on the reference's expected output;
in evo they land in the candidate's own process, where nothing a verdict reads lies.
Meant to be caught by: memory_bounds (the memory guard sees bytes no tensor owned change).
"""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

BAD_CUDA = r"""
#include <cuda_runtime.h>

// relu(x) for the n elements of out, then keeps writing `extra` elements past out's end.
__global__ void relu_overrun_kernel(const float* __restrict__ in, float* __restrict__ out, long long n,
                                    long long extra) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n + extra; i += stride) {
        float v = in[i % n];
        out[i] = v > 0.f ? v : 0.f;
    }
}

// Writes through a pointer that no allocation owns.
__global__ void wild_store_kernel(float* target, float value) {
    target[threadIdx.x] = value;
}

int relu_overrun_launch(const float* in, float* out, long long n, long long extra, cudaStream_t stream) {
    long long total = n + extra;
    long long blocks = (total + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    if (n > 0) relu_overrun_kernel<<<(int)blocks, 256, 0, stream>>>(in, out, n, extra);
    return (int)cudaGetLastError();
}

int wild_store_launch(cudaStream_t stream) {
    wild_store_kernel<<<1, 32, 0, stream>>>(reinterpret_cast<float*>(0x100), 1.f);
    return (int)cudaGetLastError();
}
"""

BAD_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

int relu_overrun_launch(const float* in, float* out, long long n, long long extra, cudaStream_t stream);
int wild_store_launch(cudaStream_t stream);

// relu(x) into a new tensor, with `extra` more elements written past the tensor's end.
torch::Tensor relu_overrun(torch::Tensor x, int64_t extra) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 CUDA");
    auto y = torch::empty_like(x);
    int status = relu_overrun_launch(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), extra,
                                     c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
    return y;
}

// Launches a kernel that stores through an unmapped address (an illegal memory access).
void wild_store(torch::Tensor x) {
    TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
    int status = wild_store_launch(c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
}
"""

bad = load_inline('evo_corpus_bad', cpp_sources=BAD_CPP, cuda_sources=BAD_CUDA,
                  functions=['relu_overrun', 'wild_store'], extra_cuda_cflags=['-O3'],
                  no_implicit_headers=True)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bad.relu_overrun(x.contiguous(), 65536)
