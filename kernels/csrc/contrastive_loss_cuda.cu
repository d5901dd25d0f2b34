// CUDA epilogues of the fused contrastive loss (the block passes are in contrastive_loss.cpp).
//
// The matmuls of each block (dots = rows_p @ cols_q^T, G @ cols_q, G^T @ rows_p) are ATen calls
// that run on cuBLAS; these kernels are only the O(block) elementwise and reduction work between
// them, reading the fp32 dots block once or twice:
//   forward:  row_lse_kernel (a warp per row) and col_lse_partial_kernel + col_lse_merge_kernel (a
//             thread per column over chunks of rows, then an in-order merge of the chunks), both
//             merging (max, excess) partials into the running state exactly as the CPU loops do;
//   backward: grad_kernel writes G / weight in the features' dtype (bf16/fp16 values in [-2, 1],
//             the weight g / (2N) is applied to the O(N D) products), the input of the next matmuls.
// Blocks run one after another on the current stream, so each state entry has a single writer:
// no atomics, deterministic results.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "contrastive_loss.h"

namespace crossmodal {

using at::Tensor;

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // row_lse_kernel: 8 warps, one row each
constexpr int kThreads = 256;
constexpr int64_t kColumnChunk = 128;  // rows per partial of col_lse_partial_kernel
constexpr int64_t kMaxGridY = 65535;

// scale * dot, rounded to fp32 on its own. A plain `s * raw` may be contracted by nvcc into an FMA with
// whatever the caller subtracts next, so the forward (which stores the logit) and the backward (which
// uses it at once) would see logits one rounding apart: exp of that difference, times the scale, is a
// gradient error of ~1e-6 * scale where the exact gradient is 0 (measured on an H100 before this).
__device__ __forceinline__ float logit(float s, float dot) { return __fmul_rn(s, dot); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) x = max_of(x, __shfl_xor_sync(0xffffffffu, x, delta));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) x += __shfl_xor_sync(0xffffffffu, x, delta);
  return x;
}

// Row partials of a (num_rows, num_cols) block of dots: warp w of block b owns row 8 b + w; a max
// pass, then an excess pass (the row is back in L1/L2), merged into row_max/row_excess. Also records
// row r's positive logit, block column first_positive + r, where it falls in the block.
__global__ void __launch_bounds__(kThreads)
    row_lse_kernel(const float* __restrict__ dots, int64_t num_rows, int64_t num_cols, const float* __restrict__ scale,
                   int64_t first_positive, float* row_max, float* row_excess, float* positives) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (row >= num_rows) return;  // the whole warp
  const float s = *scale;
  const float* row_dots = dots + row * num_cols;
  float block_max = -INFINITY;
  for (int64_t j = lane; j < num_cols; j += kWarp) block_max = max_of(block_max, logit(s, row_dots[j]));
  block_max = warp_max(block_max);
  float excess = 0.0f, ties = 0.0f;
  for (int64_t j = lane; j < num_cols; j += kWarp) {
    const float x = logit(s, row_dots[j]);
    excess += excess_term(x, block_max);
    ties += tie_term(x, block_max);
  }
  excess = warp_sum(excess);
  ties = warp_sum(ties);
  if (lane == 0) {
    lse_merge(row_max[row], row_excess[row], block_max, excess + (ties - 1.0f));
    const int64_t positive = first_positive + row;
    if (positive >= 0 && positive < num_cols) positives[row] = logit(s, row_dots[positive]);
  }
}

// Column partials over rows [chunk * 128, chunk * 128 + 128): thread (x, chunk) owns one column; a
// max pass, then an excess pass. partial_max/partial_excess are (chunks, num_cols).
__global__ void __launch_bounds__(kThreads)
    col_lse_partial_kernel(const float* __restrict__ dots, int64_t num_rows, int64_t num_cols,
                           const float* __restrict__ scale, float* __restrict__ partial_max,
                           float* __restrict__ partial_excess) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t chunk = blockIdx.y, row0 = chunk * kColumnChunk;
  if (col >= num_cols) return;
  const int64_t row_end = num_rows < row0 + kColumnChunk ? num_rows : row0 + kColumnChunk;
  const float s = *scale;
  float chunk_max = -INFINITY;
  for (int64_t r = row0; r < row_end; ++r) chunk_max = max_of(chunk_max, logit(s, dots[r * num_cols + col]));
  float excess = 0.0f, ties = 0.0f;
  for (int64_t r = row0; r < row_end; ++r) {
    const float x = logit(s, dots[r * num_cols + col]);
    excess += excess_term(x, chunk_max);
    ties += tie_term(x, chunk_max);
  }
  partial_max[chunk * num_cols + col] = chunk_max;
  partial_excess[chunk * num_cols + col] = excess + (ties - 1.0f);
}

// Merges the chunks' partials, in chunk order, into col_max/col_excess.
__global__ void col_lse_merge_kernel(const float* __restrict__ partial_max, const float* __restrict__ partial_excess,
                                     int64_t chunks, int64_t num_cols, float* col_max, float* col_excess) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= num_cols) return;
  float max = col_max[col], excess = col_excess[col];
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    lse_merge(max, excess, partial_max[chunk * num_cols + col], partial_excess[chunk * num_cols + col]);
  col_max[col] = max;
  col_excess[col] = excess;
}

// G / weight for a block: symmetric_grad (P + Q - 2 delta) or one_sided_grad (P - delta), weight 1.
// Row r's positive is block column first_positive + r. out may alias dots (each thread reads its
// entry before writing it).
template <typename out_t, bool symmetric>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const float* dots, int64_t num_rows, int64_t num_cols, const float* __restrict__ scale,
                int64_t first_positive, const float* __restrict__ row_max, const float* __restrict__ row_log_sum,
                const float* __restrict__ col_max, const float* __restrict__ col_log_sum, out_t* out) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (col >= num_cols) return;
  const float s = *scale;
  const Lse<float> col_stats = symmetric ? Lse<float>{col_max[col], col_log_sum[col]} : Lse<float>{0.0f, 0.0f};
  for (int64_t row = blockIdx.y; row < num_rows; row += gridDim.y) {
    const int64_t index = row * num_cols + col;
    const float score = logit(s, dots[index]);
    const Lse<float> row_stats{row_max[row], row_log_sum[row]};
    const bool positive = col == first_positive + row;
    const float coefficient = symmetric ? symmetric_grad(score, row_stats, col_stats, 1.0f, positive)
                                        : one_sided_grad(score, row_stats, 1.0f, positive);
    out[index] = static_cast<out_t>(coefficient);
  }
}

const float* second_row(const Tensor& state) { return state.const_data_ptr<float>() + state.stride(0); }
float* second_row_mutable(const Tensor& state) { return state.data_ptr<float>() + state.stride(0); }

void check_dots(const Tensor& dots) {
  TORCH_CHECK(dots.is_cuda() && dots.scalar_type() == at::kFloat && dots.is_contiguous(),
              "the CUDA epilogues take a contiguous fp32 block of dot products");
}

}  // namespace

// row_state (2, block rows) and col_state (2, block cols, or undefined) are strided views of the
// running (max, excess) state; positives (block rows).
void lse_epilogue_cuda(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_state,
                       const Tensor& col_state, const Tensor& positives) {
  check_dots(dots);
  const c10::cuda::OptionalCUDAGuard guard(dots.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_rows = dots.size(0), num_cols = dots.size(1);
  row_lse_kernel<<<ceil_div(num_rows, kRowsPerBlock), kThreads, 0, stream>>>(
      dots.const_data_ptr<float>(), num_rows, num_cols, scale.const_data_ptr<float>(), first_positive,
      row_state.data_ptr<float>(), second_row_mutable(row_state), positives.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!col_state.defined()) return;
  const int64_t chunks = ceil_div(num_rows, kColumnChunk);
  TORCH_CHECK(chunks <= kMaxGridY, "block of ", num_rows, " rows is too tall for the column epilogue");
  const Tensor partials = at::empty({2, chunks, num_cols}, dots.options());  // [max; excess] per chunk
  const dim3 grid(static_cast<unsigned>(ceil_div(num_cols, kThreads)), static_cast<unsigned>(chunks));
  col_lse_partial_kernel<<<grid, kThreads, 0, stream>>>(dots.const_data_ptr<float>(), num_rows, num_cols,
                                                        scale.const_data_ptr<float>(), partials[0].data_ptr<float>(),
                                                        partials[1].data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  col_lse_merge_kernel<<<ceil_div(num_cols, kThreads), kThreads, 0, stream>>>(
      partials[0].const_data_ptr<float>(), partials[1].const_data_ptr<float>(), chunks, num_cols,
      col_state.data_ptr<float>(), second_row_mutable(col_state));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// row_lse (2, block rows) and col_lse (2, block cols, or undefined): [max; log_sum] views. Writes
// G / weight into coefficients (same shape as dots; fp32 and then dots itself, or bf16/fp16).
void grad_epilogue_cuda(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_lse,
                        const Tensor& col_lse, const Tensor& coefficients) {
  check_dots(dots);
  TORCH_CHECK(coefficients.sizes() == dots.sizes() && coefficients.is_contiguous(), "bad coefficient block");
  const c10::cuda::OptionalCUDAGuard guard(dots.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_rows = dots.size(0), num_cols = dots.size(1);
  const dim3 grid(static_cast<unsigned>(ceil_div(num_cols, kThreads)),
                  static_cast<unsigned>(std::min(num_rows, kMaxGridY)));
  const bool symmetric = col_lse.defined();
  const float* col_max = symmetric ? col_lse.const_data_ptr<float>() : nullptr;
  const float* col_log_sum = symmetric ? second_row(col_lse) : nullptr;
  auto launch = [&](auto tag) {
    using out_t = decltype(tag);
    auto kernel = symmetric ? grad_kernel<out_t, true> : grad_kernel<out_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(dots.const_data_ptr<float>(), num_rows, num_cols,
                                          scale.const_data_ptr<float>(), first_positive,
                                          row_lse.const_data_ptr<float>(), second_row(row_lse), col_max, col_log_sum,
                                          coefficients.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (coefficients.scalar_type()) {
    case at::kFloat: return launch(float{});
    case at::kHalf: return launch(at::Half{});
    case at::kBFloat16: return launch(at::BFloat16{});
    default: TORCH_CHECK(false, "G blocks are float32, float16 or bfloat16, got ", coefficients.scalar_type());
  }
}

}  // namespace crossmodal
