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
// Both ops check their buffers, so that inconsistent ones raise a RuntimeError instead of reading out of bounds:
// dtypes and sizes once (checked_problem); per row, O(1) before it is computed (check_row_start: offsets in order
// and inside the buffer, and the last few rows, whose worst-case reads could pass the buffer's end, counted in
// full) and after (check_row_end: the path's own popcount-advanced value index must land on the row's end).
#include "bitmap_simd.h"

namespace mosaic {
namespace {

template <typename V>
void run(const Problem& P, int64_t isa) {
  const int64_t grain = std::max<int64_t>(1, 32768 / P.width());
  at::parallel_for(0, P.rows, grain, [&](int64_t r0, int64_t r1) {
    if (isa == kScalar) return rows_scalar<V>(P, r0, r1);
#ifdef MOSAIC_X86
    for (int64_t r = r0; r < r1; ++r) {
      check_row_start(P, r);
      for (int64_t t0 = 0; t0 < P.tokens;) {
        const int64_t left = P.tokens - t0;
        const int nt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        int64_t end;
        if (isa == kAvx512) {
          end = nt == 8   ? row_avx512<V, 8>(P, r, t0)
                : nt == 4 ? row_avx512<V, 4>(P, r, t0)
                : nt == 2 ? row_avx512<V, 2>(P, r, t0)
                          : row_avx512<V, 1>(P, r, t0);
        } else {
          end = nt == 8   ? row_avx2_any<V, 8>(P, r, t0)
                : nt == 4 ? row_avx2_any<V, 4>(P, r, t0)
                : nt == 2 ? row_avx2_any<V, 2>(P, r, t0)
                          : row_avx2_any<V, 1>(P, r, t0);
        }
        check_row_end(P, r, end);
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

// The buffers' dtypes, layout and sizes (O(1)); each row is checked as it is computed (check_row_start/end).
Problem checked_problem(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets,
                        int64_t in_features, int64_t pad) {
  TORCH_CHECK(bitmaps.is_cpu() && values.is_cpu() && offsets.is_cpu(),
              "bitmaps, values and offsets must be on the CPU");
  TORCH_CHECK(bitmaps.scalar_type() == at::kByte && bitmaps.is_contiguous() && bitmaps.dim() == 2 &&
                  bitmaps.size(1) == 8,
              "bitmaps must be a contiguous [tiles, 8] uint8 tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.dim() == 1,
              "offsets must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1 &&
                  (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "values must be a contiguous 1-D float32 or bfloat16 tensor");
  TORCH_CHECK(pad >= 1 && (pad & (pad - 1)) == 0, "pad must be a power of two");
  TORCH_CHECK(in_features >= 0, "in_features must be >= 0");
  const int64_t rows = offsets.numel(), tiles = (in_features + kTile - 1) / kTile;
  TORCH_CHECK(bitmaps.size(0) == rows * tiles, "bitmaps do not split into rows of in_features: ", bitmaps.size(0),
              " tiles for ", rows, " offsets (rows) of ", tiles, " tiles (", in_features, " columns)");
  TORCH_CHECK(rows == 0 || offsets.data_ptr<int32_t>()[0] == 0,
              "inconsistent bitmap weight: the row offsets must start at 0, but offsets[0] = ",
              offsets.data_ptr<int32_t>()[0]);
  Problem P{};
  P.bitmaps = bitmaps.data_ptr<uint8_t>();
  P.values = values.data_ptr();
  P.offsets = offsets.data_ptr<int32_t>();
  P.rows = rows;
  P.tiles = tiles;
  P.pad = pad;
  P.total = values.numel();
  P.past_end = in_features % kTile ? ~uint64_t(0) << (in_features % kTile) : 0;
  return P;
}

template <typename V>
int64_t expand_row(const Problem& P, int64_t isa, int64_t r, float* out) {  // the index past the row's values
#ifdef MOSAIC_X86
  if (isa == kAvx512) return expand_row_avx512<V>(P, r, out);
  if (isa == kAvx2) {
    return P.row_end(r) + 8 <= P.total ? expand_row_avx2<V, false>(P, r, out) : expand_row_avx2<V, true>(P, r, out);
  }
#endif
  return expand_row_scalar<V>(P, r, out);
}

template <typename V>
void expand_rows(const Problem& P, int64_t isa, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r, out += P.width()) {
    check_row_start(P, r);
    check_row_end(P, r, expand_row<V>(P, isa, r, out));
  }
}

int64_t checked_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return auto_isa();
  TORCH_CHECK(isa <= best, "this CPU cannot run kernel path ", isa, " (best: ", best, ")");
  return isa;
}

// Rows row_start .. row_end of W as a dense [rows, in_features] view (row stride tiles * 64), rows checked as they go.
at::Tensor expand_block(const Problem& P, bool bf16, int64_t in_features, int64_t row_start, int64_t row_end,
                        int64_t isa) {
  at::Tensor out = at::empty({row_end - row_start, P.width()}, at::kFloat);
  float* data = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, P.width()));
  at::parallel_for(row_start, row_end, grain, [&](int64_t r0, int64_t r1) {
    float* block = data + (r0 - row_start) * P.width();
    if (!bf16) {
      expand_rows<float>(P, isa, r0, r1, block);
    } else {
      expand_rows<uint16_t>(P, isa, r0, r1, block);
    }
  });
  return out.narrow(1, 0, in_features);
}

at::Tensor expand(const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets, int64_t in_features,
                  int64_t pad, int64_t row_start, int64_t row_end, int64_t isa) {
  Problem P = checked_problem(bitmaps, values, offsets, in_features, pad);
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= P.rows, "row range out of bounds");
  return expand_block(P, values.scalar_type() == at::kBFloat16, in_features, row_start, row_end, checked_isa(isa));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& bitmaps, const at::Tensor& values, const at::Tensor& offsets,
                  const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t pad, int64_t isa,
                  int64_t dense_from) {
  Problem P = checked_problem(bitmaps, values, offsets, in_features, pad);
  TORCH_CHECK(x.is_cpu() && x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == at::kFloat,
              "x must be a float32 [tokens, in_features] CPU tensor");
  isa = checked_isa(isa);
  const int64_t tokens = x.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == P.rows, "bias has the wrong size");
  }
  if (P.rows == 0) return at::zeros({tokens, 0}, at::kFloat);
  if (tokens >= dense_from && dense_from > 0) {  // prefill: dense blocks of rows (<= 8 MB each) through the GEMM
    const int64_t block = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, in_features));
    std::vector<at::Tensor> parts;
    for (int64_t r0 = 0; r0 < P.rows; r0 += block) {
      const int64_t r1 = std::min(P.rows, r0 + block);
      at::Tensor w = expand_block(P, values.scalar_type() == at::kBFloat16, in_features, r0, r1, isa);
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
  if (tokens == 0) return y;
  if (values.scalar_type() == at::kFloat) {
    run<float>(P, isa);
  } else {
    run<uint16_t>(P, isa);
  }
  propagate_non_finite(P, in_features);
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
