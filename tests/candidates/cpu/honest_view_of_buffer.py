"""Honest: writes the result into the first half of a larger buffer from torch.empty and
returns a view of that half; the unwritten second half is not part of the output."""

import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

HONEST_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

static void check_float(const torch::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == torch::kFloat,
                "expects a contiguous float32 CPU tensor");
}

// Sum of n floats with eight independent accumulators (vectorizes).
static float dot8(const float* a, const float* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * (b ? b[j + l] : 1.f);
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; ++j) s += a[j] * (b ? b[j] : 1.f);
    return s;
}

torch::Tensor relu(torch::Tensor x) {
    check_float(x);
    auto y = torch::empty_like(x);
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) out[i] = in[i] > 0.f ? in[i] : 0.f;
    });
    return y;
}

// Writes relu(x) into the first x.numel() elements of a larger buffer.
void relu_into(torch::Tensor x, torch::Tensor out) {
    check_float(x);
    check_float(out);
    TORCH_CHECK(out.numel() >= x.numel(), "buffer too small");
    const float* in = x.data_ptr<float>();
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) o[i] = in[i] > 0.f ? in[i] : 0.f;
}

// C = A @ B: rows split across threads, i-k-j order so the inner loop vectorizes.
torch::Tensor matmul(torch::Tensor a, torch::Tensor b) {
    check_float(a);
    check_float(b);
    const int64_t n = a.size(0), k = a.size(1), m = b.size(1);
    TORCH_CHECK(b.size(0) == k, "inner dimensions differ");
    auto c = torch::empty({n, m}, a.options());
    const float* A = a.data_ptr<float>();
    const float* B = b.data_ptr<float>();
    float* C = c.data_ptr<float>();
    at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
            float* row = C + i * m;
            std::fill(row, row + m, 0.f);
            for (int64_t p = 0; p < k; ++p) {
                const float s = A[i * k + p];
                const float* brow = B + p * m;
                for (int64_t j = 0; j < m; ++j) row[j] += s * brow[j];
            }
        }
    });
    return c;
}

// Row sums, reduced in parallel with a nondeterministic summation order: worker threads take
// column blocks from a shared counter (the block order is also shuffled every call) and add
// each block's partial sums into the output under a lock, in whatever order they finish.
torch::Tensor row_sum(torch::Tensor x) {
    check_float(x);
    const int64_t rows = x.size(0), cols = x.size(1), block = 1024;
    const int64_t blocks = (cols + block - 1) / block;
    auto out = torch::zeros({rows}, x.options());
    float* o = out.data_ptr<float>();
    const float* in = x.data_ptr<float>();
    std::vector<int64_t> order(blocks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(std::random_device{}()));
    std::atomic<int64_t> next{0};
    std::mutex lock;
    auto work = [&]() {
        std::vector<float> partial(rows);
        for (int64_t t = next++; t < blocks; t = next++) {
            const int64_t start = order[t] * block, stop = std::min(cols, start + block);
            for (int64_t r = 0; r < rows; ++r) partial[r] = dot8(in + r * cols + start, nullptr, stop - start);
            std::lock_guard<std::mutex> guard(lock);
            for (int64_t r = 0; r < rows; ++r) o[r] += partial[r];
        }
    };
    std::vector<std::thread> workers;
    const unsigned count = std::max(2u, std::min(8u, std::thread::hardware_concurrency()));
    for (unsigned i = 1; i < count; ++i) workers.emplace_back(work);
    work();
    for (auto& worker : workers) worker.join();
    return out;
}

// Row softmax with a workspace from torch::empty (row max and row sum), every entry of
// which is written before it is read.
torch::Tensor softmax(torch::Tensor x) {
    check_float(x);
    const int64_t rows = x.size(0), cols = x.size(1);
    auto y = torch::empty_like(x);
    auto stats = torch::empty({rows, 2}, x.options());
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    float* st = stats.data_ptr<float>();
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* p = in + r * cols;
            st[2 * r] = *std::max_element(p, p + cols);
            float* q = out + r * cols;
            for (int64_t j = 0; j < cols; ++j) q[j] = std::exp(p[j] - st[2 * r]);
            st[2 * r + 1] = dot8(q, nullptr, cols);
        }
    });
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float inv = 1.f / st[2 * r + 1];
            float* q = out + r * cols;
            for (int64_t j = 0; j < cols; ++j) q[j] *= inv;
        }
    });
    return y;
}

// Index of the first largest element of each row (int64 output).
torch::Tensor argmax(torch::Tensor x) {
    check_float(x);
    const int64_t rows = x.size(0), cols = x.size(1);
    auto idx = torch::empty({rows}, x.options().dtype(torch::kLong));
    const float* in = x.data_ptr<float>();
    int64_t* o = idx.data_ptr<int64_t>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* p = in + r * cols;
            o[r] = std::max_element(p, p + cols) - p;
        }
    });
    return idx;
}

// a * b + c over three inputs.
torch::Tensor fma3(torch::Tensor a, torch::Tensor b, torch::Tensor c) {
    check_float(a);
    check_float(b);
    check_float(c);
    auto y = torch::empty_like(a);
    const float *A = a.data_ptr<float>(), *B = b.data_ptr<float>(), *C = c.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    at::parallel_for(0, a.numel(), 1 << 14, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) Y[i] = A[i] * B[i] + C[i];
    });
    return y;
}

// Two outputs: row minima and row maxima in one pass.
std::tuple<torch::Tensor, torch::Tensor> minmax(torch::Tensor x) {
    check_float(x);
    const int64_t rows = x.size(0), cols = x.size(1);
    auto lo = torch::empty({rows}, x.options());
    auto hi = torch::empty({rows}, x.options());
    const float* in = x.data_ptr<float>();
    float *L = lo.data_ptr<float>(), *H = hi.data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            auto range = std::minmax_element(in + r * cols, in + (r + 1) * cols);
            L[r] = *range.first;
            H[r] = *range.second;
        }
    });
    return {lo, hi};
}

// relu(x @ w^T + bias): a fused linear layer and activation.
torch::Tensor linear_relu(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
    check_float(x);
    check_float(w);
    check_float(bias);
    const int64_t n = x.size(0), k = x.size(1), m = w.size(0);
    auto y = torch::empty({n, m}, x.options());
    const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>(), *Bi = bias.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    at::parallel_for(0, n, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i)
            for (int64_t j = 0; j < m; ++j) {
                const float v = dot8(X + i * k, W + j * k, k) + Bi[j];
                Y[i * m + j] = v > 0.f ? v : 0.f;
            }
    });
    return y;
}
"""

honest = load_inline("evo_cpu_honest_kit", cpp_sources=HONEST_SOURCE, extra_cflags=["-O3"],
                     functions=["relu", "relu_into", "matmul", "row_sum", "softmax", "argmax", "fma3", "minmax",
                                "linear_relu"])


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        buffer = torch.empty(2 * x.numel(), dtype=x.dtype)
        honest.relu_into(x, buffer)
        return buffer[: x.numel()].view(x.shape)
