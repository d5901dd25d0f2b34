// The block machinery shared by the fused losses (contrastive_loss.cpp: InfoNCE; siglip_loss.cpp: sigmoid):
// block sizes, the block schedule, the matmul operands and products, and the checks of the op inputs.
// Each loss's op is a pass (or two) over the blocks of S = scale * rows @ cols^T: one ATen matmul per
// block (BLAS on the CPU, cuBLAS on a GPU) and a per-device epilogue; S is never stored whole.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "contrastive_loss.h"

namespace crossmodal {

using at::Tensor;

// Default block edges (rows and columns of S per matmul), used when the op's `block` argument is 0.
// CPU: 256 x 256, many blocks at once on the threads: big enough for BLAS to run near its peak
// (measured ~110 GFLOP/s per core on 256 x 512 x 256, as on large matrices), small enough (256 KiB
// in fp32) to stay in L2. CUDA: 4096 x 4096, one block after another: each cuBLAS call (K = D for
// the logits, K = 4096 for the gradient products) fills the GPU, and the scratch is bounded by
// 64 MiB of fp32 dots plus, for bf16/fp16 features, 32 MiB of G in their dtype.
constexpr int64_t kCpuBlock = 256;
constexpr int64_t kCudaBlock = 4096;

inline int64_t block_edge(const Tensor& features, int64_t block) {
  TORCH_CHECK(block >= 0, "block must be >= 0 (0: the device's default), got ", block);
  if (block > 0) return block;
  return features.is_cuda() ? kCudaBlock : kCpuBlock;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The exp loops in AVX-512 or AVX2 where the CPU has them, chosen at load time (baseline: SSE2).
#define CM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CM_SIMD_CLONES
#endif

// The op bodies' own ATen calls run below autograd and autocast: they must record no graph (the op
// has its own backward), and autocast must not turn the fp32 block matmuls into bf16/fp16 ones when
// the op is called inside a torch.autocast region.
struct InnerCallsGuard {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Calls block(p, q) for every (row block p, column block q), round by round (see wavefront_column).
// On the CPU the row blocks of a round run on the threads at once: with `wavefront`, one round per
// parallel region, so block() may update per-column state without locks; without it each row block
// walks all column blocks in one task (enough when only rows are updated). On a GPU blocks run one
// after another in the same order (each matmul and epilogue fills the device by itself).
template <typename BlockFn>
void for_each_block(int64_t row_blocks, int64_t col_blocks, bool parallel, bool wavefront, const BlockFn& block) {
  const int64_t rounds = std::max(row_blocks, col_blocks);
  if (!parallel) {
    for (int64_t k = 0; k < rounds; ++k)
      for (int64_t p = 0; p < row_blocks; ++p) {
        const int64_t q = wavefront_column(p, k, rounds);
        if (q < col_blocks) block(p, q);
      }
    return;
  }
  auto run_rounds = [&](int64_t first_round, int64_t last_round) {
    at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads start with default thread-local state: without this guard, at::mm on
      // features that require grad would record an autograd graph holding every tile.
      const InnerCallsGuard inner_calls;
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t k = first_round; k < last_round; ++k) {
          const int64_t q = wavefront_column(p, k, rounds);
          if (q < col_blocks) block(p, q);
        }
      }
    });
  };
  if (wavefront) {
    for (int64_t k = 0; k < rounds; ++k) run_rounds(k, k + 1);
  } else {
    run_rounds(0, rounds);
  }
}

inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The matmul operands: on the CPU fp32 (fp64) copies of the features, as BLAS has no fast bf16/fp16
// path; on a GPU the features themselves, so cuBLAS runs bf16/fp16 on tensor cores.
inline Tensor matmul_operand(const Tensor& features) {
  if (!features.is_cuda()) return features.to(acc_dtype(features.scalar_type())).contiguous();
  const auto dtype = features.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "the fused CUDA losses support float32, float16 and bfloat16, got ", dtype,
              " (use backend='torch')");
  return features.contiguous();
}

// a @ b in the accumulation dtype: bf16/fp16 products accumulate in fp32 inside cuBLAS.
inline Tensor block_product(const Tensor& a, const Tensor& b) {
  const auto acc = acc_dtype(a.scalar_type());
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

// out += a @ b, out in the accumulation dtype.
inline void accumulate_product(const Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b);
  } else {
    out.add_(at::mm(a, b, out.scalar_type()));
  }
}

// The raw dot products rows_block @ cols_block^T in the accumulation dtype, (block rows, block cols).
// Both passes call exactly this on the same blocks, so the backward's logits round as the forward's.
inline Tensor block_dots(const Tensor& rows_block, const Tensor& cols_block) {
  return block_product(rows_block, cols_block.t());
}

// One block of S = scale * rows @ cols^T: where it starts and its rows' and columns' matmul operands.
struct FeatureBlock {
  int64_t row0, col0;
  Tensor rows, cols;  // (block rows, D), (block cols, D)

  Tensor dots() const { return block_dots(rows, cols); }  // (block rows, block cols), the accumulation dtype
  // The block's rows (columns) of per-row (per-column) state t along dim.
  Tensor rows_of(const Tensor& t, int64_t dim = 0) const { return t.narrow(dim, row0, rows.size(0)); }
  Tensor cols_of(const Tensor& t, int64_t dim = 0) const { return t.narrow(dim, col0, cols.size(0)); }
  // row_grad += G @ cols and col_grad += G^T @ rows for this block's G = dL/dS (block rows, block cols).
  void accumulate_gradients(const Tensor& coefficients, const Tensor& row_grad, const Tensor& col_grad) const {
    accumulate_product(rows_of(row_grad), coefficients, cols);
    accumulate_product(cols_of(col_grad), coefficients.t(), rows);
  }
};

// Calls fn(FeatureBlock) for every block of the operands rows_op (R, D) against cols_op (C, D), `block` rows and
// columns each (0: the device's default), in for_each_block's order (with `wavefront`, a round's blocks own
// distinct columns).
template <typename Fn>
void for_each_feature_block(const Tensor& rows_op, const Tensor& cols_op, int64_t block, bool wavefront,
                            const Fn& fn) {
  const int64_t num_rows = rows_op.size(0), num_cols = cols_op.size(0), edge = block_edge(rows_op, block);
  auto block_fn = [&](int64_t p, int64_t q) {
    const int64_t row0 = p * edge, col0 = q * edge;
    fn(FeatureBlock{row0, col0, rows_op.narrow(0, row0, std::min(edge, num_rows - row0)),
                    cols_op.narrow(0, col0, std::min(edge, num_cols - col0))});
  };
  for_each_block(ceil_div(num_rows, edge), ceil_div(num_cols, edge), !rows_op.is_cuda(), wavefront, block_fn);
}

template <typename acc_t>
acc_t* second_row(const Tensor& state) {  // (2, n) view -> pointer to its row 1
  return state.data_ptr<acc_t>() + state.stride(0);
}

inline void check_features(const Tensor& features, const Tensor& like, const char* name) {
  TORCH_CHECK(features.dim() == 2, name, " must be 2-D (batch, dim), got ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), name, " must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(features.scalar_type() == like.scalar_type(), name, " has dtype ", features.scalar_type(),
              " but the other features have ", like.scalar_type());
  TORCH_CHECK(features.device() == like.device(), name, " is on ", features.device(), " but the other features on ",
              like.device());
  TORCH_CHECK(features.size(1) == like.size(1), name, " has dim ", features.size(1), ", expected ", like.size(1));
  TORCH_CHECK(features.size(0) > 0 && features.size(1) > 0, name, " is empty");
}

// logit_scale (or another scalar input, `name`) as a 0-dim tensor of the accumulation dtype on the features'
// device.
inline Tensor scale_tensor(const Tensor& logit_scale, const Tensor& features, const char* name = "logit_scale") {
  TORCH_CHECK(logit_scale.numel() == 1, name, " must hold one value, got shape ", logit_scale.sizes());
  TORCH_CHECK(logit_scale.device() == features.device(), name, " is on ", logit_scale.device(),
              " but the features on ", features.device());
  return logit_scale.reshape({}).to(acc_dtype(features.scalar_type()));
}

// dL/dscale = sum_ij G_ij (rows_i . cols_j) = sum_i <rows_i, (G @ cols)_i>: no extra pass over blocks.
inline Tensor scale_grad_term(const Tensor& row_grad, const Tensor& rows) {
  return (row_grad * rows.to(row_grad.scalar_type())).sum();
}

}  // namespace crossmodal
