// Epilogue arithmetic of the fused sigmoid (SigLIP) loss, shared by the CPU loops (siglip_loss.cpp) and
// the CUDA kernel (siglip_loss_cuda.cu). Plain C++ with no ATen types: nvcc compiles it for the device too.
//
// Each entry of S = scale * rows @ cols^T + bias adds softplus(u) = -log sigmoid(-u) to the loss, with
// u = -S_ij on the positive (column i + offset) and u = S_ij elsewhere, and its gradient is
// dL/dS_ij = -sigmoid(u) on the positive and sigmoid(u) elsewhere (before the 1/b of the mean).
#pragma once

#include "contrastive_loss.h"

namespace crossmodal {

// log(1 + e) for e in [0, 1], the only arguments softplus needs. The host version is branch-free so the
// loops vectorise (std::log1p is a library call): log(m) = 2 atanh(s), s = (m - 1) / (m + 1), on
// m = 1 + e, or on m = (1 + e) / 2 plus log 2 where 1 + e > sqrt(2); then |s| <= 0.1716 and the odd
// series to s^11 is within 5e-11 relative. s is formed from e directly (e / (e + 2), (e - 1) / (e + 3)),
// so a tiny e keeps its precision: log1p_unit(e) ~ e.
CM_HOST_DEVICE float log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  const bool high = e > 0.41421356f;
  const float s = high ? (e - 1.0f) / (e + 3.0f) : e / (e + 2.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return (high ? 0.693147181f : 0.0f) + 2.0f * s * p;
#endif
}

CM_HOST_DEVICE double log1p_unit(double e) { return log1p(e); }

// softplus(u) = max(u, 0) + log(1 + exp(-|u|)), and sigmoid(u), from the same e = exp(-|u|).
template <typename acc_t>
CM_HOST_DEVICE acc_t softplus_of(acc_t u, acc_t e) {
  return (u > acc_t(0) ? u : acc_t(0)) + log1p_unit(e);
}

template <typename acc_t>
CM_HOST_DEVICE acc_t sigmoid_of(acc_t u, acc_t e) {
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  return u >= acc_t(0) ? r : e * r;
}

template <typename acc_t>
CM_HOST_DEVICE acc_t exp_minus_abs(acc_t u) {
  return exp_nonpositive(u < acc_t(0) ? u : -u);
}

}  // namespace crossmodal
