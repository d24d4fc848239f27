// linear_prefill: y [M, N] = x [M, K] · Wᵀ for many token rows (a prompt) on CPUs whose kernels
// are not AVX-512's: PyTorch's bf16 GEMM has no fast path without AVX-512 BF16 (or AMX), while its
// fp32 GEMM runs at full speed. So W's rows are widened / dequantized to fp32 a block at a time
// (a block of 8 MiB: large GEMMs, x re-read once per block), each block one fp32 GEMM
// (at::mm_out into the columns of y it owns), and y is rounded to bf16 once. The arithmetic is the
// PyTorch twin's (smoe/kernels/native.py: dequantize in fp32, F.linear in fp32, round once).
//
//   bf16: w = bf16 value           q8: w = q · scale[n]           q4: w = code · s_g + m_g
//
// E.g. K = 1024: blocks of 2048 rows (8 MiB of fp32), so a [14336, 1024] weight is 7 GEMMs of
// [2048, 1024] x [1024, M], each block dequantized by the threads (the variant's dequantize_rows)
// before its GEMM.

#include "kernels.h"

namespace {

at::Tensor linear_prefill(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                          int64_t group_size) {
  const Kind kind = kind_of(w, scale.has_value() ? *scale : at::Tensor());
  const Matrix W = make_matrix(kind, w, kind == kBf16 ? c10::nullopt : scale, group_size);
  check_acts(x, W.K);
  const int64_t M = x.size(0), N = W.N, K = W.K;
  const at::Tensor xf = x.to(at::kFloat);                           // [M, K]
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));  // each block's GEMM writes its columns
  // rows widened a block at a time into 8 MiB of fp32: fewer, larger GEMMs (each re-reads all of x),
  // measured on the benchmark checkpoint's 512-token prefill: 1 MiB blocks 171, 4 MiB 188, 8 MiB 199,
  // 16 MiB 194 tok/s (Q3_K_M; 2 threads, AVX-512)
  const int64_t block = std::max<int64_t>(16, (int64_t(1) << 23) / (4 * std::max<int64_t>(K, 1)));
  // the block's fp32 rows in a buffer kept for the calling thread: allocated once, not 8 MiB per call
  // (a prompt makes hundreds of calls, whose freed buffers fragmented glibc's heap: +40 MiB resident)
  static thread_local std::vector<float> kept;
  const int64_t rows = std::min(block, N);
  if (int64_t(kept.size()) < rows * K) kept.resize(rows * K);
  float* buf = kept.data();
  const at::Tensor buffer = at::from_blob(buf, {rows, K}, y.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { dequantize_rows(W, a, b, buf + (a - n0) * K); });
    at::Tensor columns = y.narrow(1, n0, n1 - n0);  // [M, n1 - n0] with row stride N: the GEMM's ldc
    at::mm_out(columns, xf, buffer.narrow(0, 0, n1 - n0).t());
  }
  return y.to(at::kBFloat16);
}

}  // namespace
