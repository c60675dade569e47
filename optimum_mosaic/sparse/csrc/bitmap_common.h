// Shared pieces of the bitmap kernel (bitmap_kernel.cpp): the problem, bitmap and value loads, the portable path.
#pragma once
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

}  // namespace
}  // namespace mosaic
