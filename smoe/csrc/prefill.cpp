// linear_prefill: y [M, N] = x [M, K] · Wᵀ for many token rows (a prompt) on CPUs whose kernels
// are not AVX-512's: PyTorch's bf16 GEMM has no fast path without AVX-512 BF16 (or AMX), while its
// fp32 GEMM runs at full speed. So W's rows are widened / dequantized to fp32 a block at a time
// (a block of ~1 MiB, which stays in cache while the GEMM reads it), each block one fp32 GEMM
// (at::mm_out into the rows of yᵀ it owns), and y is rounded to bf16 once. The arithmetic is the
// PyTorch twin's (smoe/kernels/native.py: dequantize in fp32, F.linear in fp32, round once).
//
//   bf16: w = bf16 value           q8: w = q · scale[n]           q4: w = code · s_g + m_g
//
// E.g. K = 1024: blocks of 256 rows (1 MiB of fp32), so a [14336, 1024] weight is 56 GEMMs of
// [256, 1024] x [1024, M], each block dequantized by the threads before its GEMM.

#include "kernels.h"

namespace {

// rows [n0, n1) of W into out [n1 - n0, K] fp32
void dequantize_rows(const Matrix& W, int64_t n0, int64_t n1, float* out) {
  const int64_t K = W.K;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    if (W.kind == kBf16) {
      const uint16_t* w = static_cast<const uint16_t*>(W.w) + n * K;
      for (int64_t k = 0; k < K; ++k) o[k] = bf16_to_f32(w[k]);
    } else if (W.kind == kQ8) {
      const int8_t* w = static_cast<const int8_t*>(W.w) + n * K;
      const float s = W.scale[n];
      for (int64_t k = 0; k < K; ++k) o[k] = float(w[k]) * s;
    } else {  // per block of 32 columns, 16 bytes: column j in the low nibble, j + 16 in the high one
      const uint8_t* codes = static_cast<const uint8_t*>(W.w) + n * (K / 2);
      const uint16_t* sm = W.sm + n * 2 * (K / W.G);
      const int64_t ng = K / W.G;
      for (int64_t b = 0; b < K / kQBlock; ++b) {
        const int64_t g = b * kQBlock / W.G;
        const float s = bf16_to_f32(sm[g]), m = bf16_to_f32(sm[ng + g]);
        const uint8_t* c = codes + b * 16;
        float* ob = o + b * kQBlock;
        for (int j = 0; j < 16; ++j) {
          ob[j] = float(c[j] & 0x0F) * s + m;
          ob[j + 16] = float(c[j] >> 4) * s + m;
        }
      }
    }
  }
}

at::Tensor linear_prefill(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                          int64_t group_size) {
  const Kind kind = kind_of(w);
  const Matrix W = make_matrix(kind, w, kind == kBf16 ? c10::nullopt : scale, group_size);
  check_acts(x, W.K);
  const int64_t M = x.size(0), N = W.N, K = W.K;
  const at::Tensor xt = x.to(at::kFloat).t();                  // [K, M], a view of x in fp32
  at::Tensor yt = at::empty({N, M}, x.options().dtype(at::kFloat));  // yᵀ: each block's GEMM writes its own rows
  const int64_t block = std::max<int64_t>(16, (int64_t(1) << 20) / (4 * std::max<int64_t>(K, 1)));
  at::Tensor buffer = at::empty({std::min(block, N), K}, yt.options());
  float* buf = buffer.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { dequantize_rows(W, a, b, buf + (a - n0) * K); });
    at::Tensor rows = yt.narrow(0, n0, n1 - n0);
    at::mm_out(rows, buffer.narrow(0, 0, n1 - n0), xt);
  }
  return yt.t().to(at::kBFloat16).contiguous();
}

}  // namespace
