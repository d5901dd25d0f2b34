// Epilogue arithmetic of the fused contrastive (InfoNCE) loss, shared by the CPU loops
// (contrastive_loss.cpp) and the CUDA kernels (contrastive_loss_cuda.cu), so the CPU tests run the
// same formulas as the GPU. Plain C++ with no ATen types: nvcc compiles it for the device too.
//
// Notation: S = scale * rows @ cols^T is never stored whole; a block of it is recomputed wherever
// needed. Row i's positive column is i + offset (offset 0 for the single-process square problem).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the CPU loops vectorise only if every call in them is inlined (in a -fPIC build GCC
// otherwise leaves exp_nonpositive out of line and the loops scalar).
#define CM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define CM_HOST_DEVICE inline
#endif

namespace crossmodal {

// exp(x) for x <= 0 (up to rounding), the only arguments the loss needs: x - max, x - lse. The host
// version is a branch-free Cody-Waite reduction plus a degree-7 Taylor polynomial (~1 ulp), so
// the compiler can vectorise the loops that call it; std::exp is a library call it cannot.
CM_HOST_DEVICE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below that the result is 0 for our sums
  x = x > 88.0f ? 88.0f : x;    // keeps 2^n finite for the few slightly positive recomputed logits
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = x * 1.44269504f + shifter;
  const float n = t - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860682e-6f;  // ln2 split into hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const int32_t power_bits = (t_bits - 0x4B400000 + 127) << 23;  // 2^n: n sits in t's low bits
  float power;
  std::memcpy(&power, &power_bits, sizeof(power));
  return p * power;
#endif
}

CM_HOST_DEVICE double exp_nonpositive(double x) { return exp(x); }

template <typename acc_t>
CM_HOST_DEVICE acc_t max_of(acc_t a, acc_t b) {
  return a > b ? a : b;
}

// Log-sum-exp of a row (or column) x of S, kept as (max, excess) with
//   sum_j exp(x_j) = exp(max) * (1 + excess),   lse = max + log1p(excess).
// Carrying the excess over the leading 1, not the sum, keeps lse - max accurate when one logit
// dominates, as a confident positive pair does: 1 + 1e-6 would round to 1 +- 6e-8 in fp32.
// The running state starts at (-inf, 0).

// A tile's partial excess is sum_j excess_term(x_j, tile_max) + (ties_j - 1), ties = the number of
// entries equal to tile_max (at least 1): the leading 1 never enters the floating-point sum.
template <typename acc_t>
CM_HOST_DEVICE acc_t excess_term(acc_t x, acc_t tile_max) {
  return x < tile_max ? exp_nonpositive(x - tile_max) : acc_t(0);
}

template <typename acc_t>
CM_HOST_DEVICE acc_t tie_term(acc_t x, acc_t tile_max) {
  return x < tile_max ? acc_t(0) : acc_t(1);
}

// Online log-sum-exp: merges a tile's partial (tile_max, tile_excess) into the running state.
template <typename acc_t>
CM_HOST_DEVICE void lse_merge(acc_t& max, acc_t& excess, acc_t tile_max, acc_t tile_excess) {
  if (tile_max == -INFINITY) return;
  if (max == -INFINITY) {
    max = tile_max;
    excess = tile_excess;
  } else if (tile_max > max) {
    excess = tile_excess + (1 + excess) * exp_nonpositive(max - tile_max);
    max = tile_max;
  } else {
    excess += (1 + tile_excess) * exp_nonpositive(tile_max - max);
  }
}

// The saved form of a row's log-sum-exp: lse = max + log_sum.
template <typename acc_t>
struct Lse {
  acc_t max;
  acc_t log_sum;
};

template <typename acc_t>
CM_HOST_DEVICE acc_t lse_log_sum(acc_t excess) {
  return log1p(excess);
}

// log softmax = S_ij - lse, evaluated as (S_ij - max) - log_sum: the first difference is exact
// near the max, so probabilities close to 1 keep full precision.
template <typename acc_t>
CM_HOST_DEVICE acc_t log_softmax(acc_t score, Lse<acc_t> lse) {
  return (score - lse.max) - lse.log_sum;
}

// dL/dS_ij of the symmetric loss L = 1/(2N) sum_i (lse_row_i - S_ii) + 1/(2N) sum_j (lse_col_j - S_jj):
//   G_ij = g * ((P_ij + Q_ij) / (2N) - delta_ij / N),  P = exp(S - lse_row), Q = exp(S - lse_col),
// with weight = g / (2N) (the op passes 1 and applies g / (2N) to the products). On the positive, P - 1 and Q - 1 come from expm1, so a confident pair
// (P ~ 1) gets an accurate small gradient instead of a difference of rounded numbers near 1.
template <typename acc_t>
CM_HOST_DEVICE acc_t symmetric_grad(acc_t score, Lse<acc_t> row, Lse<acc_t> col, acc_t weight, bool positive) {
  const acc_t log_p = log_softmax(score, row), log_q = log_softmax(score, col);
  if (positive) return weight * (acc_t(expm1(log_p)) + acc_t(expm1(log_q)));
  return weight * (exp_nonpositive(log_p) + exp_nonpositive(log_q));
}

// dL/dS_ij of one direction of the distributed (local) loss, 1/(2b) sum_i (lse_row_i - S_{i, i+offset}),
// with weight = g / (2b) (the op passes 1, as above).
template <typename acc_t>
CM_HOST_DEVICE acc_t one_sided_grad(acc_t score, Lse<acc_t> row, acc_t weight, bool positive) {
  const acc_t log_p = log_softmax(score, row);
  if (positive) return weight * acc_t(expm1(log_p));
  return weight * exp_nonpositive(log_p);
}

// Block-diagonal schedule: in round k, row block p meets column block (p + k) mod rounds, where
// rounds = max(row blocks, column blocks). Within a round no two blocks share a row block or a
// column block, so per-row and per-column accumulators need neither locks nor atomics, and the
// order of accumulation (hence the result) does not depend on the number of threads.
CM_HOST_DEVICE int64_t wavefront_column(int64_t row_block, int64_t round, int64_t rounds) {
  return (row_block + round) % rounds;
}

CM_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace crossmodal
