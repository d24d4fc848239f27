// linear_prefill: y [M, N] = x [M, K] · Wᵀ for many token rows (a prompt), W's rows rebuilt a block
// at a time into a buffer and multiplied by PyTorch's GEMMs, in one of two precisions:
//
//   fp32 (bf16_gemm false): W's rows widened / dequantized to fp32, fp32 GEMMs (at::mm_out), y rounded
//     to bf16 once — for CPUs whose kernels are not AVX-512's: PyTorch's bf16 GEMM has no fast path
//     without AVX-512 BF16 (or AMX), while its fp32 GEMM runs at full speed. The arithmetic is the
//     PyTorch twin's (smoe/kernels/native.py: dequantize in fp32, F.linear in fp32, round once).
//   bf16 (bf16_gemm true; the Python side asks it where the kernels are AVX-512's: the CPU has
//     AVX-512 BF16): W's rows dequantized to fp32 then rounded to bf16 (the values a bf16 model holds),
//     bf16 GEMMs (oneDNN: AVX-512 BF16 / AMX), fp32 sums rounded to bf16 once. On AMD Zen 5 PyTorch's
//     fp32 GEMM (MKL) ran at 191 GFLOP/s on 2 cores and its bf16 GEMM at 958: the 512-token prefill of
//     the benchmark checkpoint's GGUF files went from 150-200 to 390-530 tok/s.
//
//   bf16: w = bf16 value           q8: w = q · scale[n]           q4: w = code · s_g + m_g
//   ggml: w = gguf's value (ggml.h)
//
// E.g. K = 1024: blocks of 2048 rows (8 MiB of fp32, 4 of bf16), so a [14336, 1024] weight is 7
// GEMMs of [2048, 1024] x [1024, M], each block dequantized by the threads (the variant's
// dequantize_rows) before its GEMM.

#include "kernels.h"

namespace {

at::Tensor linear_prefill(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                          int64_t group_size, bool bf16_gemm) {
  const Kind kind = kind_of(w, scale.has_value() ? *scale : at::Tensor());
  const Matrix W = make_matrix(kind, w, kind == kBf16 ? c10::nullopt : scale, group_size);
  check_acts(x, W.K);
  const int64_t M = x.size(0), N = W.N, K = W.K;
  const at::ScalarType gemm = bf16_gemm ? at::kBFloat16 : at::kFloat;
  // bf16: x padded with zero rows to a multiple of 16. oneDNN keeps a compiled GEMM per shape (up to
  // 1024 of them, ~0.75 MiB each), and the rows a prompt routes to each expert vary: unpadded, the
  // benchmark checkpoint's 512-token prefill left +120 MiB of them resident; padded, a handful
  const int64_t Mg = bf16_gemm ? (M + 15) / 16 * 16 : M;
  const at::Tensor xg = Mg == M ? x.to(gemm) : at::constant_pad_nd(x.to(gemm), {0, 0, 0, Mg - M});  // [Mg, K]
  at::Tensor y = at::empty({Mg, N}, x.options().dtype(gemm));  // each block's GEMM writes its columns
  // rows rebuilt at most 2^21 values at a time (8 MiB of fp32): fewer, larger GEMMs, each re-reading
  // all of x — measured on the benchmark checkpoint's 512-token prefill in fp32: blocks of 1 MiB 171,
  // 4 MiB 188, 8 MiB 199, 16 MiB 194 tok/s (Q3_K_M; 2 threads, AVX-512). N is cut into equal blocks
  // of a multiple of 16 rows: one GEMM shape per weight for oneDNN's cache.
  const int64_t most = std::max<int64_t>(16, (int64_t(1) << 21) / std::max<int64_t>(K, 1));
  const int64_t count = (N + most - 1) / most;
  const int64_t block = std::min(most, ((N + count - 1) / count + 15) / 16 * 16);
  // the block's rows in a buffer kept for the calling thread: allocated once, not 8 MiB per call
  // (a prompt makes hundreds of calls, whose freed buffers fragmented glibc's heap: +40 MiB resident)
  static thread_local std::vector<float> kept;
  const int64_t rows = std::min(block, N);
  const int64_t floats = bf16_gemm ? (rows * K + 1) / 2 : rows * K;
  if (int64_t(kept.size()) < floats) kept.resize(floats);
  float* buf = kept.data();
  const at::Tensor buffer = at::from_blob(buf, {rows, K}, y.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    if (bf16_gemm) {
      uint16_t* b16 = reinterpret_cast<uint16_t*>(buf);
      at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
        std::vector<float> row(K);  // one row's fp32 values, then rounded as torch rounds
        for (int64_t n = a; n < b; ++n) {
          dequantize_rows(W, n, n + 1, row.data());
          uint16_t* o = b16 + (n - n0) * K;
          for (int64_t k = 0; k < K; ++k) {  // f32_to_bf16 without its branch: a loop the compiler vectorizes
            uint32_t u;
            std::memcpy(&u, &row[k], 4);
            const uint32_t even = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
            o[k] = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : even);
          }
        }
      });
    } else {
      at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { dequantize_rows(W, a, b, buf + (a - n0) * K); });
    }
    at::Tensor columns = y.narrow(1, n0, n1 - n0);  // [M, n1 - n0] with row stride N: the GEMM's ldc
    at::mm_out(columns, xg, buffer.narrow(0, 0, n1 - n0).t());
  }
  return (Mg == M ? y : y.narrow(0, 0, M)).to(at::kBFloat16).contiguous();
}

}  // namespace
