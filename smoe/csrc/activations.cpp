// Activation quantization: bf16 rows to int8 in blocks of 32, in the column order the integer
// kernels read them (the per-row loop is avx512.cpp's quantize_row).

#include "kernels.h"

namespace {

// R rows of K bf16 activations, one after another
void quantize_rows(const uint16_t* x, int64_t R, int64_t K, Kind kind, int64_t G, QRows& out) {
  const int64_t kChunk = chunk_of(kind);
  out.K = K;
  out.Kp = (K + kChunk - 1) / kChunk * kChunk;
  out.G = G;
  out.ng = kind == kQ8 ? 1 : K / G;
  out.q.assign(R * out.Kp, 0);
  out.sv.assign(R * (out.Kp / kChunk) * 16, 0.f);
  out.gs.assign(R * out.ng, 0.f);
  for (int64_t r = 0; r < R; ++r)
    quantize_row(x + r * K, K, kind, G, out.q.data() + r * out.Kp, out.sv.data() + r * (out.Kp / kChunk) * 16,
                 out.gs.data() + r * out.ng);
}

// the activations as the integer kernels see them, for tests: [M, K] dequantized (q * d)
at::Tensor quantize_activations(const at::Tensor& x, int64_t group_size) {
  check_acts(x, x.size(1));
  const int64_t M = x.size(0), K = x.size(1);
  QRows q;
  prepare(kQ8, static_cast<const uint16_t*>(x.data_ptr()), M, K, group_size, q);
  at::Tensor out = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k)
      o[i * K + k] = float(q.q[i * q.Kp + k]) * q.sv[i * (q.Kp / 64) * 16 + (k / 64) * 16 + (k % 64) / 32 * 8];
  return out;
}

}  // namespace
