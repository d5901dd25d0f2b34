// Fused symmetric InfoNCE (CLIP) loss: op schema, op bodies and block passes shared by both devices,
// CPU epilogues.
//
// The op bodies reduce every case to two "block passes" over S = scale * rows @ cols^T, computed one
// block of rows x columns at a time and never stored whole:
//   lse_pass:  dots = rows_p @ cols_q^T (one ATen matmul), then an epilogue merges the block's row
//              (and optionally column) log-sum-exp partials into a running (max, excess) per
//              row/column and records each row's positive logit S_{i, i+offset};
//   grad_pass: recompute dots with the same matmul, an epilogue turns them into G / weight, then
//              row_grad_p += G @ cols_q and col_grad_q += G^T @ rows_p (two more matmuls).
// The matmuls are the same ATen calls on both devices (BLAS on the CPU; cuBLAS on a GPU, tensor
// cores for bf16/fp16 features and for fp32 ones when torch allows TF32); only the epilogues are
// per device: the C++ loops below, or the kernels of contrastive_loss_cuda.cu. So the CPU tests run
// the GPU's block code, except the epilogue kernels.
// The single-process loss is one square problem (rows = images, cols = texts) whose row and column
// LSEs come from the same blocks. The distributed (local-loss) form is two one-sided b x N problems:
// local images against all texts and local texts against all images, positives at i + offset.
// An LSE is saved as a (2, n) tensor [max; log_sum] (lse = max + log_sum, see contrastive_loss.h).
// The loss and the logit-scale gradient are O(N D) ATen code.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "blocks.h"
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
// The CUDA epilogues (contrastive_loss_cuda.cu), same contracts as lse_epilogue and grad_epilogue below.
void lse_epilogue_cuda(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_state,
                       const Tensor& col_state, const Tensor& positives);
void grad_epilogue_cuda(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_lse,
                        const Tensor& col_lse, const Tensor& coefficients);
#endif

namespace {

// CPU forward epilogue. Scales a (tile_rows, tile_cols) block of raw dot products in place, merges its
// row partials into row_max/row_excess (this block's rows), records the positives that fall in the
// block (row i's is block column first_positive + i) and, unless col_max is null, merges its column
// partials into col_max/col_excess (this block's columns).
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

// CPU backward epilogue. Turns a block of raw dot products into G / weight in place: symmetric_grad
// if col_max is given, else one_sided_grad. Row i's positive is block column first_positive + i.
template <typename acc_t>
CM_SIMD_CLONES void tile_grad(acc_t* scores, int64_t tile_rows, int64_t tile_cols, acc_t scale,
                              int64_t first_positive, const acc_t* row_max, const acc_t* row_log_sum,
                              const acc_t* col_max, const acc_t* col_log_sum) {
  const acc_t weight = 1;  // the op bodies apply g / (2N) to the O(N D) products
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

// Forward epilogue of one block: merges the block's partials into row_state (2, block rows) and,
// if defined, col_state (2, block cols), both running (max, excess), and records the positives.
void lse_epilogue(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_state,
                  const Tensor& col_state, const Tensor& positives) {
#if defined(WITH_CUDA)
  if (dots.is_cuda()) return lse_epilogue_cuda(dots, scale, first_positive, row_state, col_state, positives);
#endif
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "lse_epilogue_cpu", [&] {
    const bool with_cols = col_state.defined();
    tile_lse(dots.data_ptr<scalar_t>(), dots.size(0), dots.size(1), *scale.const_data_ptr<scalar_t>(), first_positive,
             row_state.data_ptr<scalar_t>(), second_row<scalar_t>(row_state), positives.data_ptr<scalar_t>(),
             with_cols ? col_state.data_ptr<scalar_t>() : nullptr,
             with_cols ? second_row<scalar_t>(col_state) : nullptr);
  });
}

// Backward epilogue of one block: G / weight (symmetric if col_lse is defined, else one-sided) in the
// matmul operands' dtype, in place over dots where that is the accumulation dtype.
Tensor grad_epilogue(const Tensor& dots, const Tensor& scale, int64_t first_positive, const Tensor& row_lse,
                     const Tensor& col_lse, at::ScalarType operand_dtype) {
#if defined(WITH_CUDA)
  if (dots.is_cuda()) {
    const Tensor coefficients = operand_dtype == dots.scalar_type() ? dots : at::empty_like(dots, operand_dtype);
    grad_epilogue_cuda(dots, scale, first_positive, row_lse, col_lse, coefficients);
    return coefficients;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "grad_epilogue_cpu", [&] {
    const bool with_cols = col_lse.defined();
    tile_grad(dots.data_ptr<scalar_t>(), dots.size(0), dots.size(1), *scale.const_data_ptr<scalar_t>(), first_positive,
              row_lse.const_data_ptr<scalar_t>(), second_row<scalar_t>(row_lse),
              with_cols ? col_lse.const_data_ptr<scalar_t>() : nullptr,
              with_cols ? second_row<scalar_t>(col_lse) : nullptr);
  });
  return dots;
}

// Fills row_lse (2, R), col_lse (2, C) unless undefined, and positives (R) for S = scale * rows @ cols^T,
// in blocks of `block` x `block` (0: the device's default). The LSEs hold the running (max, excess)
// during the pass and (max, log_sum) after it.
void lse_pass(const Tensor& rows, const Tensor& cols, const Tensor& scale, int64_t offset, int64_t block,
              const Tensor& row_lse, const Tensor& col_lse, const Tensor& positives) {
  const bool with_cols = col_lse.defined();
  for (const Tensor& lse : {row_lse, col_lse}) {
    if (!lse.defined()) continue;
    lse[0].fill_(-std::numeric_limits<double>::infinity());
    lse[1].zero_();
  }
  for_each_feature_block(matmul_operand(rows), matmul_operand(cols), block, with_cols, [&](const FeatureBlock& b) {
    lse_epilogue(b.dots(), scale, b.row0 + offset - b.col0, b.rows_of(row_lse, 1),
                 with_cols ? b.cols_of(col_lse, 1) : Tensor(), b.rows_of(positives));
  });
  for (const Tensor& lse : {row_lse, col_lse}) {
    if (lse.defined()) lse[1].log1p_();  // excess -> log_sum (lse_log_sum)
  }
}

// row_grad += (G / weight) @ cols and col_grad += (G / weight)^T @ rows, G symmetric if col_lse is
// defined, else one-sided; row_grad and col_grad are in the accumulation dtype.
void grad_pass(const Tensor& rows, const Tensor& cols, const Tensor& scale, int64_t offset, int64_t block,
               const Tensor& row_lse, const Tensor& col_lse, const Tensor& row_grad, const Tensor& col_grad) {
  const bool wavefront = true;  // column gradients are updated: a round's blocks own distinct columns
  for_each_feature_block(matmul_operand(rows), matmul_operand(cols), block, wavefront, [&](const FeatureBlock& b) {
    const Tensor coefficients = grad_epilogue(b.dots(), scale, b.row0 + offset - b.col0, b.rows_of(row_lse, 1),
                                              col_lse.defined() ? b.cols_of(col_lse, 1) : Tensor(),
                                              b.rows.scalar_type());  // (block rows, block cols)
    b.accumulate_gradients(coefficients, row_grad, col_grad);
  });
}

// sum_i (lse_i - positive_i), with lse_i - positive_i = (max_i - positive_i) + log_sum_i: exact
// when the positive is the max, since both come from the same block.
Tensor summed_cross_entropy(const Tensor& lse, const Tensor& positives) { return ((lse[0] - positives) + lse[1]).sum(); }

// factor * (G / weight) @ features in the features' dtype, factor = scale * weight.
Tensor feature_grad(Tensor grad_acc, const Tensor& factor, at::ScalarType dtype) {
  return grad_acc.mul_(factor).to(dtype);
}

Tensor scale_grad_like(const Tensor& scale_grad, const Tensor& logit_scale) {
  return scale_grad.to(logit_scale.scalar_type()).reshape(logit_scale.sizes());
}

}  // namespace

// Returns (loss, lse of each image over the texts, lse of each text over the images), each LSE as
// (2, N) [max; log_sum] and saved for backward. Loss and LSEs are float32 (float64 for float64 features).
// `block`: rows and columns of S per matmul (0: the device's default); the backward must get the same
// value, so that its recomputed logits round exactly as the forward's.
std::tuple<Tensor, Tensor, Tensor> contrastive_loss_forward(const Tensor& image, const Tensor& text,
                                                            const Tensor& logit_scale, int64_t block) {
  const InnerCallsGuard inner_calls;
  check_features(image, text, "image_features");
  check_features(text, image, "text_features");
  TORCH_CHECK(image.size(0) == text.size(0), "image and text batches differ: ", image.size(0), " vs ", text.size(0));
  const Tensor image_c = image.contiguous(), text_c = text.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image);
  const int64_t n = image.size(0);
  Tensor lse_image = at::empty({2, n}, scale.options()), lse_text = at::empty({2, n}, scale.options());
  const Tensor positives = at::empty({n}, scale.options());  // S_ii, row i's and column i's positive
  lse_pass(image_c, text_c, scale, 0, block, lse_image, lse_text, positives);
  const Tensor loss = (summed_cross_entropy(lse_image, positives) + summed_cross_entropy(lse_text, positives)) / (2.0 * n);
  return {loss, lse_image, lse_text};
}

std::tuple<Tensor, Tensor, Tensor> contrastive_loss_backward(const Tensor& grad, const Tensor& image, const Tensor& text,
                                                             const Tensor& logit_scale, const Tensor& lse_image,
                                                             const Tensor& lse_text, int64_t block) {
  const InnerCallsGuard inner_calls;
  const Tensor image_c = image.contiguous(), text_c = text.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image);
  const int64_t n = image.size(0);
  const Tensor weight = grad.to(scale.scalar_type()).reshape({}) / (2.0 * n);  // G = weight * (P + Q - 2 delta)
  Tensor image_grad = at::zeros(image.sizes(), scale.options()), text_grad = at::zeros(text.sizes(), scale.options());
  grad_pass(image_c, text_c, scale, 0, block, lse_image.contiguous(), lse_text.contiguous(), image_grad, text_grad);
  const Tensor scale_grad = scale_grad_term(image_grad, image_c) * weight;
  const Tensor factor = scale * weight;
  return {feature_grad(image_grad, factor, image.scalar_type()), feature_grad(text_grad, factor, text.scalar_type()),
          scale_grad_like(scale_grad, logit_scale)};
}

// open_clip's local loss on one rank: 0.5 * (CE(scale * image_local @ text_all^T, offset + arange(b)) +
// CE(scale * text_local @ image_all^T, same labels)), both means over the b local rows.
// Returns (loss, lse of each local image over all texts, lse of each local text over all images).
std::tuple<Tensor, Tensor, Tensor> contrastive_loss_local_forward(const Tensor& image_local, const Tensor& text_local,
                                                                  const Tensor& image_all, const Tensor& text_all,
                                                                  const Tensor& logit_scale, int64_t offset,
                                                                  int64_t block) {
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
  lse_pass(image_local.contiguous(), text_all.contiguous(), scale, offset, block, lse_image, Tensor(), image_positives);
  lse_pass(text_local.contiguous(), image_all.contiguous(), scale, offset, block, lse_text, Tensor(), text_positives);
  const Tensor loss =
      (summed_cross_entropy(lse_image, image_positives) + summed_cross_entropy(lse_text, text_positives)) / (2.0 * b);
  return {loss, lse_image, lse_text};
}

// Gradients for (image_local, text_local, image_all, text_all, logit_scale).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> contrastive_loss_local_backward(
    const Tensor& grad, const Tensor& image_local, const Tensor& text_local, const Tensor& image_all,
    const Tensor& text_all, const Tensor& logit_scale, int64_t offset, const Tensor& lse_image, const Tensor& lse_text,
    int64_t block) {
  const InnerCallsGuard inner_calls;
  const Tensor image_local_c = image_local.contiguous(), text_local_c = text_local.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image_local);
  const Tensor weight = grad.to(scale.scalar_type()).reshape({}) / (2.0 * image_local.size(0));
  auto zeros_like_acc = [&](const Tensor& t) { return at::zeros(t.sizes(), scale.options()); };
  Tensor image_local_grad = zeros_like_acc(image_local), text_local_grad = zeros_like_acc(text_local);
  Tensor image_all_grad = zeros_like_acc(image_all), text_all_grad = zeros_like_acc(text_all);
  grad_pass(image_local_c, text_all.contiguous(), scale, offset, block, lse_image.contiguous(), Tensor(),
            image_local_grad, text_all_grad);
  grad_pass(text_local_c, image_all.contiguous(), scale, offset, block, lse_text.contiguous(), Tensor(),
            text_local_grad, image_all_grad);
  const Tensor scale_grad =
      (scale_grad_term(image_local_grad, image_local_c) + scale_grad_term(text_local_grad, text_local_c)) * weight;
  const Tensor factor = scale * weight;
  const auto dtype = image_local.scalar_type();
  return {feature_grad(image_local_grad, factor, dtype), feature_grad(text_local_grad, factor, dtype),
          feature_grad(image_all_grad, factor, dtype), feature_grad(text_all_grad, factor, dtype),
          scale_grad_like(scale_grad, logit_scale)};
}

TORCH_LIBRARY(crossmodal, m) {
  m.def(
      "contrastive_loss_forward(Tensor image, Tensor text, Tensor logit_scale, int block=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor image, Tensor text, Tensor logit_scale, Tensor lse_image, "
      "Tensor lse_text, int block=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_local_forward(Tensor image_local, Tensor text_local, Tensor image_all, Tensor text_all, "
      "Tensor logit_scale, int offset, int block=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_local_backward(Tensor grad, Tensor image_local, Tensor text_local, Tensor image_all, "
      "Tensor text_all, Tensor logit_scale, int offset, Tensor lse_image, Tensor lse_text, int block=0) "
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
