// A linear layer on int8 weights and int8 activations (W8A8), for the `w8a8` base:
//
//   y[m, n] = (sum_k q(x)[m, k] w[n, k]) * row_scale[m] * col_scale[n] + bias[n]
//
// where w is int8 with a scale per output row (bitsandbytes' row-wise int8 weights,
// col_scale = absmax / 127), and each token's activations are quantized on the fly with
// a scale of their own: q(x)[m, :] = round(x[m, :] * 127 / absmax(x[m, :])), row_scale =
// absmax / 127. bitsandbytes' int8 matmul with no outlier threshold computes the same
// (in float16, with each step a separate tensor op).
//
// The int32 products are oneDNN's (at::_int_mm: VNNI dot products where the CPU has
// them, twice the multiply-adds per cycle of bf16's). What this file adds is the two ends
// of it, one pass each over the rows: quantizing the activations and scaling the int32
// products into the output, which as separate tensor ops took as long as the matmul.
//
// One token's output depends on that token alone (its own scale, exact integer sums),
// so a step's batch does not change anyone's result. A row that is not finite gives a
// row of NaN, which the engine reports for that request alone.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LORAG_AVX512 1
#endif

namespace {

#ifdef LORAG_AVX512
// 16 values from `p` (float32, or bf16: float32's high half) as float32; `n` < 16 masks
// the tail.
inline __m512 load16(const float* p, __mmask16 n) { return _mm512_maskz_loadu_ps(n, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 n) {
  const __m256i half = _mm256_maskz_loadu_epi16(n, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void store16(float* p, __m512 v, __mmask16 n) { _mm512_mask_storeu_ps(p, n, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 n) {
  // round to nearest even, as c10::BFloat16 does (NaN stays NaN: its payload's top bit)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  _mm256_mask_storeu_epi16(p, n, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
inline __mmask16 tail(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1);
}

// absmax of a row, NaN when any value is NaN (inf when any is infinite)
template <typename T>
float row_absmax(const T* row, int64_t in) {
  __m512 best = _mm512_setzero_ps();
  __mmask16 nan = 0;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t k = 0; k < in; k += 16) {
    const __m512 v = _mm512_and_ps(load16(row + k, tail(in - k)), sign);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(best);
}

template <typename T>
void quantize_row(const T* row, int64_t in, float inv, int8_t* out) {
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 n = tail(in - k);
    // the MXCSR's rounding (nearest even, as nearbyint), saturated to int8
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k, n), scale));
    _mm_mask_storeu_epi8(out + k, n, _mm512_cvtsepi32_epi8(q));
  }
}

template <typename T>
void scale_row(const int32_t* src, float r, const float* cs, const T* bias, int64_t cols,
               T* row) {
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t n = 0; n < cols; n += 16) {
    const __mmask16 m = tail(cols - n);
    __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, src + n));
    v = _mm512_mul_ps(_mm512_mul_ps(v, rv), load16(cs + n, m));
    if (bias) {
      v = _mm512_add_ps(v, load16(bias + n, m));
    }
    store16(row + n, v, m);
  }
}
#else
template <typename T>
float row_absmax(const T* row, int64_t in) {
  float best = 0.f;
  for (int64_t k = 0; k < in; ++k) {
    const float v = std::fabs(static_cast<float>(row[k]));
    if (std::isnan(v)) {
      return v;
    }
    best = std::max(best, v);
  }
  return best;
}

template <typename T>
void quantize_row(const T* row, int64_t in, float inv, int8_t* out) {
  for (int64_t k = 0; k < in; ++k) {
    out[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(row[k]) * inv));
  }
}

template <typename T>
void scale_row(const int32_t* src, float r, const float* cs, const T* bias, int64_t cols,
               T* row) {
  for (int64_t n = 0; n < cols; ++n) {
    const float v = static_cast<float>(src[n]) * r * cs[n];
    row[n] = static_cast<T>(bias ? v + static_cast<float>(bias[n]) : v);
  }
}
#endif

// q: int8 [rows, in]; scale: float [rows] (absmax / 127; NaN for a row that is not
// finite, 0 for a row of zeros).
template <typename T>
void quantize_rows(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  const int64_t rows = x.size(0), in = x.size(1), stride = x.stride(0);
  const T* src = x.data_ptr<T>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* s = scale.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T* row = src + m * stride;
      const float absmax = row_absmax(row, in);
      int8_t* out = dst + m * in;
      if (!std::isfinite(absmax) || absmax == 0.f) {
        std::memset(out, 0, in);
        s[m] = absmax == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      quantize_row(row, in, 127.f / absmax, out);
      s[m] = absmax / 127.f;
    }
  });
}

template <typename T>
void scale_products(const at::Tensor& acc, const at::Tensor& row_scale,
                    const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                    at::Tensor& out) {
  const int64_t rows = acc.size(0), cols = acc.size(1);
  const int32_t* a = acc.data_ptr<int32_t>();
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = col_scale.data_ptr<float>();
  const T* b = bias ? bias->data_ptr<T>() : nullptr;
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      scale_row(a + m * cols, rs[m], cs, b, cols, dst + m * cols);
    }
  });
}

// x: [tokens, in] (float32 or bf16, rows may be strided); weight: int8 [out, in];
// col_scale: float32 [out]; bias: [out] in x's dtype. Returns [tokens, out] in x's dtype.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& col_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1,
              "lorag w8a8: x must be [tokens, in] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lorag w8a8: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 &&
                  weight.is_contiguous() && weight.size(1) == x.size(1),
              "lorag w8a8: weight must be contiguous int8 [out, ", x.size(1), "]");
  const int64_t out_features = weight.size(0);
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.is_contiguous() &&
                  col_scale.numel() == out_features,
              "lorag w8a8: col_scale must be contiguous float32 [", out_features, "]");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == out_features,
                "lorag w8a8: bias must be contiguous [", out_features, "] in x's dtype");
  }
  const int64_t tokens = x.size(0);
  auto q = at::empty({tokens, x.size(1)}, x.options().dtype(at::kChar));
  auto row_scale = at::empty({tokens}, x.options().dtype(at::kFloat));
  auto out = at::empty({tokens, out_features}, x.options());
  if (tokens == 0) {
    return out;
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) {
    quantize_rows<at::BFloat16>(x, q, row_scale);
  } else {
    quantize_rows<float>(x, q, row_scale);
  }
  const auto acc = at::_int_mm(q, weight.t());
  if (bf16) {
    scale_products<at::BFloat16>(acc, row_scale, col_scale, bias, out);
  } else {
    scale_products<float>(acc, row_scale, col_scale, bias, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorag, m) {
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor col_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorag, CPU, m) { m.impl("w8a8_linear", &w8a8_linear); }
