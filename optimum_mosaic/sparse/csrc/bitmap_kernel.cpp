// y = x @ W^T (+ bias) with W in the bitmap tile format of optimum_mosaic/sparse/format.py, on CPU.
//
// W [rows, in]: per 64-column tile a 64-bit bitmap (bit j of byte b <-> column 8b + j), the tile's non-zeros
// packed in column order (then zeros up to a multiple of `pad`, a power of two), one int32 offset per row.
// Values fp32 or bf16 (bf16 is widened exactly to fp32); x and y are fp32; accumulation in fp32.
//
// Paths (`isa`; -1 = auto: the widest this CPU has, except AVX2 on AMD, whose Zen 4 runs vexpandps slowly):
//   2 AVX-512 (F, BW, VL): 16 columns at a time; vexpandps loads the popcount(m) next values into the set lanes
//     (it never reads past them).
//   1 AVX2 + FMA: 8 columns at a time; 8 values are loaded and moved to their columns by vpermps with a
//     256-entry table (lane j <- rank of bit j, or -128 where bit j is clear: blended to zero). Rows that end
//     within 8 values of the buffer's end copy the values first, so nothing is read past it.
//   0 portable C++: one multiply-add per non-zero (count trailing zeros, clear lowest bit).
// Both SIMD paths keep a running pointer into the values (advanced by popcounts) and prefetch 2 KB ahead.
// Each decoded 8/16-column piece of W is applied to up to 8 token vectors (decode once, use NT times).
// Rows are split over threads (at::parallel_for). With `dense_from` tokens or more, blocks of rows are
// expanded to dense and multiplied with at::mm (the GEMM wins for prefill).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MOSAIC_X86 1
#include <immintrin.h>
#endif

namespace mosaic {
namespace {

constexpr int64_t kTile = 64;
constexpr int64_t kPrefetch = 2048;  // software prefetch: bytes ahead in the value stream (half that for bitmaps)
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  const uint8_t* bitmaps;  // [rows * tiles, 8]
  const void* values;      // float or uint16_t (bf16 bits)
  const int32_t* offsets;  // [rows]
  int64_t rows, tiles, pad, total;
  const float* x;  // [tokens, tiles * 64], columns past `in` are zero
  int64_t tokens;
  float* y;           // [tokens, rows]
  const float* bias;  // [rows] or nullptr
  int64_t width() const { return tiles * kTile; }
  int64_t stored(uint64_t bits) const {  // values a tile occupies, padding included
    return (__builtin_popcountll(bits) + pad - 1) & ~(pad - 1);
  }
  int64_t row_end(int64_t r) const { return r + 1 < rows ? offsets[r + 1] : total; }
  void store(int64_t r, int64_t t, float sum) const { y[t * rows + r] = sum + (bias ? bias[r] : 0.f); }
};

inline uint64_t load_bitmap(const uint8_t* p) {
  uint64_t v = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(&v, p, 8);
#else
  for (int b = 0; b < 8; ++b) v |= uint64_t(p[b]) << (8 * b);
#endif
  return v;
}

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// -- portable path -------------------------------------------------------------------------------------------------
template <typename V>
void rows_scalar(const Problem& P, int64_t r0, int64_t r1) {
  const V* values = static_cast<const V*>(P.values);
  const int64_t width = P.width();
  std::vector<float> acc(P.tokens);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
    int64_t at = P.offsets[r];
    for (int64_t k = 0; k < P.tiles; ++k) {
      uint64_t bits = load_bitmap(bm + 8 * k);
      const int64_t next = at + P.stored(bits);
      const float* xk = P.x + k * kTile;
      while (bits) {
        const int j = __builtin_ctzll(bits);
        const float w = widen(values[at++]);
        for (int64_t t = 0; t < P.tokens; ++t) acc[t] += w * xk[t * width + j];
        bits &= bits - 1;
      }
      at = next;
    }
    for (int64_t t = 0; t < P.tokens; ++t) P.store(r, t, acc[t]);
  }
}

// Row r of W, dense, into out[0 .. tiles * 64).
template <typename V>
void expand_row_scalar(const Problem& P, int64_t r, float* out) {
  const V* values = static_cast<const V*>(P.values);
  std::fill(out, out + P.width(), 0.f);
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  int64_t at = P.offsets[r];
  for (int64_t k = 0; k < P.tiles; ++k) {
    uint64_t bits = load_bitmap(bm + 8 * k);
    const int64_t next = at + P.stored(bits);
    for (int64_t i = at; bits; bits &= bits - 1) out[k * kTile + __builtin_ctzll(bits)] = widen(values[i++]);
    at = next;
  }
}

#ifdef MOSAIC_X86
#define MOSAIC_AVX2 __attribute__((target("avx2,fma,popcnt")))
#define MOSAIC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,popcnt")))

inline void prefetch(const void* p, int64_t ahead) {
  _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0);
}

// -- AVX2 + FMA ----------------------------------------------------------------------------------------------------
// Byte m of a bitmap -> 8 lane indices (sign-extended at use): rank of bit j among the set bits, or -128 (sign
// bit: blended to zero) where bit j is clear. 2 KB, stays in L1.
struct Expand8 {
  alignas(64) int8_t lane[256][8];
  Expand8() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, rank = 0; j < 8; ++j) lane[m][j] = static_cast<int8_t>((m >> j) & 1 ? rank++ : -128);
  }
};
const Expand8 kExpand8;

template <typename V>
MOSAIC_AVX2 inline __m256 load8(const V* p) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
}

template <typename V>
MOSAIC_AVX2 inline __m256 load8_bounded(const V* p, const V* end) {
  V copy[8] = {};
  std::memcpy(copy, p, sizeof(V) * std::min<int64_t>(8, end - p));
  return load8(copy);
}

MOSAIC_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One row for tokens t0 .. t0 + NT - 1. Per 8 columns: the 8 values from the running pointer, vpermps to their
// columns, blend the clear lanes to zero, one FMA per token; the pointer advances by the byte's popcount.
template <typename V, int NT, bool BOUNDED>
MOSAIC_AVX2 void row_avx2(const Problem& P, int64_t r, int64_t t0) {
  const V* p = static_cast<const V*>(P.values) + P.offsets[r];
  const V* end = static_cast<const V*>(P.values) + P.total;
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  const int64_t width = P.width();
  const float* x = P.x + t0 * width;
  constexpr int A = NT >= 4 ? 1 : 4 / NT;  // independent sums per token: hide the FMA latency
  __m256 acc[NT * A];
  for (int i = 0; i < NT * A; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < P.tiles; ++k) {
    const uint64_t bits = load_bitmap(bm + 8 * k);
    prefetch(p, kPrefetch);
    prefetch(p, kPrefetch + 64);
    prefetch(bm + 8 * k, kPrefetch / 2);
    const V* tile = p;
    if (bits) {
#pragma GCC unroll 8
      for (int b = 0; b < 8; ++b) {
        const unsigned m = (bits >> (8 * b)) & 0xff;
        const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand8.lane[m]));
        const __m256i lanes = _mm256_cvtepi8_epi32(packed);
        const __m256 v = BOUNDED ? load8_bounded(p, end) : load8(p);
        const __m256 w =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(v, lanes), _mm256_setzero_ps(), _mm256_castsi256_ps(lanes));
        const float* xc = x + k * kTile + 8 * b;
        for (int t = 0; t < NT; ++t)
          acc[t * A + b % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + t * width), acc[t * A + b % A]);
        p += __builtin_popcount(m);
      }
    }
    p = tile + P.stored(bits);
  }
  for (int t = 0; t < NT; ++t) {
    for (int i = 1; i < A; ++i) acc[t * A] = _mm256_add_ps(acc[t * A], acc[t * A + i]);
    P.store(r, t0 + t, hsum8(acc[t * A]));
  }
}

template <typename V, int NT>
void row_avx2_any(const Problem& P, int64_t r, int64_t t0) {
  // 8-value loads start at most at the row's end: only the rows close to the end of the buffer need a copy
  if (P.row_end(r) + 8 <= P.total) {
    row_avx2<V, NT, false>(P, r, t0);
  } else {
    row_avx2<V, NT, true>(P, r, t0);
  }
}

// Row r of W, dense, into out[0 .. tiles * 64) (every lane written: no zeroing needed).
template <typename V, bool BOUNDED>
MOSAIC_AVX2 void expand_row_avx2(const Problem& P, int64_t r, float* out) {
  const V* p = static_cast<const V*>(P.values) + P.offsets[r];
  const V* end = static_cast<const V*>(P.values) + P.total;
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  for (int64_t k = 0; k < P.tiles; ++k) {
    const uint64_t bits = load_bitmap(bm + 8 * k);
    const V* tile = p;
#pragma GCC unroll 8
    for (int b = 0; b < 8; ++b) {
      const unsigned m = (bits >> (8 * b)) & 0xff;
      const __m256i lanes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand8.lane[m])));
      const __m256 v = BOUNDED ? load8_bounded(p, end) : load8(p);
      const __m256 w =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(v, lanes), _mm256_setzero_ps(), _mm256_castsi256_ps(lanes));
      _mm256_storeu_ps(out + k * kTile + 8 * b, w);
      p += __builtin_popcount(m);
    }
    p = tile + P.stored(bits);
  }
}

// -- AVX-512 -------------------------------------------------------------------------------------------------------
// Per 16 columns: vexpandps loads exactly the popcount(m) next values into the set lanes (zero elsewhere; it
// never reads past them), one FMA per token.
template <typename V>
MOSAIC_AVX512 inline __m512 expand16(const V* p, __mmask16 m) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm512_maskz_expandloadu_ps(m, p);
  } else {
    const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1);
    const __m256i half = _mm256_maskz_loadu_epi16(first, p);
    return _mm512_maskz_expand_ps(m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
  }
}

template <typename V, int NT>
MOSAIC_AVX512 void row_avx512(const Problem& P, int64_t r, int64_t t0) {
  const V* p = static_cast<const V*>(P.values) + P.offsets[r];
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  const int64_t width = P.width();
  const float* x = P.x + t0 * width;
  constexpr int A = NT >= 4 ? 1 : 4 / NT;
  __m512 acc[NT * A];
  for (int i = 0; i < NT * A; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < P.tiles; ++k) {
    const uint64_t bits = load_bitmap(bm + 8 * k);
    prefetch(p, kPrefetch);
    prefetch(p, kPrefetch + 64);
    prefetch(bm + 8 * k, kPrefetch / 2);
    const V* tile = p;
    if (bits) {
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        const unsigned m = (bits >> (16 * b)) & 0xffff;
        const __m512 w = expand16(p, static_cast<__mmask16>(m));
        const float* xc = x + k * kTile + 16 * b;
        for (int t = 0; t < NT; ++t)
          acc[t * A + b % A] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + t * width), acc[t * A + b % A]);
        p += __builtin_popcount(m);
      }
    }
    p = tile + P.stored(bits);
  }
  for (int t = 0; t < NT; ++t) {
    for (int i = 1; i < A; ++i) acc[t * A] = _mm512_add_ps(acc[t * A], acc[t * A + i]);
    P.store(r, t0 + t, _mm512_reduce_add_ps(acc[t * A]));
  }
}

template <typename V>
MOSAIC_AVX512 void expand_row_avx512(const Problem& P, int64_t r, float* out) {
  const V* p = static_cast<const V*>(P.values) + P.offsets[r];
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  for (int64_t k = 0; k < P.tiles; ++k) {
    const uint64_t bits = load_bitmap(bm + 8 * k);
    const V* tile = p;
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      const unsigned m = (bits >> (16 * b)) & 0xffff;
      _mm512_storeu_ps(out + k * kTile + 16 * b, expand16(p, static_cast<__mmask16>(m)));
      p += __builtin_popcount(m);
    }
    p = tile + P.stored(bits);
  }
}
#endif  // MOSAIC_X86

template <typename V>
void run(const Problem& P, int64_t isa) {
  const int64_t grain = std::max<int64_t>(1, 32768 / P.width());
  at::parallel_for(0, P.rows, grain, [&](int64_t r0, int64_t r1) {
    if (isa == kScalar) return rows_scalar<V>(P, r0, r1);
#ifdef MOSAIC_X86
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t t0 = 0; t0 < P.tokens;) {
        const int64_t left = P.tokens - t0;
        const int nt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (isa == kAvx512) {
          nt == 8   ? row_avx512<V, 8>(P, r, t0)
          : nt == 4 ? row_avx512<V, 4>(P, r, t0)
          : nt == 2 ? row_avx512<V, 2>(P, r, t0)
                    : row_avx512<V, 1>(P, r, t0);
        } else {
          nt == 8   ? row_avx2_any<V, 8>(P, r, t0)
          : nt == 4 ? row_avx2_any<V, 4>(P, r, t0)
          : nt == 2 ? row_avx2_any<V, 2>(P, r, t0)
                    : row_avx2_any<V, 1>(P, r, t0);
        }
        t0 += nt;
      }
    }
#endif
  });
}

int64_t best_isa() {  // the widest path this CPU can run
#ifdef MOSAIC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

int64_t auto_isa() {  // the path `auto` takes: AMD cores (Zen 4) run vexpandps slowly, so AVX2 there
  const int64_t best = best_isa();
#ifdef MOSAIC_X86
  if (best == kAvx512 && __builtin_cpu_is("amd")) return kAvx2;
#endif
  return best;
}

Problem make_problem(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets, int64_t pad) {
  TORCH_CHECK(bitmaps.scalar_type() == at::kByte && bitmaps.is_contiguous() && bitmaps.dim() == 2 &&
                  bitmaps.size(1) == 8,
              "bitmaps must be a contiguous [tiles, 8] uint8 tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous(), "offsets must be contiguous int32");
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "values must be contiguous float32 or bfloat16");
  TORCH_CHECK(pad >= 1 && (pad & (pad - 1)) == 0, "pad must be a power of two");
  const int64_t rows = offsets.numel();
  TORCH_CHECK(rows == 0 || bitmaps.size(0) % rows == 0, "bitmaps do not split into rows");
  Problem P{};
  P.bitmaps = bitmaps.data_ptr<uint8_t>();
  P.values = values.data_ptr();
  P.offsets = offsets.data_ptr<int32_t>();
  P.rows = rows;
  P.tiles = rows ? bitmaps.size(0) / rows : 0;
  P.pad = pad;
  P.total = values.numel();
  return P;
}

template <typename V>
void expand_rows(const Problem& P, int64_t isa, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r, out += P.width()) {
#ifdef MOSAIC_X86
    if (isa == kAvx512) {
      expand_row_avx512<V>(P, r, out);
      continue;
    }
    if (isa == kAvx2) {
      P.row_end(r) + 8 <= P.total ? expand_row_avx2<V, false>(P, r, out) : expand_row_avx2<V, true>(P, r, out);
      continue;
    }
#endif
    expand_row_scalar<V>(P, r, out);
  }
}

int64_t checked_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return auto_isa();
  TORCH_CHECK(isa <= best, "this CPU cannot run kernel path ", isa, " (best: ", best, ")");
  return isa;
}

// Rows row_start .. row_end of W as a dense [rows, in_features] view (row stride tiles * 64).
at::Tensor expand(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets, int64_t in_features,
                  int64_t pad, int64_t row_start, int64_t row_end, int64_t isa) {
  Problem P = make_problem(bitmaps, values, offsets, pad);
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= P.rows, "row range out of bounds");
  TORCH_CHECK(P.rows == 0 || in_features <= P.tiles * kTile, "in_features larger than the tiles");
  isa = checked_isa(isa);
  at::Tensor out = at::empty({row_end - row_start, P.width()}, at::kFloat);
  float* data = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, P.width()));
  at::parallel_for(row_start, row_end, grain, [&](int64_t r0, int64_t r1) {
    float* block = data + (r0 - row_start) * P.width();
    if (values.scalar_type() == at::kFloat) {
      expand_rows<float>(P, isa, r0, r1, block);
    } else {
      expand_rows<uint16_t>(P, isa, r0, r1, block);
    }
  });
  return out.narrow(1, 0, in_features);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets,
                  const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t pad, int64_t isa,
                  int64_t dense_from) {
  Problem P = make_problem(bitmaps, values, offsets, pad);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == at::kFloat,
              "x must be a float32 [tokens, in_features] tensor");
  TORCH_CHECK(P.rows == 0 || (in_features <= P.tiles * kTile && in_features > (P.tiles - 1) * kTile),
              "in_features does not match the tiles");
  isa = checked_isa(isa);
  const int64_t tokens = x.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == P.rows, "bias has the wrong size");
  }
  if (tokens >= dense_from && dense_from > 0) {  // prefill: dense blocks of rows (<= 8 MB each) through the GEMM
    const int64_t block = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, in_features));
    std::vector<at::Tensor> parts;
    for (int64_t r0 = 0; r0 < P.rows; r0 += block) {
      const int64_t r1 = std::min(P.rows, r0 + block);
      at::Tensor w = expand(bitmaps, values, offsets, in_features, pad, r0, r1, isa);
      parts.push_back(b.defined() ? at::addmm(b.narrow(0, r0, r1 - r0), x, w.t()) : at::mm(x, w.t()));
    }
    return parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  }
  at::Tensor xs = x.contiguous();
  if (P.width() != in_features) xs = at::constant_pad_nd(xs, {0, P.width() - in_features});
  at::Tensor y = at::empty({tokens, P.rows}, at::kFloat);
  P.x = xs.data_ptr<float>();
  P.tokens = tokens;
  P.y = y.data_ptr<float>();
  P.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  if (tokens == 0 || P.rows == 0) return y;
  if (values.scalar_type() == at::kFloat) {
    run<float>(P, isa);
  } else {
    run<uint16_t>(P, isa);
  }
  return y;
}

}  // namespace
}  // namespace mosaic

TORCH_LIBRARY(mosaic_sparse, m) {
  m.def(
      "linear(Tensor x, Tensor bitmaps, Tensor values, Tensor offsets, Tensor? bias, int in_features, int pad, "
      "int isa, int dense_from) -> Tensor");
  m.def(
      "expand(Tensor bitmaps, Tensor values, Tensor offsets, int in_features, int pad, int row_start, int row_end, "
      "int isa=-1) -> Tensor");
  m.def("best_isa() -> int", &mosaic::best_isa);
  m.def("auto_isa() -> int", &mosaic::auto_isa);
}

TORCH_LIBRARY_IMPL(mosaic_sparse, CPU, m) {
  m.impl("linear", &mosaic::linear);
  m.impl("expand", &mosaic::expand);
}
