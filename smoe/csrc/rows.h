// matvec for the variants whose row kernels take one weight row and up to 4 token rows (AVX2,
// NEON): the token rows in groups of up to 4, each group's pointers set up once per call (bf16
// rows widened to fp32 and zero padded to 16 columns, so the kernels' loads never need a mask),
// then every weight row of [n0, n1) once per group. `Rows` is the variant's namespace-level
// struct of row kernels:
//
//   Rows::bf16<MR>(x, w, K, res)                 res[m] = fp32 rows x[m] · bf16 weight row w
//   Rows::q8<MR>(xq, sv, w, K, res)              res[m] = sum_b d_b · (int8 block products)
//   Rows::q4<MR>(xq, sv, xs, codes, sm, K, G, res)  the int4 row with its offsets
//
// A row's sums run in the same order whatever shares its group (batch invariance).

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

template <class Rows, int MR>
void dot_row(const RowGroup& g, const Matrix& W, int64_t n, float* res) {
  if (W.kind == kBf16) {
    Rows::template bf16<MR>(g.x, static_cast<const uint16_t*>(W.w) + n * W.K, W.K, res);
  } else if (W.kind == kQ8) {
    Rows::template q8<MR>(g.xq, g.sv, static_cast<const int8_t*>(W.w) + n * W.K, W.K, res);
    for (int m = 0; m < MR; ++m) res[m] *= W.scale[n];
  } else {
    Rows::template q4<MR>(g.xq, g.sv, g.xs, static_cast<const uint8_t*>(W.w) + n * (W.K / 2),
                          W.sm + n * 2 * (W.K / W.G), W.K, W.G, res);
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
  float res[kMaxRows];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < ngroups; ++i) {
      const RowGroup& g = groups[i];
      switch (g.mr) {
        case 1: dot_row<Rows, 1>(g, W, n, res); break;
        case 2: dot_row<Rows, 2>(g, W, n, res); break;
        case 3: dot_row<Rows, 3>(g, W, n, res); break;
        default: dot_row<Rows, 4>(g, W, n, res);
      }
      for (int64_t m = 0; m < g.mr; ++m) out[(kMaxRows * i + m) * ldo + (n - n0)] = res[m];
    }
}

}  // namespace
