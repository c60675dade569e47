// Shared pieces of the bitmap kernel (bitmap_kernel.cpp): the problem, bitmap and value loads, the portable path.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
  uint64_t past_end;  // bits of a row's last tile beyond in_features (must be clear)
  const float* x;  // [tokens, tiles * 64], columns past `in` are zero
  int64_t tokens;
  float* y;           // [tokens, rows]
  const float* bias;  // [rows] or nullptr
  int64_t width() const { return tiles * kTile; }
  int64_t stored(uint64_t bits) const {  // values a tile occupies, padding included
    return (__builtin_popcountll(bits) + pad - 1) & ~(pad - 1);
  }
  int64_t row_end(int64_t r) const { return r + 1 < rows ? offsets[r + 1] : total; }
  int64_t max_stored() const { return (kTile + pad - 1) & ~(pad - 1); }  // values one tile may occupy
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

// -- checks ------------------------------------------------------------------------------------------------------
// Values the bitmaps of row r mark (popcounts, each tile padded to `pad`).
inline int64_t row_count(const Problem& P, int64_t r) {
  const uint8_t* bm = P.bitmaps + r * P.tiles * 8;
  int64_t count = 0;
  for (int64_t k = 0; k < P.tiles; ++k) count += P.stored(load_bitmap(bm + 8 * k));
  return count;
}

inline void row_error(const Problem& P, int64_t r) {
  const int64_t start = P.offsets[r];
  TORCH_CHECK(false, "inconsistent bitmap weight: row ", r, " starts at offsets[", r, "] = ", start,
              " and its bitmaps mark ", row_count(P, r), " values, but ",
              r + 1 < P.rows ? c10::str("offsets[", r + 1, "] = ", P.row_end(r))
                             : c10::str("the values end at ", P.total),
              " (", P.total, " values; the offsets must be the running count of the bitmaps)");
}

// Before row r is computed, O(1): its offsets are in order and inside `values`, no bit is set past the last column,
// and the row's reads cannot leave the buffer even if its bitmaps mark more values than its offsets give it (a
// path reads at most tiles * max_stored() + 16 values from the row's start): a row whose start is closer than that
// to the buffer's end (the last few) is counted now, O(tiles of the row).
inline void check_row_start(const Problem& P, int64_t r) {
  const int64_t start = P.offsets[r], end = P.row_end(r);
  const bool near_end = start + P.tiles * P.max_stored() + 16 > P.total;
  if (start < 0 || end < start || end > P.total || (near_end && start + row_count(P, r) != end)) row_error(P, r);
  TORCH_CHECK(!P.past_end || !(load_bitmap(P.bitmaps + ((r + 1) * P.tiles - 1) * 8) & P.past_end),
              "inconsistent bitmap weight: row ", r, " has bits set beyond the last column");
}

// After row r, O(1): the path's value index (advanced by the popcounts as it went) must land on the row's end.
inline void check_row_end(const Problem& P, int64_t r, int64_t at) {
  if (at != P.row_end(r)) row_error(P, r);
}

// Dense semantics for inputs that are not finite: a pruned weight is an exact 0 and 0 * NaN = 0 * inf = NaN, so
// y[t, r] is NaN wherever row r prunes a column at which x[t] is NaN or infinite. The paths skip zeros (the scalar
// path every one, the SIMD paths all-zero tiles), so this is set here, for all of them alike. O(tokens * in) to
// find such inputs; the fix-up itself only runs when there are some.
inline void propagate_non_finite(const Problem& P, int64_t in_features) {
  for (int64_t t = 0; t < P.tokens; ++t) {
    const float* x = P.x + t * P.width();
    uint32_t any = 0;
    for (int64_t j = 0; j < in_features; ++j) {
      uint32_t bits;
      std::memcpy(&bits, x + j, 4);
      any |= (bits & 0x7f800000u) == 0x7f800000u;  // exponent all ones: NaN or +-inf
    }
    for (int64_t j = 0; any && j < in_features; ++j) {
      if (std::isfinite(x[j])) continue;
      const int64_t byte = j / kTile * 8 + j % kTile / 8;
      for (int64_t r = 0; r < P.rows; ++r)
        if (!((P.bitmaps[r * P.tiles * 8 + byte] >> (j % 8)) & 1)) P.y[t * P.rows + r] = NAN;
    }
  }
}

// -- portable path -------------------------------------------------------------------------------------------------
template <typename V>
void rows_scalar(const Problem& P, int64_t r0, int64_t r1) {
  const V* values = static_cast<const V*>(P.values);
  const int64_t width = P.width();
  std::vector<float> acc(P.tokens);
  for (int64_t r = r0; r < r1; ++r) {
    check_row_start(P, r);
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
    check_row_end(P, r, at);
    for (int64_t t = 0; t < P.tokens; ++t) P.store(r, t, acc[t]);
  }
}

// Row r of W, dense, into out[0 .. tiles * 64); returns the index past the row's values.
template <typename V>
int64_t expand_row_scalar(const Problem& P, int64_t r, float* out) {
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
  return at;
}

}  // namespace
}  // namespace mosaic
