// Fused symmetric InfoNCE (CLIP) loss: op schema, device-independent op bodies, CPU tile passes.
//
// The op bodies reduce every case to two "tile passes" over S = scale * rows @ cols^T:
//   lse_pass:  row (and optionally column) log-sum-exp from a running (max, excess) per row/column,
//              plus each row's positive logit S_{i, i+offset}, read from the tile that holds it;
//   grad_pass: recompute each tile, form G, accumulate G @ cols into row_grad and G^T @ rows into
//              col_grad.
// The single-process loss is one square problem (rows = images, cols = texts) whose row and column
// LSEs come from the same tiles. The distributed (local-loss) form is two one-sided b x N problems:
// local images against all texts and local texts against all images, positives at i + offset.
// An LSE is saved as a (2, n) tensor [max; log_sum] (lse = max + log_sum, see contrastive_loss.h).
// The loss and the logit-scale gradient are O(N D) ATen code shared by both devices; the CUDA
// passes live in contrastive_loss_cuda.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "contrastive_loss.h"

// `import kernels._C` only has to run the static initialisers below that register the op.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace crossmodal {

using at::Tensor;

#if defined(WITH_CUDA)
void lse_pass_cuda(const Tensor& rows, const Tensor& cols, const Tensor& scale, int64_t offset, const Tensor& row_lse,
                   const Tensor& col_lse, const Tensor& positives);
void grad_pass_cuda(const Tensor& rows, const Tensor& cols, const Tensor& scale, const Tensor& weight,
                    int64_t offset, const Tensor& row_lse, const Tensor& col_lse, const Tensor& row_grad,
                    const Tensor& col_grad);
#endif

namespace {

// 256 x 256 tiles: big enough for BLAS to run near its peak (measured ~110 GFLOP/s per core on
// 256 x 512 x 256, as on large matrices), small enough (256 KiB in fp32) to stay in L2.
constexpr int64_t kCpuTile = 256;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The exp loops in AVX-512 or AVX2 where the CPU has them, chosen at load time (baseline: SSE2).
#define CM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CM_SIMD_CLONES
#endif

// The op bodies' own ATen calls run below autograd and autocast: they must record no graph (the op
// has its own backward), and autocast must not turn the fp32 tile matmuls into bf16/fp16 ones when
// the op is called inside a torch.autocast region.
struct InnerCallsGuard {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Calls tile(p, q) for every (row block p, column block q). With `wavefront`, tiles run round by
// round (see wavefront_column), so tile() may update per-column state without locks; without it
// each row block walks all column blocks in one task (enough when only rows are updated).
template <typename TileFn>
void for_each_tile(int64_t row_blocks, int64_t col_blocks, bool wavefront, const TileFn& tile) {
  const int64_t rounds = std::max(row_blocks, col_blocks);
  auto run_rounds = [&](int64_t first_round, int64_t last_round) {
    at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads start with default thread-local state: without this guard, at::mm on
      // features that require grad would record an autograd graph holding every tile.
      const InnerCallsGuard inner_calls;
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t k = first_round; k < last_round; ++k) {
          const int64_t q = wavefront_column(p, k, rounds);
          if (q < col_blocks) tile(p, q);
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

// Scales a (tile_rows, tile_cols) tile of raw dot products in place, merges its row partials into
// row_max/row_excess (this tile's rows), records the positives that fall in the tile (row i's is
// tile column first_positive + i) and, unless col_max is null, merges its column partials into
// col_max/col_excess (this tile's columns).
template <typename acc_t>
CM_SIMD_CLONES void tile_lse(acc_t* scores, int64_t tile_rows, int64_t tile_cols, acc_t scale, int64_t first_positive,
                             acc_t* row_max, acc_t* row_excess, acc_t* positives, acc_t* col_max, acc_t* col_excess) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> tile_col_max(col_max != nullptr ? tile_cols : 0, kNegInf);
  std::vector<acc_t> tile_col_excess(col_max != nullptr ? tile_cols : 0, 0);
  std::vector<acc_t> tile_col_ties(col_max != nullptr ? tile_cols : 0, 0);
  for (int64_t i = 0; i < tile_rows; ++i) {
    acc_t* s = scores + i * tile_cols;
    acc_t tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < tile_cols; ++j) {
      s[j] *= scale;
      tile_max = max_of(tile_max, s[j]);
    }
    acc_t tile_excess = 0, ties = 0;
#pragma omp simd reduction(+ : tile_excess, ties)
    for (int64_t j = 0; j < tile_cols; ++j) {
      tile_excess += excess_term(s[j], tile_max);
      ties += tie_term(s[j], tile_max);
    }
    lse_merge(row_max[i], row_excess[i], tile_max, tile_excess + (ties - 1));
    const int64_t positive = first_positive + i;
    if (positive >= 0 && positive < tile_cols) positives[i] = s[positive];
    if (col_max == nullptr) continue;
#pragma omp simd
    for (int64_t j = 0; j < tile_cols; ++j) tile_col_max[j] = max_of(tile_col_max[j], s[j]);
  }
  if (col_max == nullptr) return;
  for (int64_t i = 0; i < tile_rows; ++i) {
    const acc_t* s = scores + i * tile_cols;
#pragma omp simd
    for (int64_t j = 0; j < tile_cols; ++j) {
      tile_col_excess[j] += excess_term(s[j], tile_col_max[j]);
      tile_col_ties[j] += tie_term(s[j], tile_col_max[j]);
    }
  }
  for (int64_t j = 0; j < tile_cols; ++j)
    lse_merge(col_max[j], col_excess[j], tile_col_max[j], tile_col_excess[j] + (tile_col_ties[j] - 1));
}

// Turns a tile of raw dot products into G in place: symmetric_grad if col_max is given, else
// one_sided_grad. Row i's positive is tile column first_positive + i.
template <typename acc_t>
CM_SIMD_CLONES void tile_grad(acc_t* scores, int64_t tile_rows, int64_t tile_cols, acc_t scale, acc_t weight,
                              int64_t first_positive, const acc_t* row_max, const acc_t* row_log_sum,
                              const acc_t* col_max, const acc_t* col_log_sum) {
  for (int64_t i = 0; i < tile_rows; ++i) {
    acc_t* g = scores + i * tile_cols;
    const Lse<acc_t> row{row_max[i], row_log_sum[i]};
    const int64_t positive = first_positive + i;
    const bool has_positive = positive >= 0 && positive < tile_cols;
    const acc_t positive_score = has_positive ? scale * g[positive] : 0;
    if (col_max != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < tile_cols; ++j)
        g[j] = symmetric_grad(scale * g[j], row, Lse<acc_t>{col_max[j], col_log_sum[j]}, weight, false);
      if (has_positive)
        g[positive] = symmetric_grad(positive_score, row, Lse<acc_t>{col_max[positive], col_log_sum[positive]},
                                     weight, true);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < tile_cols; ++j) g[j] = one_sided_grad(scale * g[j], row, weight, false);
      if (has_positive) g[positive] = one_sided_grad(positive_score, row, weight, true);
    }
  }
}

// row_lse (2, R) [and col_lse (2, C)] hold the running (max, excess) during the pass and
// (max, log_sum) after it.
template <typename acc_t>
void lse_pass_cpu_typed(const Tensor& rows, const Tensor& cols, acc_t scale, int64_t offset, acc_t* row_lse,
                        acc_t* col_lse, acc_t* positives) {
  const int64_t num_rows = rows.size(0), num_cols = cols.size(0);
  const bool with_cols = col_lse != nullptr;
  std::fill(row_lse, row_lse + num_rows, -std::numeric_limits<acc_t>::infinity());
  std::fill(row_lse + num_rows, row_lse + 2 * num_rows, acc_t(0));
  if (with_cols) {
    std::fill(col_lse, col_lse + num_cols, -std::numeric_limits<acc_t>::infinity());
    std::fill(col_lse + num_cols, col_lse + 2 * num_cols, acc_t(0));
  }
  auto tile = [&](int64_t p, int64_t q) {
    const int64_t row0 = p * kCpuTile, col0 = q * kCpuTile;
    const int64_t tile_rows = std::min(kCpuTile, num_rows - row0), tile_cols = std::min(kCpuTile, num_cols - col0);
    Tensor scores = at::mm(rows.narrow(0, row0, tile_rows), cols.narrow(0, col0, tile_cols).t());  // (tile_rows, tile_cols)
    tile_lse(scores.data_ptr<acc_t>(), tile_rows, tile_cols, scale, row0 + offset - col0, row_lse + row0,
             row_lse + num_rows + row0, positives + row0, with_cols ? col_lse + col0 : nullptr,
             with_cols ? col_lse + num_cols + col0 : nullptr);
  };
  for_each_tile(ceil_div(num_rows, kCpuTile), ceil_div(num_cols, kCpuTile), with_cols, tile);
  for (int64_t i = 0; i < num_rows; ++i) row_lse[num_rows + i] = lse_log_sum(row_lse[num_rows + i]);
  for (int64_t j = 0; with_cols && j < num_cols; ++j) col_lse[num_cols + j] = lse_log_sum(col_lse[num_cols + j]);
}

template <typename acc_t>
void grad_pass_cpu_typed(const Tensor& rows, const Tensor& cols, acc_t scale, acc_t weight, int64_t offset,
                         const acc_t* row_lse, const acc_t* col_lse, const Tensor& row_grad, const Tensor& col_grad) {
  const int64_t num_rows = rows.size(0), num_cols = cols.size(0);
  auto tile = [&](int64_t p, int64_t q) {
    const int64_t row0 = p * kCpuTile, col0 = q * kCpuTile;
    const int64_t tile_rows = std::min(kCpuTile, num_rows - row0), tile_cols = std::min(kCpuTile, num_cols - col0);
    const Tensor tile_rows_features = rows.narrow(0, row0, tile_rows);  // (tile_rows, D)
    const Tensor tile_cols_features = cols.narrow(0, col0, tile_cols);  // (tile_cols, D)
    Tensor coefficients = at::mm(tile_rows_features, tile_cols_features.t());  // scores, then G in place
    tile_grad(coefficients.data_ptr<acc_t>(), tile_rows, tile_cols, scale, weight, row0 + offset - col0,
              row_lse + row0, row_lse + num_rows + row0, col_lse == nullptr ? nullptr : col_lse + col0,
              col_lse == nullptr ? nullptr : col_lse + num_cols + col0);
    row_grad.narrow(0, row0, tile_rows).addmm_(coefficients, tile_cols_features);
    col_grad.narrow(0, col0, tile_cols).addmm_(coefficients.t(), tile_rows_features);
  };
  for_each_tile(ceil_div(num_rows, kCpuTile), ceil_div(num_cols, kCpuTile), /*wavefront=*/true, tile);
}

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

template <typename acc_t>
acc_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// Fills row_lse (2, R), col_lse (2, C) unless undefined, and positives (R) for S = scale * rows @ cols^T.
void lse_pass(const Tensor& rows, const Tensor& cols, const Tensor& scale, int64_t offset, const Tensor& row_lse,
              const Tensor& col_lse, const Tensor& positives) {
#if defined(WITH_CUDA)
  if (rows.is_cuda()) return lse_pass_cuda(rows, cols, scale, offset, row_lse, col_lse, positives);
#endif
  const auto acc = acc_dtype(rows.scalar_type());
  const Tensor rows_acc = rows.to(acc).contiguous(), cols_acc = cols.to(acc).contiguous();  // BLAS operands
  AT_DISPATCH_FLOATING_TYPES(acc, "lse_pass_cpu", [&] {
    lse_pass_cpu_typed<scalar_t>(rows_acc, cols_acc, scale.item<scalar_t>(), offset, row_lse.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(col_lse), positives.data_ptr<scalar_t>());
  });
}

// row_grad += G @ cols and col_grad += G^T @ rows, G symmetric if col_lse is defined, else one-sided.
void grad_pass(const Tensor& rows, const Tensor& cols, const Tensor& scale, const Tensor& weight, int64_t offset,
               const Tensor& row_lse, const Tensor& col_lse, const Tensor& row_grad, const Tensor& col_grad) {
#if defined(WITH_CUDA)
  if (rows.is_cuda()) return grad_pass_cuda(rows, cols, scale, weight, offset, row_lse, col_lse, row_grad, col_grad);
#endif
  const auto acc = acc_dtype(rows.scalar_type());
  const Tensor rows_acc = rows.to(acc).contiguous(), cols_acc = cols.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "grad_pass_cpu", [&] {
    grad_pass_cpu_typed<scalar_t>(rows_acc, cols_acc, scale.item<scalar_t>(), weight.item<scalar_t>(), offset,
                                  row_lse.data_ptr<scalar_t>(), data_or_null<scalar_t>(col_lse), row_grad, col_grad);
  });
}

void check_features(const Tensor& features, const Tensor& like, const char* name) {
  TORCH_CHECK(features.dim() == 2, name, " must be 2-D (batch, dim), got ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), name, " must be floating point, got ", features.scalar_type());
  TORCH_CHECK(features.scalar_type() == like.scalar_type(), name, " has dtype ", features.scalar_type(),
              " but the other features have ", like.scalar_type());
  TORCH_CHECK(features.device() == like.device(), name, " is on ", features.device(), " but the other features on ",
              like.device());
  TORCH_CHECK(features.size(1) == like.size(1), name, " has dim ", features.size(1), ", expected ", like.size(1));
  TORCH_CHECK(features.size(0) > 0 && features.size(1) > 0, name, " is empty");
}

// logit_scale as a 0-dim tensor of the accumulation dtype on the features' device.
Tensor scale_tensor(const Tensor& logit_scale, const Tensor& features) {
  TORCH_CHECK(logit_scale.numel() == 1, "logit_scale must hold one value, got shape ", logit_scale.sizes());
  TORCH_CHECK(logit_scale.device() == features.device(), "logit_scale is on ", logit_scale.device(),
              " but the features on ", features.device());
  return logit_scale.reshape({}).to(acc_dtype(features.scalar_type()));
}

// sum_i (lse_i - positive_i), with lse_i - positive_i = (max_i - positive_i) + log_sum_i: exact
// when the positive is the max, since both come from the same tile.
Tensor summed_cross_entropy(const Tensor& lse, const Tensor& positives) { return ((lse[0] - positives) + lse[1]).sum(); }

// dL/dscale = sum_ij G_ij (rows_i . cols_j) = sum_i <rows_i, (G @ cols)_i>: no extra pass over tiles.
Tensor scale_grad_term(const Tensor& row_grad, const Tensor& rows) {
  return (row_grad * rows.to(row_grad.scalar_type())).sum();
}

// scale * (G @ features) in the features' dtype.
Tensor feature_grad(Tensor grad_acc, const Tensor& scale, at::ScalarType dtype) { return grad_acc.mul_(scale).to(dtype); }

Tensor scale_grad_like(const Tensor& scale_grad, const Tensor& logit_scale) {
  return scale_grad.to(logit_scale.scalar_type()).reshape(logit_scale.sizes());
}

}  // namespace

// Returns (loss, lse of each image over the texts, lse of each text over the images), each LSE as
// (2, N) [max; log_sum] and saved for backward. Loss and LSEs are float32 (float64 for float64 features).
std::tuple<Tensor, Tensor, Tensor> contrastive_loss_forward(const Tensor& image, const Tensor& text,
                                                            const Tensor& logit_scale) {
  const InnerCallsGuard inner_calls;
  check_features(image, text, "image_features");
  check_features(text, image, "text_features");
  TORCH_CHECK(image.size(0) == text.size(0), "image and text batches differ: ", image.size(0), " vs ", text.size(0));
  const Tensor image_c = image.contiguous(), text_c = text.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image);
  const int64_t n = image.size(0);
  Tensor lse_image = at::empty({2, n}, scale.options()), lse_text = at::empty({2, n}, scale.options());
  const Tensor positives = at::empty({n}, scale.options());  // S_ii, row i's and column i's positive
  lse_pass(image_c, text_c, scale, 0, lse_image, lse_text, positives);
  const Tensor loss = (summed_cross_entropy(lse_image, positives) + summed_cross_entropy(lse_text, positives)) / (2.0 * n);
  return {loss, lse_image, lse_text};
}

std::tuple<Tensor, Tensor, Tensor> contrastive_loss_backward(const Tensor& grad, const Tensor& image, const Tensor& text,
                                                             const Tensor& logit_scale, const Tensor& lse_image,
                                                             const Tensor& lse_text) {
  const InnerCallsGuard inner_calls;
  const Tensor image_c = image.contiguous(), text_c = text.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image);
  const int64_t n = image.size(0);
  const Tensor weight = grad.to(scale.scalar_type()).reshape({}) / (2.0 * n);  // G = weight * (P + Q - 2 delta)
  Tensor image_grad = at::zeros(image.sizes(), scale.options()), text_grad = at::zeros(text.sizes(), scale.options());
  grad_pass(image_c, text_c, scale, weight, 0, lse_image.contiguous(), lse_text.contiguous(), image_grad, text_grad);
  const Tensor scale_grad = scale_grad_term(image_grad, image_c);
  return {feature_grad(image_grad, scale, image.scalar_type()), feature_grad(text_grad, scale, text.scalar_type()),
          scale_grad_like(scale_grad, logit_scale)};
}

// open_clip's local loss on one rank: 0.5 * (CE(scale * image_local @ text_all^T, offset + arange(b)) +
// CE(scale * text_local @ image_all^T, same labels)), both means over the b local rows.
// Returns (loss, lse of each local image over all texts, lse of each local text over all images).
std::tuple<Tensor, Tensor, Tensor> contrastive_loss_local_forward(const Tensor& image_local, const Tensor& text_local,
                                                                  const Tensor& image_all, const Tensor& text_all,
                                                                  const Tensor& logit_scale, int64_t offset) {
  const InnerCallsGuard inner_calls;
  check_features(image_local, image_all, "image_local");
  check_features(text_local, image_all, "text_local");
  check_features(text_all, image_all, "text_all");
  const int64_t b = image_local.size(0), n = image_all.size(0);
  TORCH_CHECK(text_local.size(0) == b && text_all.size(0) == n, "expected ", b, " local and ", n,
              " gathered rows of each modality");
  TORCH_CHECK(offset >= 0 && offset + b <= n, "offset ", offset, " puts the ", b, " local rows outside the ", n,
              " gathered ones");
  const Tensor scale = scale_tensor(logit_scale, image_local);
  Tensor lse_image = at::empty({2, b}, scale.options()), lse_text = at::empty({2, b}, scale.options());
  const Tensor image_positives = at::empty({b}, scale.options()), text_positives = at::empty({b}, scale.options());
  lse_pass(image_local.contiguous(), text_all.contiguous(), scale, offset, lse_image, Tensor(), image_positives);
  lse_pass(text_local.contiguous(), image_all.contiguous(), scale, offset, lse_text, Tensor(), text_positives);
  const Tensor loss =
      (summed_cross_entropy(lse_image, image_positives) + summed_cross_entropy(lse_text, text_positives)) / (2.0 * b);
  return {loss, lse_image, lse_text};
}

// Gradients for (image_local, text_local, image_all, text_all, logit_scale).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> contrastive_loss_local_backward(
    const Tensor& grad, const Tensor& image_local, const Tensor& text_local, const Tensor& image_all,
    const Tensor& text_all, const Tensor& logit_scale, int64_t offset, const Tensor& lse_image, const Tensor& lse_text) {
  const InnerCallsGuard inner_calls;
  const Tensor image_local_c = image_local.contiguous(), text_local_c = text_local.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image_local);
  const Tensor weight = grad.to(scale.scalar_type()).reshape({}) / (2.0 * image_local.size(0));
  auto zeros_like_acc = [&](const Tensor& t) { return at::zeros(t.sizes(), scale.options()); };
  Tensor image_local_grad = zeros_like_acc(image_local), text_local_grad = zeros_like_acc(text_local);
  Tensor image_all_grad = zeros_like_acc(image_all), text_all_grad = zeros_like_acc(text_all);
  grad_pass(image_local_c, text_all.contiguous(), scale, weight, offset, lse_image.contiguous(), Tensor(),
            image_local_grad, text_all_grad);
  grad_pass(text_local_c, image_all.contiguous(), scale, weight, offset, lse_text.contiguous(), Tensor(),
            text_local_grad, image_all_grad);
  const Tensor scale_grad = scale_grad_term(image_local_grad, image_local_c) + scale_grad_term(text_local_grad, text_local_c);
  const auto dtype = image_local.scalar_type();
  return {feature_grad(image_local_grad, scale, dtype), feature_grad(text_local_grad, scale, dtype),
          feature_grad(image_all_grad, scale, dtype), feature_grad(text_all_grad, scale, dtype),
          scale_grad_like(scale_grad, logit_scale)};
}

TORCH_LIBRARY(crossmodal, m) {
  m.def("contrastive_loss_forward(Tensor image, Tensor text, Tensor logit_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor image, Tensor text, Tensor logit_scale, Tensor lse_image, "
      "Tensor lse_text) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_local_forward(Tensor image_local, Tensor text_local, Tensor image_all, Tensor text_all, "
      "Tensor logit_scale, int offset) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_local_backward(Tensor grad, Tensor image_local, Tensor text_local, Tensor image_all, "
      "Tensor text_all, Tensor logit_scale, int offset, Tensor lse_image, Tensor lse_text) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crossmodal, CPU, m) {
  m.impl("contrastive_loss_forward", &contrastive_loss_forward);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward);
  m.impl("contrastive_loss_local_forward", &contrastive_loss_local_forward);
  m.impl("contrastive_loss_local_backward", &contrastive_loss_local_backward);
}

#if defined(WITH_CUDA)
TORCH_LIBRARY_IMPL(crossmodal, CUDA, m) {
  m.impl("contrastive_loss_forward", &contrastive_loss_forward);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward);
  m.impl("contrastive_loss_local_forward", &contrastive_loss_local_forward);
  m.impl("contrastive_loss_local_backward", &contrastive_loss_local_backward);
}
#endif

}  // namespace crossmodal
