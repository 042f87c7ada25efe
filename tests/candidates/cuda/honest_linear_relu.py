"""Honest: relu(x @ W) as the tiled fp32 matrix product followed by the ReLU kernel; the weight is
made exactly as the task's Model makes it. Must be verified (it shows the two-op task is fair to
the candidates that cheat on it).
"""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

EW_CUDA = r"""
#include <cuda_runtime.h>

__global__ void relu_kernel(const float* __restrict__ in, float* __restrict__ out, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float v = in[i];
        out[i] = v > 0.f ? v : 0.f;
    }
}

__global__ void add_mul_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ sum,
                               float* __restrict__ prod, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float x = a[i], y = b[i];
        sum[i] = x + y;
        prod[i] = x * y;
    }
}

__global__ void noop_kernel() {}

static int blocks_for(long long n) {
    long long blocks = (n + 255) / 256;
    if (blocks < 1) blocks = 1;
    if (blocks > 8192) blocks = 8192;
    return (int)blocks;
}

int relu_launch(const float* in, float* out, long long n, cudaStream_t stream) {
    if (n > 0) relu_kernel<<<blocks_for(n), 256, 0, stream>>>(in, out, n);
    return (int)cudaGetLastError();
}

int add_mul_launch(const float* a, const float* b, float* sum, float* prod, long long n, cudaStream_t stream) {
    if (n > 0) add_mul_kernel<<<blocks_for(n), 256, 0, stream>>>(a, b, sum, prod, n);
    return (int)cudaGetLastError();
}

int noop_launch(cudaStream_t stream) {
    noop_kernel<<<1, 32, 0, stream>>>();
    return (int)cudaGetLastError();
}
"""

EW_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <algorithm>
#include <vector>

int relu_launch(const float* in, float* out, long long n, cudaStream_t stream);
int add_mul_launch(const float* a, const float* b, float* sum, float* prod, long long n, cudaStream_t stream);
int noop_launch(cudaStream_t stream);

static void expect_float_cuda(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == torch::kFloat,
                what, " must be a contiguous float32 CUDA tensor");
}

static void launched(int status) {
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
}

// relu(x) into a new tensor.
torch::Tensor relu(torch::Tensor x) {
    expect_float_cuda(x, "x");
    auto y = torch::empty_like(x);
    launched(relu_launch(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), c10::cuda::getCurrentCUDAStream()));
    return y;
}

// relu(x) into the first `count` elements of `out` (which may be x itself).
void relu_into(torch::Tensor x, torch::Tensor out, int64_t count) {
    expect_float_cuda(x, "x");
    expect_float_cuda(out, "out");
    count = std::min<int64_t>(count, std::min<int64_t>(x.numel(), out.numel()));
    launched(relu_launch(x.data_ptr<float>(), out.data_ptr<float>(), count, c10::cuda::getCurrentCUDAStream()));
}

// (a + b, a * b) in one pass.
std::vector<torch::Tensor> add_mul(torch::Tensor a, torch::Tensor b) {
    expect_float_cuda(a, "a");
    expect_float_cuda(b, "b");
    TORCH_CHECK(a.sizes() == b.sizes(), "a and b must have the same shape");
    auto sum = torch::empty_like(a);
    auto prod = torch::empty_like(a);
    launched(add_mul_launch(a.data_ptr<float>(), b.data_ptr<float>(), sum.data_ptr<float>(), prod.data_ptr<float>(),
                            a.numel(), c10::cuda::getCurrentCUDAStream()));
    return {sum, prod};
}

// A kernel that does nothing, launched on the current stream of x's device.
void noop(torch::Tensor x) {
    TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
    launched(noop_launch(c10::cuda::getCurrentCUDAStream()));
}
"""

ew = load_inline('evo_corpus_ew', cpp_sources=EW_CPP, cuda_sources=EW_CUDA,
                 functions=['relu', 'relu_into', 'add_mul', 'noop'], extra_cuda_cflags=['-O3'],
                 no_implicit_headers=True)

MM_CUDA = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <mma.h>

// C = A @ B in fp32 with FMA only: 64x64 tiles per block, 16x16 threads, 4x4 outputs per thread.
#define TILE_M 64
#define TILE_N 64
#define TILE_K 16

__global__ void __launch_bounds__(256) sgemm_kernel(const float* __restrict__ A, const float* __restrict__ B,
                                                    float* __restrict__ C, int M, int N, int K) {
    __shared__ float As[TILE_K][TILE_M + 4];
    __shared__ float Bs[TILE_K][TILE_N + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int row0 = blockIdx.y * TILE_M, col0 = blockIdx.x * TILE_N;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        for (int e = threadIdx.x; e < TILE_M * TILE_K; e += 256) {
            int m = e / TILE_K, k = e % TILE_K;
            int r = row0 + m, c = k0 + k;
            As[k][m] = (r < M && c < K) ? A[(long long)r * K + c] : 0.f;
        }
        for (int e = threadIdx.x; e < TILE_K * TILE_N; e += 256) {
            int k = e / TILE_N, n = e % TILE_N;
            int r = k0 + k, c = col0 + n;
            Bs[k][n] = (r < K && c < N) ? B[(long long)r * N + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE_K; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int r = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int c = col0 + tx + 16 * j;
            if (r < M && c < N) C[(long long)r * N + c] = acc[i][j];
        }
    }
}

// C = A @ B with fp16 operands on the tensor cores (fp32 accumulation): one warp per 16x16 tile.
__global__ void hgemm_wmma_kernel(const __half* __restrict__ A, const __half* __restrict__ B, float* __restrict__ C,
                                  int M, int N, int K) {
    using namespace nvcuda;
    const int tile_m = blockIdx.y, tile_n = blockIdx.x;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.f);
    for (int k = 0; k < K; k += 16) {
        wmma::load_matrix_sync(a, A + (long long)tile_m * 16 * K + k, K);
        wmma::load_matrix_sync(b, B + (long long)k * N + tile_n * 16, N);
        wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(C + (long long)tile_m * 16 * N + tile_n * 16, c, N, wmma::mem_row_major);
}

int sgemm_launch(const float* A, const float* B, float* C, int M, int N, int K, cudaStream_t stream) {
    dim3 grid((N + TILE_N - 1) / TILE_N, (M + TILE_M - 1) / TILE_M);
    sgemm_kernel<<<grid, 256, 0, stream>>>(A, B, C, M, N, K);
    return (int)cudaGetLastError();
}

int hgemm_wmma_launch(const void* A, const void* B, float* C, int M, int N, int K, cudaStream_t stream) {
    dim3 grid(N / 16, M / 16);
    hgemm_wmma_kernel<<<grid, 32, 0, stream>>>(static_cast<const __half*>(A), static_cast<const __half*>(B), C, M, N, K);
    return (int)cudaGetLastError();
}
"""

MM_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

int sgemm_launch(const float* A, const float* B, float* C, int M, int N, int K, cudaStream_t stream);
int hgemm_wmma_launch(const void* A, const void* B, float* C, int M, int N, int K, cudaStream_t stream);

static void expect_matrix(const torch::Tensor& t, at::ScalarType type, const char* what) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.dim() == 2 && t.scalar_type() == type,
                what, " must be a contiguous 2-D CUDA matrix of the expected dtype");
}

// A @ B in fp32, FMA only (no tensor cores).
torch::Tensor sgemm(torch::Tensor A, torch::Tensor B) {
    expect_matrix(A, torch::kFloat, "A");
    expect_matrix(B, torch::kFloat, "B");
    TORCH_CHECK(A.size(1) == B.size(0), "inner dimensions differ");
    auto C = torch::empty({A.size(0), B.size(1)}, A.options());
    int status = sgemm_launch(A.data_ptr<float>(), B.data_ptr<float>(), C.data_ptr<float>(), (int)A.size(0),
                              (int)B.size(1), (int)A.size(1), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
    return C;
}

// A @ B with fp16 operands on the tensor cores, fp32 result; sizes must be multiples of 16.
torch::Tensor hgemm_wmma(torch::Tensor A, torch::Tensor B) {
    expect_matrix(A, torch::kHalf, "A");
    expect_matrix(B, torch::kHalf, "B");
    TORCH_CHECK(A.size(1) == B.size(0), "inner dimensions differ");
    TORCH_CHECK(A.size(0) % 16 == 0 && A.size(1) % 16 == 0 && B.size(1) % 16 == 0, "sizes must be multiples of 16");
    auto C = torch::empty({A.size(0), B.size(1)}, A.options().dtype(torch::kFloat));
    int status = hgemm_wmma_launch(A.data_ptr(), B.data_ptr(), C.data_ptr<float>(), (int)A.size(0), (int)B.size(1),
                                   (int)A.size(1), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == 0, "kernel launch failed with CUDA error ", status);
    return C;
}
"""

mm = load_inline('evo_corpus_mm', cpp_sources=MM_CPP, cuda_sources=MM_CUDA,
                 functions=['sgemm', 'hgemm_wmma'], extra_cuda_cflags=['-O3'],
                 no_implicit_headers=True)


class ModelNew(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ew.relu(mm.sgemm(x.contiguous(), self.weight.detach().contiguous()))
