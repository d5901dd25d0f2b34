// Fused sigmoid (SigLIP) loss: op schema, op body and block pass shared by both devices, CPU epilogue.
//
// L = -(1/b) sum_ij log sigmoid(z_ij S_ij), S = scale * rows @ cols^T + bias, z_ij = +1 on row i's
// positive (column i + offset) and -1 elsewhere: b local images (rows) against N texts (cols), N = b and
// offset 0 on one process. Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".
//
// Unlike the softmax loss, every entry's gradient is known the moment the entry is: nothing depends on
// a whole row or column. So one pass over the blocks yields the loss and, when a gradient is wanted, the
// gradients too (for an upstream gradient of 1; the backward only multiplies them by g):
//   dots = rows_p @ cols_q^T (one ATen matmul), an epilogue adds the block's softplus terms to a loss per
//   row and turns dots into G = dL/dS (times b) in place, then row_grad_p += G @ cols_q and
//   col_grad_q += G^T @ rows_p (two more matmuls).
// Three matmuls per block in all, where a forward-then-recompute scheme (the InfoNCE op's) needs four.
// Extra memory: one block of dots per thread (plus G in bf16/fp16 on a GPU), the fp32 gradients (N x D)
// and O(N) per-row sums. The blocks and matmuls are contrastive_loss.cpp's (blocks.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "blocks.h"
#include "siglip_loss.h"

namespace crossmodal {

#if defined(WITH_CUDA)
// The CUDA epilogue (siglip_loss_cuda.cu), same contract as siglip_epilogue below.
void siglip_epilogue_cuda(const Tensor& dots, const Tensor& scale, const Tensor& bias, int64_t first_positive,
                          const Tensor& row_loss, const Tensor& row_grad_sum, const Tensor& coefficients);
#endif

namespace {

// Adds the terms of the non-positive entries g[begin, end) to loss and, with_grad, writes their dL/dS
// over them and adds it to grad_sum.
template <typename acc_t>
CM_HOST_DEVICE void negative_terms(acc_t* g, int64_t begin, int64_t end, acc_t scale, acc_t bias, bool with_grad,
                                   acc_t& loss, acc_t& grad_sum) {
  acc_t loss_part = 0, grad_part = 0;
  if (with_grad) {
#pragma omp simd reduction(+ : loss_part, grad_part)
    for (int64_t j = begin; j < end; ++j) {
      const acc_t u = scale * g[j] + bias;
      const acc_t e = exp_minus_abs(u);
      loss_part += softplus_of(u, e);
      g[j] = sigmoid_of(u, e);
      grad_part += g[j];
    }
  } else {
#pragma omp simd reduction(+ : loss_part)
    for (int64_t j = begin; j < end; ++j) {
      const acc_t u = scale * g[j] + bias;
      loss_part += softplus_of(u, exp_minus_abs(u));
    }
  }
  loss += loss_part;
  grad_sum += grad_part;
}

// CPU epilogue. A (tile_rows, tile_cols) block of raw dot products in; each row's loss terms are added
// to row_loss and, unless row_grad_sum is null, the block becomes dL/dS in place and each row's sum of
// it is added to row_grad_sum. Row i's positive is block column first_positive + i.
template <typename acc_t>
CM_SIMD_CLONES void tile_siglip(acc_t* scores, int64_t tile_rows, int64_t tile_cols, acc_t scale, acc_t bias,
                                int64_t first_positive, acc_t* row_loss, acc_t* row_grad_sum) {
  const bool with_grad = row_grad_sum != nullptr;
  for (int64_t i = 0; i < tile_rows; ++i) {
    acc_t* g = scores + i * tile_cols;
    const int64_t positive = first_positive + i;
    const bool has_positive = positive >= 0 && positive < tile_cols;
    const int64_t split = has_positive ? positive : tile_cols;
    acc_t loss = 0, grad_sum = 0;
    negative_terms(g, 0, split, scale, bias, with_grad, loss, grad_sum);
    if (has_positive) {
      negative_terms(g, split + 1, tile_cols, scale, bias, with_grad, loss, grad_sum);
      const acc_t u = -(scale * g[positive] + bias);
      const acc_t e = exp_minus_abs(u);
      loss += softplus_of(u, e);
      if (with_grad) {
        g[positive] = -sigmoid_of(u, e);
        grad_sum += g[positive];
      }
    }
    row_loss[i] += loss;
    if (with_grad) row_grad_sum[i] += grad_sum;
  }
}

// Epilogue of one block: adds its rows' loss terms to row_loss and, if row_grad_sum is defined, returns
// dL/dS in the matmul operands' dtype (in place over dots where that is the accumulation dtype) after
// adding its row sums to row_grad_sum.
Tensor siglip_epilogue(const Tensor& dots, const Tensor& scale, const Tensor& bias, int64_t first_positive,
                       const Tensor& row_loss, const Tensor& row_grad_sum, at::ScalarType operand_dtype) {
  const bool with_grad = row_grad_sum.defined();
#if defined(WITH_CUDA)
  if (dots.is_cuda()) {
    const Tensor coefficients =
        !with_grad || operand_dtype == dots.scalar_type() ? dots : at::empty_like(dots, operand_dtype);
    siglip_epilogue_cuda(dots, scale, bias, first_positive, row_loss, row_grad_sum, coefficients);
    return coefficients;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "siglip_epilogue_cpu", [&] {
    tile_siglip(dots.data_ptr<scalar_t>(), dots.size(0), dots.size(1), *scale.const_data_ptr<scalar_t>(),
                *bias.const_data_ptr<scalar_t>(), first_positive, row_loss.data_ptr<scalar_t>(),
                with_grad ? row_grad_sum.data_ptr<scalar_t>() : nullptr);
  });
  return dots;
}

// One pass over the blocks of S: row_loss (R) += each row's softplus terms; if row_grad_sum is defined,
// also row_grad_sum (R) += each row's sum of G, row_grad (R, D) += G @ cols and col_grad (C, D) += G^T @ rows,
// G = dL/dS without the 1/b.
void siglip_pass(const Tensor& rows, const Tensor& cols, const Tensor& scale, const Tensor& bias, int64_t offset,
                 int64_t block, const Tensor& row_loss, const Tensor& row_grad_sum, const Tensor& row_grad,
                 const Tensor& col_grad) {
  const bool with_grad = row_grad_sum.defined();
  // Only with gradients are columns updated, so only then must a round's blocks own distinct columns.
  for_each_feature_block(matmul_operand(rows), matmul_operand(cols), block, with_grad, [&](const FeatureBlock& b) {
    const Tensor coefficients = siglip_epilogue(b.dots(), scale, bias, b.row0 + offset - b.col0, b.rows_of(row_loss),
                                                with_grad ? b.rows_of(row_grad_sum) : Tensor(), b.rows.scalar_type());
    if (with_grad) b.accumulate_gradients(coefficients, row_grad, col_grad);
  });
}

}  // namespace

// Returns (loss, dL/d image, dL/d text, dL/d logit_scale, dL/d logit_bias) of
//   L = -(1/b) sum_ij log sigmoid(z_ij (logit_scale * image_i . text_j + logit_bias)),
// image (b, D) against text (N, D), row i's positive at column i + offset. The gradients are for an
// upstream gradient of 1 (the autograd formula multiplies them by g) and come only with with_grad
// (else they are empty); all in the accumulation dtype (float32, float64 for float64 features).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_loss_forward(const Tensor& image, const Tensor& text,
                                                                       const Tensor& logit_scale,
                                                                       const Tensor& logit_bias, int64_t offset,
                                                                       int64_t block, bool with_grad) {
  const InnerCallsGuard inner_calls;
  check_features(image, text, "image_features");
  check_features(text, image, "text_features");
  const int64_t b = image.size(0), n = text.size(0);
  TORCH_CHECK(offset >= 0 && offset + b <= n, "offset ", offset, " puts the ", b, " image rows' positives outside the ",
              n, " texts");
  const Tensor image_c = image.contiguous(), text_c = text.contiguous();
  const Tensor scale = scale_tensor(logit_scale, image), bias = scale_tensor(logit_bias, image, "logit_bias");
  const auto options = scale.options();
  const Tensor row_loss = at::zeros({b}, options);
  Tensor row_grad_sum, image_grad, text_grad;
  if (with_grad) {
    row_grad_sum = at::zeros({b}, options);
    image_grad = at::zeros(image.sizes(), options);
    text_grad = at::zeros(text.sizes(), options);
  }
  siglip_pass(image_c, text_c, scale, bias, offset, block, row_loss, row_grad_sum, image_grad, text_grad);
  const Tensor loss = row_loss.sum() / static_cast<double>(b);
  if (!with_grad) {
    auto none = [&] { return at::empty({0}, options); };  // four tensors: outputs must not alias
    return {loss, none(), none(), none(), none()};
  }
  const Tensor scale_grad = scale_grad_term(image_grad, image_c) / static_cast<double>(b);
  const Tensor bias_grad = row_grad_sum.sum() / static_cast<double>(b);
  const Tensor factor = scale / static_cast<double>(b);
  return {loss, image_grad.mul_(factor), text_grad.mul_(factor), scale_grad, bias_grad};
}

TORCH_LIBRARY_FRAGMENT(crossmodal, m) {
  m.def(
      "siglip_loss_forward(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, int offset=0, "
      "int block=0, bool with_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(crossmodal, CPU, m) { m.impl("siglip_loss_forward", &siglip_loss_forward); }

#if defined(WITH_CUDA)
TORCH_LIBRARY_IMPL(crossmodal, CUDA, m) { m.impl("siglip_loss_forward", &siglip_loss_forward); }
#endif

}  // namespace crossmodal
