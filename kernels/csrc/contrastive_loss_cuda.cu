// CUDA tile passes of the fused contrastive loss (see contrastive_loss.cpp for the op bodies).
//
// One thread block owns one 64 x 64 tile of S = scale * rows @ cols^T at a time: the score tile is
// built in registers from 16-dim shared-memory stages of both feature blocks (inputs converted to
// fp32 on load, fp32 accumulation), then staged in shared memory for the row/column reductions
// (forward) or for G @ cols and G^T @ rows (backward). Blocks follow the block-diagonal schedule of
// contrastive_loss.h: a launch per round, so each row and column accumulator in global memory has a
// single writer per launch: no atomics, deterministic results.
// A plain SIMT kernel (no tensor cores): the O(N^2) exps and O(N D) traffic per tile are the
// same as a tensor-core version would need, the matmul throughput is not.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "contrastive_loss.h"

namespace crossmodal {

using at::Tensor;

namespace {

constexpr int kTile = 64;     // rows and columns of a tile
constexpr int kDepth = 16;    // feature dims per shared-memory stage of the score tile
constexpr int kChunk = 64;    // feature dims per stage of the gradient products
constexpr int kSide = 16;     // threads along each side of a tile: 16 x 16 = 256 threads
constexpr int kMicro = 4;     // each thread owns rows ty + 16 m and columns tx + 16 n, m, n < 4
constexpr int kThreads = kSide * kSide;
constexpr int kPad = 4;       // shared-memory row padding against bank conflicts

template <typename scalar_t>
__device__ __forceinline__ float load_float(const scalar_t* data, int64_t row, int64_t num_rows, int64_t dim,
                                            int64_t depth) {
  return (row < num_rows && dim < depth) ? static_cast<float>(data[row * depth + dim]) : 0.0f;
}

// raw[m][n] = <rows[row0 + ty + 16 m], cols[col0 + tx + 16 n]>, zero outside the matrices.
template <typename scalar_t>
__device__ void score_tile(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols, int64_t num_rows,
                           int64_t num_cols, int64_t depth, int64_t row0, int64_t col0,
                           float (&rows_stage)[kDepth][kTile + kPad], float (&cols_stage)[kDepth][kTile + kPad],
                           float (&raw)[kMicro][kMicro]) {
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) raw[m][n] = 0.0f;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {  // consecutive threads: consecutive dims
      const int r = e / kDepth, k = e % kDepth;
      rows_stage[k][r] = load_float(rows, row0 + r, num_rows, k0 + k, depth);
      cols_stage[k][r] = load_float(cols, col0 + r, num_cols, k0 + k, depth);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      float a[kMicro], b[kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) a[m] = rows_stage[k][ty + kSide * m];
#pragma unroll
      for (int n = 0; n < kMicro; ++n) b[n] = cols_stage[k][tx + kSide * n];
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int n = 0; n < kMicro; ++n) raw[m][n] = fmaf(a[m], b[n], raw[m][n]);
    }
    __syncthreads();
  }
}

// scale * dot, rounded to fp32 on its own. A plain `s * raw` may be contracted by nvcc into an FMA with
// whatever the caller subtracts next, so the forward (which stores the logit) and the backward (which
// uses it at once) would see logits one rounding apart: exp of that difference, times the scale, is a
// gradient error of ~1e-6 * scale where the exact gradient is 0 (measured on an H100 before this).
__device__ __forceinline__ float logit(float s, float dot) { return __fmul_rn(s, dot); }

// Forward: merges each tile's row (and, if col_lse != nullptr, column) partial log-sum-exp into the
// running (max, excess) state in global memory (row_lse[0], row_lse[num_rows]: see contrastive_loss.h)
// and records each row's positive logit. Block p handles rounds [first_round, last_round).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lse_tiles_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols, int64_t num_rows,
                     int64_t num_cols, int64_t depth, const float* __restrict__ scale, int64_t offset, float* row_lse,
                     float* col_lse, float* positives, int64_t first_round, int64_t last_round, int64_t rounds) {
  __shared__ float rows_stage[kDepth][kTile + kPad];
  __shared__ float cols_stage[kDepth][kTile + kPad];
  __shared__ float scores[kTile][kTile + 1];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t p = blockIdx.x, col_blocks = ceil_div(num_cols, kTile);
  const int64_t row0 = p * kTile;
  const float s = *scale;
  for (int64_t k = first_round; k < last_round; ++k) {
    const int64_t q = wavefront_column(p, k, rounds);
    if (q >= col_blocks) continue;  // the same for the whole block
    const int64_t col0 = q * kTile;
    float raw[kMicro][kMicro];
    score_tile(rows, cols, num_rows, num_cols, depth, row0, col0, rows_stage, cols_stage, raw);
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) {
        const int r = ty + kSide * m, c = tx + kSide * n;
        const bool inside = row0 + r < num_rows && col0 + c < num_cols;
        scores[r][c] = inside ? logit(s, raw[m][n]) : -INFINITY;  // exp(-inf - max) = 0 below
      }
    __syncthreads();
    if (threadIdx.x < kTile) {  // one thread per row
      const int r = threadIdx.x;
      const int64_t row = row0 + r;
      if (row < num_rows) {
        float tile_max = -INFINITY, tile_excess = 0.0f, ties = 0.0f;
        for (int c = 0; c < kTile; ++c) tile_max = max_of(tile_max, scores[r][c]);
        for (int c = 0; c < kTile; ++c) {
          tile_excess += excess_term(scores[r][c], tile_max);
          ties += tie_term(scores[r][c], tile_max);
        }
        lse_merge(row_lse[row], row_lse[num_rows + row], tile_max, tile_excess + (ties - 1.0f));
        const int64_t positive = row + offset - col0;
        if (positive >= 0 && positive < kTile && col0 + positive < num_cols) positives[row] = scores[r][positive];
      }
    } else if (col_lse != nullptr && threadIdx.x < 2 * kTile) {  // one thread per column
      const int c = threadIdx.x - kTile;
      const int64_t col = col0 + c;
      if (col < num_cols) {
        float tile_max = -INFINITY, tile_excess = 0.0f, ties = 0.0f;
        for (int r = 0; r < kTile; ++r) tile_max = max_of(tile_max, scores[r][c]);
        for (int r = 0; r < kTile; ++r) {
          tile_excess += excess_term(scores[r][c], tile_max);
          ties += tie_term(scores[r][c], tile_max);
        }
        lse_merge(col_lse[col], col_lse[num_cols + col], tile_max, tile_excess + (ties - 1.0f));
      }
    }
    __syncthreads();  // scores is rewritten by the next round
  }
}

// (max, excess) -> (max, log_sum) in place for the second half of a (2, n) state.
__global__ void lse_finish_kernel(float* __restrict__ excess, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) excess[i] = lse_log_sum(excess[i]);
}

// out[m][n] += sum_j lhs(ty + 16 m, j) * features[j][tx + 16 n], lhs read from the G tile either
// as is (transposed = false, G @ features) or transposed (G^T @ features).
template <bool transposed>
__device__ __forceinline__ void chunk_product(const float (&g)[kTile][kTile + 1],
                                              const float (&features)[kTile][kChunk + kPad],
                                              float (&out)[kMicro][kMicro]) {
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll 4
  for (int j = 0; j < kTile; ++j) {
    float a[kMicro], b[kMicro];
#pragma unroll
    for (int m = 0; m < kMicro; ++m) a[m] = transposed ? g[j][ty + kSide * m] : g[ty + kSide * m][j];
#pragma unroll
    for (int n = 0; n < kMicro; ++n) b[n] = features[j][tx + kSide * n];
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) out[m][n] = fmaf(a[m], b[n], out[m][n]);
  }
}

// grad[(block0 + ty + 16 m) * depth + dim0 + tx + 16 n] += (G or G^T) @ features[feature0 : feature0 + 64, dim0 : dim0 + 64]
template <bool transposed, typename scalar_t>
__device__ void accumulate_grad(const float (&g)[kTile][kTile + 1], float (&features_stage)[kTile][kChunk + kPad],
                                const scalar_t* __restrict__ features, int64_t num_features, int64_t feature0,
                                float* grad, int64_t num_grad_rows, int64_t block0, int64_t depth) {
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  for (int64_t dim0 = 0; dim0 < depth; dim0 += kChunk) {
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int j = e / kChunk, d = e % kChunk;
      features_stage[j][d] = load_float(features, feature0 + j, num_features, dim0 + d, depth);
    }
    __syncthreads();
    float out[kMicro][kMicro] = {};
    chunk_product<transposed>(g, features_stage, out);
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) {
        const int64_t row = block0 + ty + kSide * m, dim = dim0 + tx + kSide * n;
        if (row < num_grad_rows && dim < depth) grad[row * depth + dim] += out[m][n];
      }
    __syncthreads();  // features_stage is reloaded
  }
}

// Backward, one round: block p recomputes tile (p, q), forms G (symmetric or one-sided), then
// row_grad[p] += G @ cols[q] and col_grad[q] += G^T @ rows[p].
template <typename scalar_t, bool symmetric>
__global__ void __launch_bounds__(kThreads)
    grad_tiles_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ cols, int64_t num_rows,
                      int64_t num_cols, int64_t depth, const float* __restrict__ scale,
                      const float* __restrict__ weight, int64_t offset, const float* __restrict__ row_lse,
                      const float* __restrict__ col_lse, float* row_grad, float* col_grad, int64_t round,
                      int64_t rounds) {  // row_lse (2, num_rows), col_lse (2, num_cols) [max; log_sum]
  __shared__ float rows_stage[kDepth][kTile + kPad];
  __shared__ float cols_stage[kDepth][kTile + kPad];
  __shared__ float g[kTile][kTile + 1];
  __shared__ float features_stage[kTile][kChunk + kPad];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t p = blockIdx.x, q = wavefront_column(p, round, rounds);
  if (q >= ceil_div(num_cols, kTile)) return;  // the same for the whole block
  const int64_t row0 = p * kTile, col0 = q * kTile;
  const float s = *scale, w = *weight;

  float raw[kMicro][kMicro];
  score_tile(rows, cols, num_rows, num_cols, depth, row0, col0, rows_stage, cols_stage, raw);
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) {
      const int64_t row = row0 + ty + kSide * m, col = col0 + tx + kSide * n;
      float coefficient = 0.0f;
      if (row < num_rows && col < num_cols) {
        const bool positive = col == row + offset;
        const Lse<float> row_stats{row_lse[row], row_lse[num_rows + row]};
        const float score = logit(s, raw[m][n]);
        coefficient = symmetric ? symmetric_grad(score, row_stats, Lse<float>{col_lse[col], col_lse[num_cols + col]},
                                                 w, positive)
                                : one_sided_grad(score, row_stats, w, positive);
      }
      g[ty + kSide * m][tx + kSide * n] = coefficient;
    }
  __syncthreads();
  accumulate_grad<false>(g, features_stage, cols, num_cols, col0, row_grad, num_rows, row0, depth);
  accumulate_grad<true>(g, features_stage, rows, num_rows, row0, col_grad, num_cols, col0, depth);
}

// Calls fn(scalar_t{}) for the feature dtypes the kernels support.
template <typename Fn>
void dispatch_feature_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(at::Half{});
    case at::kBFloat16: return fn(at::BFloat16{});
    default: TORCH_CHECK(false, "the CUDA contrastive loss supports float32, float16 and bfloat16, got ", dtype,
                         " (use backend='torch')");
  }
}

}  // namespace

void lse_pass_cuda(const Tensor& rows, const Tensor& cols, const Tensor& scale, int64_t offset, const Tensor& row_lse,
                   const Tensor& col_lse, const Tensor& positives) {
  const c10::cuda::OptionalCUDAGuard guard(rows.device());
  const bool with_cols = col_lse.defined();
  const int64_t num_rows = rows.size(0), num_cols = cols.size(0), depth = rows.size(1);
  const int64_t row_blocks = ceil_div(num_rows, kTile), rounds = std::max(row_blocks, ceil_div(num_cols, kTile));
  for (const Tensor& lse : {row_lse, col_lse}) {  // running state (-inf, 0)
    if (!lse.defined()) continue;
    lse[0].fill_(-INFINITY);
    lse[1].zero_();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_feature_dtype(rows.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto launch = [&](int64_t first_round, int64_t last_round) {
      lse_tiles_kernel<scalar_t><<<row_blocks, kThreads, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), cols.const_data_ptr<scalar_t>(), num_rows, num_cols, depth,
          scale.const_data_ptr<float>(), offset, row_lse.data_ptr<float>(),
          with_cols ? col_lse.data_ptr<float>() : nullptr, positives.data_ptr<float>(), first_round, last_round,
          rounds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (with_cols) {
      for (int64_t k = 0; k < rounds; ++k) launch(k, k + 1);  // columns need one writer per launch
    } else {
      launch(0, rounds);
    }
  });
  constexpr int kFinishThreads = 256;
  for (const Tensor& lse : {row_lse, col_lse}) {
    if (!lse.defined()) continue;
    const int64_t n = lse.size(1);
    lse_finish_kernel<<<ceil_div(n, kFinishThreads), kFinishThreads, 0, stream>>>(lse.data_ptr<float>() + n, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void grad_pass_cuda(const Tensor& rows, const Tensor& cols, const Tensor& scale, const Tensor& weight, int64_t offset,
                    const Tensor& row_lse, const Tensor& col_lse, const Tensor& row_grad, const Tensor& col_grad) {
  const c10::cuda::OptionalCUDAGuard guard(rows.device());
  const int64_t num_rows = rows.size(0), num_cols = cols.size(0), depth = rows.size(1);
  const int64_t row_blocks = ceil_div(num_rows, kTile), rounds = std::max(row_blocks, ceil_div(num_cols, kTile));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_feature_dtype(rows.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = col_lse.defined() ? grad_tiles_kernel<scalar_t, true> : grad_tiles_kernel<scalar_t, false>;
    for (int64_t k = 0; k < rounds; ++k) {
      kernel<<<row_blocks, kThreads, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), cols.const_data_ptr<scalar_t>(), num_rows, num_cols, depth,
          scale.const_data_ptr<float>(), weight.const_data_ptr<float>(), offset, row_lse.const_data_ptr<float>(),
          col_lse.defined() ? col_lse.const_data_ptr<float>() : nullptr, row_grad.data_ptr<float>(),
          col_grad.data_ptr<float>(), k, rounds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace crossmodal
