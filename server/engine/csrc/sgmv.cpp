// Segmented LoRA matmuls for CPU (the SGMV of Punica / S-LoRA): every token is
// multiplied by its own adapter's A and B, tokens of one adapter grouped into a segment
// so that each adapter's matrices are read from memory once per call.
//
//   shrink: y[i, :]          = A[slot(i)] x[tokens[i]]         A: [slots, rows, in]
//   expand: out[tokens[i], offset_j:offset_j + width_j]
//                           += B_j[slot(i)] y[i, j::parts]     B_j: [slots, rows, width_j]
//                                                              (B stored transposed)
// where token i (an index into `tokens`) belongs to segment s when
// starts[s] <= i < starts[s + 1], and slot(i) = slots[s]. One expand call writes every
// part j of a fused layer (q, k, v), whose A rows the shrink computed together.
//
// torch has no such kernel for CPU: padded into batched matmuls, oneDNN reads small A
// and B matrices at a third of the memory bandwidth, and the padding and unpadding
// around it cost as much again. Here each A row is dotted with every token of its
// segment, each B row scaled into an fp32 accumulator per token; fp32 accumulation
// throughout, and `y` is fp32.
//
// Decode tokens, a few per adapter, are short segments: there the kernel is ~3x faster
// than batched matmuls (bf16, 128 tokens over 64 adapters, q/k/v: 0.17 ms against 0.58;
// float32 on AVX2: 0.28 against 1.18). Prompt chunks and speculative verify chunks are
// long ones, GEMMs: the register-blocked tiles (float32 on AVX2, bf16 on AVX512-BF16)
// are about as fast as oneDNN's GEMM on them and skip the padding around it, so the
// engine sends them here too (`gemm_path` tells it where: `lorag bench kernels`).
// Calling oneDNN per segment from here costs ~25 us a call, more than it saves.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LORAG_AVX512_BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORAG_AVX2 1
#endif

namespace {

// A call's routing, checked (every index is dereferenced unchecked in the loops).
struct Route {
  const int64_t* tok;
  const int64_t* start;
  const int64_t* slot;
  int64_t segments;

  // num_tokens: rows of the tokens' tensor (x or out); num_slots: adapter slots.
  Route(const at::Tensor& tokens, const at::Tensor& starts, const at::Tensor& slots,
        int64_t num_tokens, int64_t num_slots) {
    for (const auto* t : {&tokens, &starts, &slots}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                  "lorag sgmv: routing indices must be contiguous 1-D int64 tensors");
    }
    segments = slots.numel();
    TORCH_CHECK(starts.numel() == segments + 1,
                "lorag sgmv: starts needs one more entry than slots, got ", starts.numel(),
                " and ", segments);
    tok = tokens.data_ptr<int64_t>();
    start = starts.data_ptr<int64_t>();
    slot = slots.data_ptr<int64_t>();
    const int64_t n = tokens.numel();
    TORCH_CHECK(start[0] == 0 && start[segments] == n,
                "lorag sgmv: starts must run from 0 to the number of tokens, ", n);
    for (int64_t s = 0; s < segments; ++s) {
      TORCH_CHECK(start[s] <= start[s + 1], "lorag sgmv: starts must not decrease");
      TORCH_CHECK(slot[s] >= 0 && slot[s] < num_slots, "lorag sgmv: slot ", slot[s],
                  " outside the ", num_slots, " slots");
    }
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(tok[i] >= 0 && tok[i] < num_tokens, "lorag sgmv: token ", tok[i],
                  " outside the ", num_tokens, " rows");
    }
  }
};

template <typename scalar_t>
void shrink_kernel(const at::Tensor& x, const at::Tensor& a, const Route& route,
                   at::Tensor& y) {
  const int64_t n = y.size(0), in = x.size(1), rows = a.size(1);
  const int64_t segments = route.segments;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0), a_slot = a.stride(0), a_row = a.stride(1);
  float* yp = y.data_ptr<float>();

  // The routed tokens' inputs in fp32, once: every A row of their segment reads them.
  std::vector<float> xf(n * in);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* src = xp + tok[i] * x_stride;
      float* dst = xf.data() + i * in;
#pragma omp simd
      for (int64_t k = 0; k < in; ++k) dst[k] = static_cast<float>(src[k]);
    }
  });
  // One work item per (segment, A row): the row is read once, for all its tokens.
  at::parallel_for(0, segments * rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(in);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / rows, r = item % rows;
      const scalar_t* src = ap + slot[s] * a_slot + r * a_row;
#pragma omp simd
      for (int64_t k = 0; k < in; ++k) row[k] = static_cast<float>(src[k]);
      for (int64_t i = start[s]; i < start[s + 1]; ++i) {
        const float* xi = xf.data() + i * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < in; ++k) acc += row[k] * xi[k];
        yp[i * rows + r] = acc;
      }
    }
  });
}

// The parts of a fused layer (q, k, v) that one expand writes: part j adds
// B_j[slot] y[:, j::parts] into out's columns [offset_j, offset_j + width_j).
struct Parts {
  std::vector<const void*> b;
  std::vector<int64_t> slot_stride, row_stride, width, offset;
  int64_t rows = 0, count = 0;

  Parts(const at::TensorList& bs, const at::IntArrayRef& offsets) : count(bs.size()) {
    for (int64_t j = 0; j < count; ++j) {
      b.push_back(bs[j].data_ptr());
      slot_stride.push_back(bs[j].stride(0));
      row_stride.push_back(bs[j].stride(1));
      width.push_back(bs[j].size(2));
      offset.push_back(offsets[j]);
    }
    rows = bs[0].size(1);
  }
};

template <typename scalar_t>
void expand_kernel(at::Tensor& out, const at::Tensor& y, const Parts& parts,
                   const Route& route) {
  const int64_t segments = route.segments, count = parts.count, rows = parts.rows;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const float* yp = y.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t y_row = y.stride(0), out_stride = out.stride(0);

  // One work item per (segment, part): B is read once for the segment's tokens.
  at::parallel_for(0, segments * count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / count, j = item % count, width = parts.width[j];
      const scalar_t* bs = static_cast<const scalar_t*>(parts.b[j]) +
                           slot[s] * parts.slot_stride[j];
      acc.resize(width);
      for (int64_t i = start[s]; i < start[s + 1]; ++i) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t r = 0; r < rows; ++r) {
          const float yr = yp[i * y_row + r * count + j];
          const scalar_t* br = bs + r * parts.row_stride[j];
#pragma omp simd
          for (int64_t o = 0; o < width; ++o) acc[o] += yr * static_cast<float>(br[o]);
        }
        scalar_t* dst = op + tok[i] * out_stride + parts.offset[j];
#pragma omp simd
        for (int64_t o = 0; o < width; ++o) {
          dst[o] = static_cast<scalar_t>(static_cast<float>(dst[o]) + acc[o]);
        }
      }
    }
  });
}

// The vector kernels below work on tiles of up to kTile tokens of a segment.
constexpr int64_t kTile = 4;

// Calls tile(std::integral_constant<int, n>{}, i) over tokens [first, last): tiles of
// kTile tokens, then one of the n < kTile left (n is a compile-time constant, so each
// tile's accumulators stay in registers).
template <typename Tile>
inline void for_each_tile(int64_t first, int64_t last, Tile&& tile) {
  int64_t i = first;
  for (; i + kTile <= last; i += kTile) tile(std::integral_constant<int, kTile>{}, i);
  switch (last - i) {
    case 3: tile(std::integral_constant<int, 3>{}, i); break;
    case 2: tile(std::integral_constant<int, 2>{}, i); break;
    case 1: tile(std::integral_constant<int, 1>{}, i); break;
    default: break;
  }
}

// Every part's outputs in blocks of `width`: (part, first output) per block, in order.
inline std::vector<std::pair<int64_t, int64_t>> output_blocks(const Parts& parts,
                                                              int64_t width) {
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t j = 0; j < parts.count; ++j) {
    for (int64_t o = 0; o < parts.width[j]; o += width) blocks.emplace_back(j, o);
  }
  return blocks;
}

// Every segment's runs of `span` tokens (the last may be shorter), in order: (segment,
// first token) per run. With span kTile, a run is one tile.
std::vector<std::pair<int64_t, int64_t>> runs_of(const Route& route, int64_t span) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t s = 0; s < route.segments; ++s) {
    for (int64_t i = route.start[s]; i < route.start[s + 1]; i += span) {
      tiles.emplace_back(s, i);
    }
  }
  return tiles;
}

#ifdef LORAG_AVX2
// float32 on AVX2 + FMA (16 registers of 8 lanes), every segment, short or long. Both
// kernels work on tiles of up to 4 tokens of a segment, so that each adapter value
// loaded serves 4 tokens, with 12 accumulators, so that the FMA units set the pace:
// - shrink: 4 tokens x 3 A rows, 8-lane partial dot products summed at the end; per 8
//   inputs, 3 + 4 loads feed 12 FMAs. Consecutive work items share their tokens, whose
//   inputs stay in L1 while the segment's A rows stream from L2.
// - expand: 4 tokens x 24 outputs; per rank, 3 loads of a B row and 4 broadcasts of the
//   tokens' shrunk values feed 12 FMAs.
// Plain (unmasked) loads and stores except at a row's end: a masked store is microcoded
// on some CPUs (AMD's), 10x a plain one. At prompt chunks of 128-1024 tokens this is as
// fast as oneDNN's sgemm on the same rows (`lorag bench kernels`), without padding them.

constexpr int64_t kF32Rows = 3;  // A rows per shrink tile
constexpr int64_t kCols = 24;   // outputs per expand tile (3 vectors)

// Lane mask for the first `n` of a vector's 8 lanes (n may be <= 0 or >= 8).
inline __m256i lanes(int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            index);
}

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[token i, r0 + q] = row[q] . x[i] for NT tokens and q < count (<= 3).
template <int NT>
inline void shrink_tile_f32(const float* const* row, const float* const* x, int64_t in,
                            float* y, int64_t y_row, int64_t count) {
  __m256 acc[NT][kF32Rows];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < kF32Rows; ++q) acc[t][q] = _mm256_setzero_ps();
  int64_t k = 0;
#pragma GCC unroll 4
  for (; k + 8 <= in; k += 8) {
    const __m256 a0 = _mm256_loadu_ps(row[0] + k), a1 = _mm256_loadu_ps(row[1] + k),
                 a2 = _mm256_loadu_ps(row[2] + k);
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x[t] + k);
      acc[t][0] = _mm256_fmadd_ps(xv, a0, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(xv, a1, acc[t][1]);
      acc[t][2] = _mm256_fmadd_ps(xv, a2, acc[t][2]);
    }
  }
  if (k < in) {  // the last inputs, fewer than 8
    const __m256i m = lanes(in - k);
    const __m256 a0 = _mm256_maskload_ps(row[0] + k, m), a1 = _mm256_maskload_ps(row[1] + k, m),
                 a2 = _mm256_maskload_ps(row[2] + k, m);
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = _mm256_maskload_ps(x[t] + k, m);
      acc[t][0] = _mm256_fmadd_ps(xv, a0, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(xv, a1, acc[t][1]);
      acc[t][2] = _mm256_fmadd_ps(xv, a2, acc[t][2]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < count; ++q) y[t * y_row + q] = lane_sum(acc[t][q]);
}

template <>
void shrink_kernel<float>(const at::Tensor& x, const at::Tensor& a, const Route& route,
                          at::Tensor& y) {
  const int64_t in = x.size(1), rows = a.size(1), blocks = (rows + kF32Rows - 1) / kF32Rows;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>();
  const int64_t x_stride = x.stride(0), a_slot = a.stride(0), a_row = a.stride(1);
  float* yp = y.data_ptr<float>();
  const auto tiles = runs_of(route, kTile);

  // One work item per (tile, block of 3 A rows), a tile's blocks one after another.
  at::parallel_for(0, tiles.size() * blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, first] = tiles[item / blocks];
      const int64_t r0 = (item % blocks) * kF32Rows, count = std::min(kF32Rows, rows - r0);
      const float* row[kF32Rows];
      for (int64_t q = 0; q < kF32Rows; ++q) {  // a short block repeats its last row
        row[q] = ap + slot[s] * a_slot + (r0 + std::min(q, count - 1)) * a_row;
      }
      for_each_tile(first, std::min(first + kTile, start[s + 1]),
                        [&](auto tokens, int64_t i) {
        constexpr int NT = decltype(tokens)::value;
        const float* inputs[NT];
        for (int t = 0; t < NT; ++t) inputs[t] = xp + tok[i + t] * x_stride;
        shrink_tile_f32<NT>(row, inputs, in, yp + i * rows + r0, rows, count);
      });
    }
  });
}

// acc[t] (NT tokens x 24 outputs) = sum over r < rows of B row r's 24 outputs (the first
// `cols` of them, unless Full: all, by plain loads) times y(t, r) = `y[t][r * y_step]`.
template <int NT, bool Full>
inline void expand_tile_f32(const float* b, int64_t b_row, int64_t cols, const float* const* y,
                            int64_t y_step, int64_t rows, __m256 (&acc)[NT][3]) {
  const __m256i m[3] = {lanes(cols), lanes(cols - 8), lanes(cols - 16)};
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 3; ++v) acc[t][v] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t r = 0; r < rows; ++r) {
    const float* br = b + r * b_row;
    const __m256 w0 = Full ? _mm256_loadu_ps(br) : _mm256_maskload_ps(br, m[0]);
    const __m256 w1 = Full ? _mm256_loadu_ps(br + 8) : _mm256_maskload_ps(br + 8, m[1]);
    const __m256 w2 = Full ? _mm256_loadu_ps(br + 16) : _mm256_maskload_ps(br + 16, m[2]);
    for (int t = 0; t < NT; ++t) {
      const __m256 yt = _mm256_broadcast_ss(y[t] + r * y_step);
      acc[t][0] = _mm256_fmadd_ps(yt, w0, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(yt, w1, acc[t][1]);
      acc[t][2] = _mm256_fmadd_ps(yt, w2, acc[t][2]);
    }
  }
}

// dst[0:cols] += v, cols <= 24: masked only past a short row's end.
inline void add_row(float* dst, int64_t cols, const __m256 (&v)[3]) {
  for (int q = 0; q < 3; ++q) {
    const int64_t left = cols - 8 * q;
    if (left >= 8) {
      _mm256_storeu_ps(dst + 8 * q, _mm256_add_ps(_mm256_loadu_ps(dst + 8 * q), v[q]));
    } else if (left > 0) {
      const __m256i m = lanes(left);
      _mm256_maskstore_ps(dst + 8 * q, m, _mm256_add_ps(_mm256_maskload_ps(dst + 8 * q, m), v[q]));
    }
  }
}

template <>
void expand_kernel<float>(at::Tensor& out, const at::Tensor& y, const Parts& parts,
                          const Route& route) {
  const int64_t count = parts.count, rows = parts.rows;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const float* yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t y_row = y.stride(0), out_stride = out.stride(0);
  const auto blocks = output_blocks(parts, kCols);
  const int64_t per_tile = blocks.size();
  const auto tiles = runs_of(route, kTile);

  // One work item per (tile, block of 24 outputs of a part), a tile's blocks in a row.
  at::parallel_for(0, tiles.size() * per_tile, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, first] = tiles[item / per_tile];
      const auto [j, o] = blocks[item % per_tile];
      const float* b = static_cast<const float*>(parts.b[j]) + slot[s] * parts.slot_stride[j] + o;
      const int64_t b_row = parts.row_stride[j], cols = std::min(kCols, parts.width[j] - o);
      for_each_tile(first, std::min(first + kTile, start[s + 1]),
                        [&](auto tokens, int64_t i) {
        constexpr int NT = decltype(tokens)::value;
        const float* shrunk[NT];  // part j's column of rank r is r * count + j
        for (int t = 0; t < NT; ++t) shrunk[t] = yp + (i + t) * y_row + j;
        __m256 acc[NT][3];
        if (cols == kCols) {
          expand_tile_f32<NT, true>(b, b_row, cols, shrunk, count, rows, acc);
        } else {
          expand_tile_f32<NT, false>(b, b_row, cols, shrunk, count, rows, acc);
        }
        for (int t = 0; t < NT; ++t) {
          add_row(op + tok[i + t] * out_stride + parts.offset[j] + o, cols, acc[t]);
        }
      });
    }
  });
}
#endif  // LORAG_AVX2

#ifdef LORAG_AVX512_BF16
// bf16 on CPUs with AVX512-BF16. Both kernels work on tiles of up to four tokens of a
// segment, so that each adapter value loaded from memory serves four tokens:
// - shrink: a tile of 4 tokens x 4 A rows, dot products by vdpbf16ps (pairs of bf16
//   products summed into fp32 lanes, no conversion) into 16 accumulators, reduced four
//   at a time;
// - expand: a tile of 4 tokens x 64 outputs; each B row is widened to fp32 once, in
//   registers, for the four tokens.
// Lanes past a row's end are masked off. The next work item's adapter rows are
// prefetched while the current ones compute: in a real step adapters come from DRAM (30
// layers of 64 adapters do not stay cached).

constexpr int64_t kRows = 4;  // A rows per shrink tile (reduce4 sums four)
constexpr int64_t kSpan = 16;  // tokens per shrink work item: 4 tiles share each A row read

inline __mmask32 mask32(int64_t remaining) {
  return remaining >= 32 ? ~__mmask32(0)
                         : (__mmask32(1) << std::max<int64_t>(remaining, 0)) - 1;
}

inline __m512 widen(__m256i bf16) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's high half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// The sums of four vectors' lanes, as one 4-lane vector (a, b, c, d).
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                        _mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// y[i, r0:r0+4] = rows . x[token i] for NT tokens i = i0.. of one segment.
template <int NT>
inline void shrink_tile(const uint16_t* const* row, const uint16_t* xp, int64_t x_stride,
                        const int64_t* tok, int64_t i0, int64_t in, float* yp, int64_t rows,
                        int64_t r0, __mmask8 out_mask) {
  __m512 acc[NT][kRows];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < kRows; ++q) acc[t][q] = _mm512_setzero_ps();
  const uint16_t* x[NT];
  for (int t = 0; t < NT; ++t) x[t] = xp + tok[i0 + t] * x_stride;
  for (int64_t k = 0; k < in; k += 32) {
    const __mmask32 m = mask32(in - k);
    __m512bh a[kRows];
    for (int q = 0; q < kRows; ++q) a[q] = (__m512bh)_mm512_maskz_loadu_epi16(m, row[q] + k);
    for (int t = 0; t < NT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + k);
      for (int q = 0; q < kRows; ++q) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], a[q], xv);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm_mask_storeu_ps(yp + (i0 + t) * rows + r0, out_mask,
                       reduce4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
  }
}

template <>
void shrink_kernel<at::BFloat16>(const at::Tensor& x, const at::Tensor& a,
                                 const Route& route, at::Tensor& y) {
  const int64_t in = x.size(1), rows = a.size(1), blocks = (rows + kRows - 1) / kRows;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  const int64_t x_stride = x.stride(0), a_slot = a.stride(0), a_row = a.stride(1);
  float* yp = y.data_ptr<float>();
  const auto runs = runs_of(route, kSpan);

  // One work item per (run of up to 16 tokens of a segment, block of 4 A rows), a run's
  // blocks one after another: the run's inputs stay in cache while its segment's rows
  // stream, each block's rows serve 4 tiles, and a long segment (a prompt chunk) spreads
  // over every thread, not over its row blocks alone.
  at::parallel_for(0, runs.size() * blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, first] = runs[item / blocks];
      const int64_t r0 = (item % blocks) * kRows, count = std::min(kRows, rows - r0);
      const uint16_t* row[kRows];
      for (int64_t q = 0; q < kRows; ++q) {  // a short block repeats its last row
        row[q] = ap + slot[s] * a_slot + (r0 + std::min(q, count - 1)) * a_row;
      }
      // The next item's rows while this one computes, when its run is its segment's
      // first (the segment's later runs find the rows in cache).
      if (item + 1 < end) {
        const auto [sn, next_first] = runs[(item + 1) / blocks];
        if (next_first == start[sn]) {
          const int64_t rn = ((item + 1) % blocks) * kRows;
          prefetch(ap + slot[sn] * a_slot + rn * a_row, std::min(kRows, rows - rn) * a_row * 2);
        }
      }
      const __mmask8 out_mask = (1 << count) - 1;
      for_each_tile(first, std::min(first + kSpan, start[s + 1]), [&](auto tokens, int64_t i) {
        constexpr int n = decltype(tokens)::value;
        shrink_tile<n>(row, xp, x_stride, tok, i, in, yp, rows, r0, out_mask);
      });
    }
  });
}

// out[token i, 0:64] += B rows (64 wide, from `b`) . y[i, column(r)] for NT tokens.
template <int NT>
inline void expand_tile(const uint16_t* b, int64_t b_row, int64_t rows, const float* y,
                        int64_t y_row, int64_t y_col, const int64_t* tok, int64_t i0,
                        uint16_t* op, int64_t out_stride, __mmask32 m0, __mmask32 m1) {
  __m512 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512i v0 = _mm512_maskz_loadu_epi16(m0, b + r * b_row);
    const __m512i v1 = _mm512_maskz_loadu_epi16(m1, b + r * b_row + 32);
    const __m512 w[4] = {widen(_mm512_castsi512_si256(v0)),
                         widen(_mm512_extracti64x4_epi64(v0, 1)),
                         widen(_mm512_castsi512_si256(v1)),
                         widen(_mm512_extracti64x4_epi64(v1, 1))};
    for (int t = 0; t < NT; ++t) {
      const __m512 yr = _mm512_set1_ps(y[(i0 + t) * y_row + r * y_col]);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(yr, w[q], acc[t][q]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    uint16_t* dst = op + tok[i0 + t] * out_stride;
    const __mmask32 m[2] = {m0, m1};
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_maskz_loadu_epi16(m[h], dst + 32 * h);
      const __m512 lo = _mm512_add_ps(widen(_mm512_castsi512_si256(v)), acc[t][2 * h]);
      const __m512 hi = _mm512_add_ps(widen(_mm512_extracti64x4_epi64(v, 1)), acc[t][2 * h + 1]);
      _mm512_mask_storeu_epi16(dst + 32 * h, m[h], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

template <>
void expand_kernel<at::BFloat16>(at::Tensor& out, const at::Tensor& y, const Parts& parts,
                                 const Route& route) {
  constexpr int64_t kWidth = 64;  // outputs per tile
  const int64_t segments = route.segments, count = parts.count, rows = parts.rows;
  const int64_t *tok = route.tok, *start = route.start, *slot = route.slot;
  const float* yp = y.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t y_row = y.stride(0), out_stride = out.stride(0);
  const auto blocks = output_blocks(parts, kWidth);
  const int64_t per_segment = blocks.size();
  auto b_block = [&](int64_t s, int64_t blk) {
    const auto [j, o] = blocks[blk];
    return static_cast<const uint16_t*>(parts.b[j]) + slot[s] * parts.slot_stride[j] + o;
  };

  // One work item per (segment, block of 64 outputs of a part).
  at::parallel_for(0, segments * per_segment, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / per_segment, blk = item % per_segment;
      const auto [j, o] = blocks[blk];
      const uint16_t* b = b_block(s, blk);
      const int64_t b_row = parts.row_stride[j], width = std::min(kWidth, parts.width[j] - o);
      if (item + 1 < end) {  // the next item's rows, while this one computes
        const int64_t sn = (item + 1) / per_segment, bn = (item + 1) % per_segment;
        const int64_t next_row = parts.row_stride[blocks[bn].first];
        for (int64_t r = 0; r < rows; ++r) prefetch(b_block(sn, bn) + r * next_row, 128);
      }
      const __mmask32 m0 = mask32(width), m1 = mask32(width - 32);
      const float* yj = yp + j;  // part j's column of rank r is r * count + j
      uint16_t* oj = op + parts.offset[j] + o;
      for_each_tile(start[s], start[s + 1], [&](auto tokens, int64_t i) {
        constexpr int n = decltype(tokens)::value;
        expand_tile<n>(b, b_row, rows, yj, y_row, count, tok, i, oj, out_stride, m0, m1);
      });
    }
  });
}
#endif  // LORAG_AVX512_BF16

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& tokens,
                       const at::Tensor& starts, const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && x.size(1) == a.size(2),
              "lorag sgmv shrink: x [tokens, in] and a [slots, rows, in] expected, got ",
              x.sizes(), " and ", a.sizes());
  TORCH_CHECK(x.scalar_type() == a.scalar_type(), "lorag sgmv shrink: x is ",
              x.scalar_type(), " but a is ", a.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && a.stride(2) == 1,
              "lorag sgmv shrink: x and a need contiguous rows");
  const Route route(tokens, starts, slots, x.size(0), a.size(0));
  auto y = at::empty({tokens.numel(), a.size(1)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "lora_shrink", [&] {
    shrink_kernel<scalar_t>(x, a, route, y);
  });
  return y;
}

void lora_expand(at::Tensor out, const at::Tensor& y, at::TensorList b,
                 at::IntArrayRef offsets, const at::Tensor& tokens, const at::Tensor& starts,
                 const at::Tensor& slots) {
  const int64_t count = b.size();
  TORCH_CHECK(count >= 1 && offsets.size() == b.size(),
              "lorag sgmv expand: one offset per part expected, got ", count, " parts and ",
              offsets.size(), " offsets");
  TORCH_CHECK(out.dim() == 2 && y.dim() == 2 && y.size(0) == tokens.numel(),
              "lorag sgmv expand: out [tokens, out] and y [routed, rows * parts] expected, "
              "got ", out.sizes(), " and ", y.sizes(), " for ", tokens.numel(), " routed");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.stride(1) == 1,
              "lorag sgmv expand: y must be float32 with contiguous rows");
  TORCH_CHECK(out.stride(1) == 1, "lorag sgmv expand: out needs contiguous rows");
  for (int64_t j = 0; j < count; ++j) {
    const at::Tensor& bj = b[j];
    TORCH_CHECK(bj.dim() == 3 && bj.size(0) == b[0].size(0) && bj.size(1) == b[0].size(1) &&
                    bj.stride(2) == 1,
                "lorag sgmv expand: part ", j, ": b [slots, rows, out] with contiguous rows "
                "and the same slots and rows as part 0 expected, got ", bj.sizes());
    TORCH_CHECK(bj.scalar_type() == out.scalar_type(), "lorag sgmv expand: out is ",
                out.scalar_type(), " but part ", j, "'s b is ", bj.scalar_type());
    TORCH_CHECK(offsets[j] >= 0 && offsets[j] + bj.size(2) <= out.size(1),
                "lorag sgmv expand: part ", j, " (columns ", offsets[j], " to ",
                offsets[j] + bj.size(2), ") outside out's ", out.size(1), " columns");
  }
  TORCH_CHECK(y.size(1) == b[0].size(1) * count, "lorag sgmv expand: y has ", y.size(1),
              " columns, expected rows * parts = ", b[0].size(1) * count);
  const Route route(tokens, starts, slots, out.size(0), b[0].size(0));
  const Parts parts(b, offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(),
                                  "lora_expand", [&] {
    expand_kernel<scalar_t>(out, y, parts, route);
  });
}

// Whether long segments of `dtype` take a GEMM path here (the engine sends prompt
// chunks to the kernel only then).
bool gemm_path([[maybe_unused]] at::ScalarType dtype) {
#ifdef LORAG_AVX512_BF16
  if (dtype == at::kBFloat16) return true;
#endif
#ifdef LORAG_AVX2
  return dtype == at::kFloat;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(lorag, m) {
  m.def("gemm_path(ScalarType dtype) -> bool", &gemm_path);
  m.def("lora_shrink(Tensor x, Tensor a, Tensor tokens, Tensor starts, Tensor slots) "
        "-> Tensor");
  m.def("lora_expand(Tensor(a!) out, Tensor y, Tensor[] b, int[] offsets, Tensor tokens, "
        "Tensor starts, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(lorag, CPU, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand", &lora_expand);
}
