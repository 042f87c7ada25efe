"""Honest: natural log with logf (1 ulp) in a CUDA kernel. Must be verified; it shows the
log-near-one task is fair to the candidates that use fast math on it.
"""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

LOG_CUDA = r"""
#include <cuda_runtime.h>

__global__ void log_precise_kernel(const float* __restrict__ in, float* __restrict__ out, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) out[i] = logf(in[i]);
}

__global__ void log_intrinsic_kernel(const float* __restrict__ in, float* __restrict__ out, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) out[i] = __logf(in[i]);
}

int log_launch(const float* in, float* out, long long n, int intrinsic, cudaStream_t stream) {
    long long blocks = (n + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    if (n > 0) {
        if (intrinsic) log_intrinsic_kernel<<<(int)blocks, 256, 0, stream>>>(in, out, n);
        else log_precise_kernel<<<(int)blocks, 256, 0, stream>>>(in, out, n);
    }
    return (int)cudaGetLastError();
}
"""

LOG_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

int log_launch(const float* in, float* out, long long n, int intrinsic, cudaStream_t stream);

static torch::Tensor run(torch::Tensor x, int intrinsic) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 CUDA");
    auto y = torch::empty_like(x);
    int status = log_launch(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), intrinsic,
                            c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
    return y;
}

// Natural log with logf (1 ulp).
torch::Tensor log_precise(torch::Tensor x) { return run(x, 0); }

// Natural log with the __logf hardware approximation.
torch::Tensor log_intrinsic(torch::Tensor x) { return run(x, 1); }
"""

lg = load_inline('evo_corpus_log', cpp_sources=LOG_CPP, cuda_sources=LOG_CUDA,
                 functions=['log_precise', 'log_intrinsic'], extra_cuda_cflags=['-O3'],
                 no_implicit_headers=True)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lg.log_precise(x.contiguous())
