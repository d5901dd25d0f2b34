// Few-row linear layer on a CPU: out = input @ weight^T + bias for an input of a few rows (a decoding step:
// batch x beams) and a float32 weight (N, K) as nn.Linear stores it.
//
// With few rows the product is bound by reading the weight once, and the BLAS GEMMs behind F.linear read it far
// below the memory's speed (MKL 3-6 GB/s, oneDNN on a reordered copy 7-9 GB/s, against 15-20 GB/s for a plain
// sum, on the 2-core AVX2 machine of docs/results.md). Here each thread streams its own share of the weight
// rows once, in tiles of 2 input rows x 4 weight rows held in 8 AVX2 accumulators (with the 4 weight vectors
// and 1 input vector, 13 of the 16 registers), so the weight is read from memory once and reused from L1 for the
// input's other row pairs. benchmarks/bench_linear.py on BLIP-base's decoder weights: 12-16 GB/s at 1-6 rows
// (1.2-1.7x oneDNN, 1.6-4x MKL), even with oneDNN at 16 rows, behind it from 24, where the product is bound by the
// arithmetic, not the reads. Results equal F.linear's up to float32 rounding (another summation order).
//
// The vector path needs x86-64 with AVX2 and FMA (checked at run time); kernels/linear.py says where it runs
// and falls back to F.linear elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CROSSMODAL_X86 1
#endif

namespace crossmodal {

using at::Tensor;

namespace {

#if defined(CROSSMODAL_X86)
constexpr int kInputRows = 2;   // input rows per tile
constexpr int kWeightRows = 4;  // weight rows (outputs) per tile
constexpr int64_t kGrain = 64;  // outputs per thread at least: smaller shares cost more to start than they save

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// out[m * out_stride + j] = sum_k input[m * K + k] * weight[j * K + k] (+ bias[j]) for m < Rows, j < Cols.
template <int Rows, int Cols>
__attribute__((target("avx2,fma"))) inline void tile(const float* input, const float* weight, const float* bias,
                                                     int64_t K, float* out, int64_t out_stride) {
  __m256 acc[Rows][Cols];
  for (int m = 0; m < Rows; ++m) {
    for (int j = 0; j < Cols; ++j) acc[m][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[Cols];
    for (int j = 0; j < Cols; ++j) w[j] = _mm256_loadu_ps(weight + j * K + k);
    for (int m = 0; m < Rows; ++m) {
      const __m256 x = _mm256_loadu_ps(input + m * K + k);
      for (int j = 0; j < Cols; ++j) acc[m][j] = _mm256_fmadd_ps(x, w[j], acc[m][j]);
    }
  }
  for (int m = 0; m < Rows; ++m) {
    for (int j = 0; j < Cols; ++j) {
      float sum = horizontal_sum(acc[m][j]);
      for (int64_t tail = k; tail < K; ++tail) sum += input[m * K + tail] * weight[j * K + tail];
      out[m * out_stride + j] = bias ? sum + bias[j] : sum;
    }
  }
}

// Outputs [begin, end) of every input row: each tile of weight rows is read from memory once, then from L1 for
// the other input rows.
template <int Cols>
__attribute__((target("avx2,fma"))) void output_columns(const float* input, const float* weight, const float* bias,
                                                        int64_t M, int64_t K, int64_t N, int64_t column, float* out) {
  const float* w = weight + column * K;
  const float* b = bias ? bias + column : nullptr;
  int64_t m = 0;
  for (; m + kInputRows <= M; m += kInputRows) tile<kInputRows, Cols>(input + m * K, w, b, K, out + m * N + column, N);
  for (; m < M; ++m) tile<1, Cols>(input + m * K, w, b, K, out + m * N + column, N);
}

__attribute__((target("avx2,fma"))) void few_row_products(const float* input, const float* weight,
                                                          const float* bias, int64_t M, int64_t K, int64_t begin,
                                                          int64_t end, int64_t N, float* out) {
  int64_t column = begin;
  for (; column + kWeightRows <= end; column += kWeightRows) {
    output_columns<kWeightRows>(input, weight, bias, M, K, N, column, out);
  }
  for (; column < end; ++column) output_columns<1>(input, weight, bias, M, K, N, column, out);
}
#endif

Tensor few_row_linear(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "few_row_linear: CPU tensors only");
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "few_row_linear: float32 input and weight, got ", input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && input.dim() >= 1 && input.size(-1) == weight.size(1),
              "few_row_linear: input (..., K) and weight (N, K), got ", input.sizes(), " and ", weight.sizes());
#if defined(CROSSMODAL_X86)
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "few_row_linear: this CPU has no AVX2/FMA; use F.linear");
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / std::max<int64_t>(K, 1);
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = N;
  Tensor out = at::empty(out_sizes, x.options());
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N,
                "few_row_linear: a float32 bias of N = ", N, " values, got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->contiguous();
  }
  const float* x_data = x.const_data_ptr<float>();
  const float* w_data = w.const_data_ptr<float>();
  const float* b_data = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* out_data = out.mutable_data_ptr<float>();
  if (K == 0) {  // no products: the bias alone
    b.defined() ? out.copy_(b.expand_as(out)) : out.zero_();
  } else if (M > 0) {
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      few_row_products(x_data, w_data, b_data, M, K, begin, end, N, out_data);
    });
  }
  return out;
#else
  TORCH_CHECK(false, "few_row_linear: built without the x86-64 AVX2 path; use F.linear");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(crossmodal, m) {
  m.def("few_row_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(crossmodal, CPU, m) { m.impl("few_row_linear", &few_row_linear); }

}  // namespace crossmodal
