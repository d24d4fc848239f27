// Activation quantization: bf16 rows to int8 in blocks of 32, in the column order the integer
// kernels read them (quantize_rows, variants.cpp, with the variant's quantize_row).

#include "kernels.h"

namespace {

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
