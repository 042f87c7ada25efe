"""Honest: softmax over the last dimension, one block per row, max and sum reduced in shared
memory, with expf (not the __expf intrinsic). Must be verified.
"""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

ROWS_CUDA = r"""
#include <cuda_runtime.h>

#define THREADS 256

// Sum of v over the block; every thread gets the result.
__device__ float block_sum(float v, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += shared[w];
    return total;
}

// Maximum of v over the block; every thread gets the result.
__device__ float block_max(float v, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float best = shared[0];
    for (int w = 1; w < THREADS / 32; ++w) best = fmaxf(best, shared[w]);
    return best;
}

// Block (chunk, row) sums `chunk` columns of `row` and adds the partial sum into out[row] atomically:
// the order of the additions changes from run to run.
__global__ void __launch_bounds__(THREADS) rowsum_atomic_kernel(const float* __restrict__ x, float* __restrict__ out,
                                                                int cols, int chunk) {
    __shared__ float shared[THREADS / 32];
    const int row = blockIdx.y;
    const int start = blockIdx.x * chunk;
    const int end = min(start + chunk, cols);
    const float* line = x + (long long)row * cols;
    float s = 0.f;
    for (int c = start + threadIdx.x; c < end; c += THREADS) s += line[c];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) atomicAdd(out + row, s);
}

// Pass 1 of the two-pass sum: partial[row, chunk] for every chunk of every row (all written).
__global__ void __launch_bounds__(THREADS) rowsum_partials_kernel(const float* __restrict__ x,
                                                                  float* __restrict__ partial, int cols, int chunk) {
    __shared__ float shared[THREADS / 32];
    const int row = blockIdx.y;
    const int start = blockIdx.x * chunk;
    const int end = min(start + chunk, cols);
    const float* line = x + (long long)row * cols;
    float s = 0.f;
    for (int c = start + threadIdx.x; c < end; c += THREADS) s += line[c];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[(long long)row * gridDim.x + blockIdx.x] = s;
}

// Pass 2: out[row] = sum of the row's partial sums.
__global__ void __launch_bounds__(THREADS) rowsum_finish_kernel(const float* __restrict__ partial,
                                                                float* __restrict__ out, int chunks) {
    __shared__ float shared[THREADS / 32];
    const int row = blockIdx.x;
    float s = 0.f;
    for (int c = threadIdx.x; c < chunks; c += THREADS) s += partial[(long long)row * chunks + c];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) out[row] = s;
}

// Softmax of each row: one block per row, max and sum reduced in shared memory, expf (not __expf).
__global__ void __launch_bounds__(THREADS) softmax_kernel(const float* __restrict__ x, float* __restrict__ y,
                                                          int cols) {
    __shared__ float shared[THREADS / 32];
    const float* in = x + (long long)blockIdx.x * cols;
    float* out = y + (long long)blockIdx.x * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += THREADS) m = fmaxf(m, in[c]);
    m = block_max(m, shared);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += THREADS) s += expf(in[c] - m);
    s = block_sum(s, shared);
    for (int c = threadIdx.x; c < cols; c += THREADS) out[c] = expf(in[c] - m) / s;
}

int rowsum_atomic_launch(const float* x, float* out, int rows, int cols, int chunk, cudaStream_t stream) {
    dim3 grid((cols + chunk - 1) / chunk, rows);
    rowsum_atomic_kernel<<<grid, THREADS, 0, stream>>>(x, out, cols, chunk);
    return (int)cudaGetLastError();
}

int rowsum_partials_launch(const float* x, float* partial, int rows, int cols, int chunk, cudaStream_t stream) {
    dim3 grid((cols + chunk - 1) / chunk, rows);
    rowsum_partials_kernel<<<grid, THREADS, 0, stream>>>(x, partial, cols, chunk);
    return (int)cudaGetLastError();
}

int rowsum_finish_launch(const float* partial, float* out, int rows, int chunks, cudaStream_t stream) {
    rowsum_finish_kernel<<<rows, THREADS, 0, stream>>>(partial, out, chunks);
    return (int)cudaGetLastError();
}

int softmax_launch(const float* x, float* y, int rows, int cols, cudaStream_t stream) {
    softmax_kernel<<<rows, THREADS, 0, stream>>>(x, y, cols);
    return (int)cudaGetLastError();
}
"""

ROWS_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

int rowsum_atomic_launch(const float* x, float* out, int rows, int cols, int chunk, cudaStream_t stream);
int rowsum_partials_launch(const float* x, float* partial, int rows, int cols, int chunk, cudaStream_t stream);
int rowsum_finish_launch(const float* partial, float* out, int rows, int chunks, cudaStream_t stream);
int softmax_launch(const float* x, float* y, int rows, int cols, cudaStream_t stream);

static void expect_matrix(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.dim() == 2 && t.scalar_type() == torch::kFloat,
                what, " must be a contiguous 2-D float32 CUDA tensor");
}

static void launched(int status) {
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
}

// Row sums by atomicAdd of per-block partial sums into a zeroed output.
torch::Tensor rowsum_atomic(torch::Tensor x, int64_t chunk) {
    expect_matrix(x, "x");
    TORCH_CHECK(chunk > 0, "chunk must be positive");
    auto out = torch::zeros({x.size(0)}, x.options());
    launched(rowsum_atomic_launch(x.data_ptr<float>(), out.data_ptr<float>(), (int)x.size(0), (int)x.size(1),
                                  (int)chunk, c10::cuda::getCurrentCUDAStream()));
    return out;
}

// Pass 1 of the two-pass row sum: fills every element of partial (rows x chunks).
void rowsum_partials(torch::Tensor x, torch::Tensor partial, int64_t chunk) {
    expect_matrix(x, "x");
    expect_matrix(partial, "partial");
    TORCH_CHECK(chunk > 0 && partial.size(0) == x.size(0) && partial.size(1) == (x.size(1) + chunk - 1) / chunk,
                "partial must have one column per chunk of x's columns");
    launched(rowsum_partials_launch(x.data_ptr<float>(), partial.data_ptr<float>(), (int)x.size(0), (int)x.size(1),
                                    (int)chunk, c10::cuda::getCurrentCUDAStream()));
}

// Pass 2: the row sums of the partial sums.
torch::Tensor rowsum_finish(torch::Tensor partial) {
    expect_matrix(partial, "partial");
    auto out = torch::empty({partial.size(0)}, partial.options());
    launched(rowsum_finish_launch(partial.data_ptr<float>(), out.data_ptr<float>(), (int)partial.size(0),
                                  (int)partial.size(1), c10::cuda::getCurrentCUDAStream()));
    return out;
}

// Softmax over the last dimension of a 2-D tensor.
torch::Tensor softmax_rows(torch::Tensor x) {
    expect_matrix(x, "x");
    auto y = torch::empty_like(x);
    launched(softmax_launch(x.data_ptr<float>(), y.data_ptr<float>(), (int)x.size(0), (int)x.size(1),
                            c10::cuda::getCurrentCUDAStream()));
    return y;
}
"""

rows = load_inline('evo_corpus_rows', cpp_sources=ROWS_CPP, cuda_sources=ROWS_CUDA,
                   functions=['rowsum_atomic', 'rowsum_partials', 'rowsum_finish', 'softmax_rows'], extra_cuda_cflags=['-O3'],
                   no_implicit_headers=True)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rows.softmax_rows(x.contiguous())
