// matvec for the variants whose row kernels take one weight row and up to 4 token rows (AVX2,
// NEON): the token rows in groups of up to 4, each group's pointers set up once per call (bf16
// rows widened to fp32 and zero padded to 16 columns, so the kernels' loads never need a mask),
// then every weight row of [n0, n1) once per group; with one token row of int8/int4,
// Rows::kWeightRows weight rows a call (the activations loaded once for all of them). `Rows` is the variant's
// namespace-level struct of row kernels, for MR token rows and NR consecutive weight rows (ldw
// apart), res[m * NR + r]:
//
//   Rows::bf16<MR, NR>(x, w, ldw, K, res)           fp32 rows x[m] · bf16 weight row r
//   Rows::q8<MR, NR>(xq, sv, w, ldw, K, res)        sum_b d_b · (int8 block products)
//   Rows::q4<MR, NR>(xq, sv, xs, codes, ldw, sm, lds, K, G, res)  the int4 row with its offsets
//
// A row's sums run in the same order whatever shares its call (batch invariance).

#pragma once

#include "isa.h"

namespace {

constexpr int kMaxRows = 4;  // token rows per pass over a weight row

struct RowGroup {  // one group of up to 4 activation rows, as the row kernels read them
  int64_t mr = 0;
  const float* x[kMaxRows] = {};    // bf16 rows widened to fp32
  const int8_t* xq[kMaxRows] = {};  // quantized: codes, per-lane block scales, per-group sums (q4)
  const float* sv[kMaxRows] = {};
  const float* xs[kMaxRows] = {};
};

// res[m * NR + r] = token row m of the group times weight row n + r
template <class Rows, int MR, int NR>
void dot_rows(const RowGroup& g, const Matrix& W, int64_t n, float* res) {
  if (W.kind == kBf16) {
    Rows::template bf16<MR, NR>(g.x, static_cast<const uint16_t*>(W.w) + n * W.K, W.K, W.K, res);
  } else if (W.kind == kQ8) {
    Rows::template q8<MR, NR>(g.xq, g.sv, static_cast<const int8_t*>(W.w) + n * W.K, W.K, W.K, res);
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) res[m * NR + r] *= W.scale[n + r];
  } else {
    const int64_t lds = 2 * (W.K / W.G);
    Rows::template q4<MR, NR>(g.xq, g.sv, g.xs, static_cast<const uint8_t*>(W.w) + n * (W.K / 2), W.K / 2,
                              W.sm + n * lds, lds, W.K, W.G, res);
  }
}

template <class Rows>
void matvec_rows(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
                 int64_t ldo) {
  const int64_t ngroups = (M + kMaxRows - 1) / kMaxRows, K16 = (W.K + 15) / 16 * 16;
  std::vector<float> widened(W.kind == kBf16 ? M * K16 : 0, 0.f);  // [M, K16]
  std::vector<RowGroup> groups(ngroups);
  for (int64_t i = 0; i < M; ++i) {
    RowGroup& g = groups[i / kMaxRows];
    const int64_t m = i % kMaxRows, r = rows[i];
    g.mr = m + 1;
    if (W.kind == kBf16) {
      float* f = widened.data() + i * K16;
      for (int64_t k = 0; k < W.K; ++k) f[k] = bf16_to_f32(a.bf[r][k]);
      g.x[m] = f;
      continue;
    }
    const QRows& q = *a.q;
    g.xq[m] = q.q.data() + r * q.Kp;
    g.sv[m] = q.sv.data() + r * (q.Kp / chunk_of(W.kind)) * 16;
    g.xs[m] = q.gs.data() + r * q.ng;
  }
  constexpr int NR = Rows::kWeightRows;
  float res[kMaxRows * (NR > 1 ? NR : 1)];
  int64_t n = n0;
  // one token row of int8/int4: NR weight rows a call (each row's sums as in a call of its own);
  // bf16 stays one row a call: 4 interleaved bf16 streams read the benchmark checkpoint at 25
  // tok/s against 33 one row at a time (AVX2, Xeon), where the quantized kernels gained
  if (NR > 1 && M == 1 && W.kind != kBf16) {
    for (; n + NR <= n1; n += NR) {
      dot_rows<Rows, 1, NR>(groups[0], W, n, res);
      for (int r = 0; r < NR; ++r) out[n + r - n0] = res[r];
    }
  }
  for (; n < n1; ++n)
    for (int64_t i = 0; i < ngroups; ++i) {
      const RowGroup& g = groups[i];
      switch (g.mr) {
        case 1: dot_rows<Rows, 1, 1>(g, W, n, res); break;
        case 2: dot_rows<Rows, 2, 1>(g, W, n, res); break;
        case 3: dot_rows<Rows, 3, 1>(g, W, n, res); break;
        default: dot_rows<Rows, 4, 1>(g, W, n, res);
      }
      for (int64_t m = 0; m < g.mr; ++m) out[(kMaxRows * i + m) * ldo + (n - n0)] = res[m];
    }
}

}  // namespace
