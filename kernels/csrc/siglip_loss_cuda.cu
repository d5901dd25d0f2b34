// CUDA epilogue of the fused sigmoid (SigLIP) loss (the block pass is in siglip_loss.cpp).
//
// The block's matmuls (dots = rows_p @ cols_q^T, G @ cols_q, G^T @ rows_p) run on cuBLAS; this kernel is
// the elementwise work between them: a warp per row reads the fp32 dots once, adds the row's softplus
// terms (and, with gradients, its sum of G) to the running per-row sums, and writes G = dL/dS (without
// the 1/b) in the features' dtype, the operand of the next two matmuls. Blocks run one after another on
// the current stream, so each per-row sum has a single writer: no atomics, deterministic results.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "siglip_loss.h"

namespace crossmodal {

using at::Tensor;

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 8 warps, one row each
constexpr int kThreads = kWarp * kRowsPerBlock;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) x += __shfl_xor_sync(0xffffffffu, x, delta);
  return x;
}

// Row r of the block: entries u = +-(scale * dot + bias) (minus on the positive, block column
// first_positive + r), loss terms softplus(u), gradients +-sigmoid(u). out may alias dots (each lane
// reads its entry before writing it); with_grad false leaves out and row_grad_sum alone.
template <typename out_t, bool with_grad>
__global__ void __launch_bounds__(kThreads)
    siglip_kernel(const float* dots, int64_t num_rows, int64_t num_cols, const float* __restrict__ scale,
                  const float* __restrict__ bias, int64_t first_positive, float* row_loss, float* row_grad_sum,
                  out_t* out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (row >= num_rows) return;  // the whole warp
  const float s = *scale, b = *bias;
  const int64_t positive = first_positive + row;
  float loss = 0.0f, grad_sum = 0.0f;
  for (int64_t j = lane; j < num_cols; j += kWarp) {
    const int64_t index = row * num_cols + j;
    const float logit = fmaf(s, dots[index], b);
    const float sign = j == positive ? -1.0f : 1.0f;
    const float u = sign * logit;
    const float e = exp_minus_abs(u);
    loss += softplus_of(u, e);
    if (with_grad) {
      const float g = sign * sigmoid_of(u, e);
      grad_sum += g;
      out[index] = static_cast<out_t>(g);
    }
  }
  loss = warp_sum(loss);
  if (with_grad) grad_sum = warp_sum(grad_sum);
  if (lane == 0) {
    row_loss[row] += loss;
    if (with_grad) row_grad_sum[row] += grad_sum;
  }
}

}  // namespace

// dots: a contiguous fp32 (block rows, block cols) block; row_loss and row_grad_sum (undefined without
// gradients): (block rows) views of the running sums; coefficients: G's destination (dots itself, or a
// bf16/fp16 block), unused without gradients.
void siglip_epilogue_cuda(const Tensor& dots, const Tensor& scale, const Tensor& bias, int64_t first_positive,
                          const Tensor& row_loss, const Tensor& row_grad_sum, const Tensor& coefficients) {
  TORCH_CHECK(dots.is_cuda() && dots.scalar_type() == at::kFloat && dots.is_contiguous(),
              "the CUDA epilogue takes a contiguous fp32 block of dot products");
  TORCH_CHECK(coefficients.sizes() == dots.sizes() && coefficients.is_contiguous(), "bad coefficient block");
  const c10::cuda::OptionalCUDAGuard guard(dots.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_rows = dots.size(0), num_cols = dots.size(1);
  const auto grid = static_cast<unsigned>(ceil_div(num_rows, kRowsPerBlock));
  const bool with_grad = row_grad_sum.defined();
  float* grad_sum = with_grad ? row_grad_sum.data_ptr<float>() : nullptr;
  auto launch = [&](auto tag) {
    using out_t = decltype(tag);
    auto kernel = with_grad ? siglip_kernel<out_t, true> : siglip_kernel<out_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(dots.const_data_ptr<float>(), num_rows, num_cols,
                                          scale.const_data_ptr<float>(), bias.const_data_ptr<float>(), first_positive,
                                          row_loss.data_ptr<float>(), grad_sum, coefficients.data_ptr<out_t>());
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
