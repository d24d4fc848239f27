// linear_bf16 / _q8 / _q4: y [M, N] = x [M, K] · Wᵀ for a few token rows, each weight row read
// once (the PyTorch twins: F.linear, smoe/quantize.py's int8_linear and int4_linear).

#include "kernels.h"

namespace {

// ------------------------------------------------------------------------------ linear

// y_i [M, N_i] = x [M, K] · W_iᵀ rounded to bf16, for every matrix i (all with the same K): the
// activations prepared once per kind (quantized once for all int8 matrices, once for all int4),
// and one split of all the matrices' row tiles across the threads.
void linears_into(const uint16_t* x, int64_t M, const std::vector<Matrix>& Ws, const std::vector<uint16_t*>& ys) {
  const int64_t K = Ws[0].K;
  QRows storage[4];
  Acts acts[4];
  int64_t G[4] = {-1, -1, -1, -1};  // per kind: int4's group (one for the call), GGML's activation formats (all)
  for (const Matrix& W : Ws) {
    check(W.K == K, "matrices of one call must share their input size");
    // int4 activations carry per-group sums: every int4 matrix of the call must share its group
    check(G[W.kind] < 0 || W.kind != kQ4 || G[kQ4] == W.G, "int4 matrices of one call must share a group size");
    G[W.kind] = W.kind == kGgml ? std::max<int64_t>(G[kGgml], 0) | W.G : W.G;
  }
  for (int kind = 0; kind < 4; ++kind)
    if (G[kind] >= 0) acts[kind] = prepare(Kind(kind), x, M, K, G[kind], storage[kind]);
  std::vector<int64_t> first(Ws.size() + 1, 0);  // each matrix's first tile of 4 rows
  for (size_t i = 0; i < Ws.size(); ++i) first[i + 1] = first[i] + (Ws[i].N + 3) / 4;
  std::vector<int64_t> rows(M);
  for (int64_t i = 0; i < M; ++i) rows[i] = i;
  at::parallel_for(0, first.back(), tiles_grain(K * M / 4), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    for (size_t i = 0; i < Ws.size(); ++i) {
      const int64_t a = std::max(t0, first[i]), b = std::min(t1, first[i + 1]);
      if (a >= b) continue;
      const Matrix& W = Ws[i];
      const int64_t n0 = (a - first[i]) * 4, n1 = std::min(W.N, (b - first[i]) * 4), nn = n1 - n0;
      buf.resize(M * nn);
      matvec(acts[W.kind], rows.data(), M, W, n0, n1, buf.data(), nn);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < nn; ++n) ys[i][m * W.N + n0 + n] = f32_to_bf16(buf[m * nn + n]);
    }
  });
}

at::Tensor linear(Kind kind, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                  int64_t G) {
  const Matrix W = make_matrix(kind, w, scale, G);
  check_acts(x, W.K);
  const int64_t M = x.size(0), N = W.N;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  linears_into(static_cast<const uint16_t*>(x.data_ptr()), M, {W}, {static_cast<uint16_t*>(out.data_ptr())});
  return out;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) { return linear(kBf16, x, w, c10::nullopt, 0); }

at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return linear(kQ8, x, w, scale, 0);
}

at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sm, int64_t group_size) {
  return linear(kQ4, x, codes, sm, group_size);
}

// fp32 x [M, K] -> fp32 [M, N], llama.cpp's arithmetic end to end: its fp32 activations quantized
// as it quantizes them, the block products' fp32 results unrounded
at::Tensor linear_ggml_f32(const at::Tensor& x, const Matrix& W) {
  check(x.device().is_cpu() && x.dim() == 2 && x.size(1) == W.K && x.is_contiguous(),
        "activations must be contiguous [M, K] on the CPU");
  const int64_t M = x.size(0), N = W.N, K = W.K;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  QRows storage;
  quantize_act_rows(x.data_ptr<float>(), M, K, W.G, storage.blocks);
  const Acts acts{kGgml, {}, &storage};
  std::vector<int64_t> rows(M);
  for (int64_t i = 0; i < M; ++i) rows[i] = i;
  float* y = out.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, tiles_grain(K * M / 4), [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4), nn = n1 - n0;
    std::vector<float> buf(M * nn);
    matvec(acts, rows.data(), M, W, n0, n1, buf.data(), nn);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < nn; ++n) y[m * N + n0 + n] = buf[m * nn + n];
  });
  return out;
}

// blocks [N, row bytes] in the GGML type info[0] (ggml.h): activations quantized as llama.cpp does;
// bf16 activations give bf16 results, fp32 ones fp32 (linear_ggml_f32)
at::Tensor linear_ggml(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& info) {
  if (x.scalar_type() == at::kFloat) return linear_ggml_f32(x, make_matrix(kGgml, blocks, info, 0));
  return linear(kGgml, x, blocks, info, 0);
}

}  // namespace
