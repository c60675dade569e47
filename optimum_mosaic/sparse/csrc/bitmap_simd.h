// The x86 SIMD paths of the bitmap kernel (bitmap_kernel.cpp): AVX2 + FMA and AVX-512, chosen at run time.
#pragma once
#include "bitmap_common.h"

#ifdef MOSAIC_X86
namespace mosaic {
namespace {

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
MOSAIC_AVX2 int64_t row_avx2(const Problem& P, int64_t r, int64_t t0) {
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
  return p - static_cast<const V*>(P.values);
}

template <typename V, int NT>
int64_t row_avx2_any(const Problem& P, int64_t r, int64_t t0) {
  // 8-value loads start at most at the row's end: only the rows close to the end of the buffer need a copy
  return P.row_end(r) + 8 <= P.total ? row_avx2<V, NT, false>(P, r, t0) : row_avx2<V, NT, true>(P, r, t0);
}

// Row r of W, dense, into out[0 .. tiles * 64) (every lane written: no zeroing needed); the index past its values.
template <typename V, bool BOUNDED>
MOSAIC_AVX2 int64_t expand_row_avx2(const Problem& P, int64_t r, float* out) {
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
  return p - static_cast<const V*>(P.values);
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
MOSAIC_AVX512 int64_t row_avx512(const Problem& P, int64_t r, int64_t t0) {
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
  return p - static_cast<const V*>(P.values);
}

template <typename V>
MOSAIC_AVX512 int64_t expand_row_avx512(const Problem& P, int64_t r, float* out) {
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
  return p - static_cast<const V*>(P.values);
}

}  // namespace
}  // namespace mosaic
#endif  // MOSAIC_X86
