// moe_bf16 / _q8 / _q4: all chosen experts of a MoE layer in one call (the PyTorch twin:
// smoe/experts.py's sorted path).

#include "kernels.h"

namespace {

// ------------------------------------------------------------------------------ fused MoE decode
//
// x [T, H], expert_indices [T, K], expert_weights [T, K] fp32; gate_up [E, 2F, H] (gate rows,
// then up rows), down [E, H, F]. For each chosen expert (ascending): h = x·gate_upᵀ rounded to
// bf16, a = silu(gate) * up (each rounded to bf16, as PyTorch's bf16 ops round), y = a·downᵀ
// rounded, weighted in fp32 and rounded, added to the token's output in bf16 — the arithmetic
// of smoe/experts.py's sorted path, so the results match it to the order of the sums.
// Phase 1 splits the F rows of gate/up across threads, phase 2 the H rows of down; only the
// chosen experts' weights are read.

at::Tensor moe(Kind kind, const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
               const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
               const c10::optional<at::Tensor>& down_scale, int64_t G, const at::Tensor& up) {
  check(expert_indices.scalar_type() == at::kLong && expert_weights.scalar_type() == at::kFloat,
        "expert_indices int64 and expert_weights fp32 expected");
  check(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0), "stacked [E, out, in] weights expected");
  const int64_t T = x.size(0), topk = expert_indices.size(1), E = gate_up.size(0);
  // gate and up: one stacked tensor [E, 2F, H] (gate rows, then up rows), or GGML's two [E, F, H]
  // (`up` given: its type is gate_up_scale's second id)
  const bool split = up.defined();
  check(!split || (kind == kGgml && gate_up_scale->numel() >= 2 && up.size(0) == E), "a separate up needs GGML blocks");
  auto up_matrix = [&](int64_t e) { return ggml_matrix(up, gate_up_scale->data_ptr<int32_t>()[1], e); };
  const Matrix gu0 = make_matrix(kind, gate_up, gate_up_scale, G, 0);
  const Matrix dn0 = make_matrix(kind, down, down_scale, G, 0);
  const int64_t H = gu0.K, F = split ? gu0.N : gu0.N / 2, up_row0 = split ? 0 : F;
  check(dn0.N == H && dn0.K == F && (split ? up_matrix(0).N == F && up_matrix(0).K == H : gu0.N % 2 == 0),
        "gate_up [E, 2F, H] (or gate and up [E, F, H]) and down [E, H, F] expected");
  check_acts(x, H);
  check(expert_indices.is_contiguous() && expert_weights.is_contiguous() && expert_indices.size(0) == T &&
            expert_weights.sizes() == expert_indices.sizes(), "routing must be contiguous [T, K]");
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0) return out;

  // the chosen experts, ascending, with their token rows and weights
  const int64_t* idx = expert_indices.data_ptr<int64_t>();
  const float* wts = expert_weights.data_ptr<float>();
  std::vector<std::vector<std::pair<int64_t, float>>> routed(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < topk; ++k) {
      const int64_t e = idx[t * topk + k];
      check(e >= 0 && e < E, "expert index out of range");
      routed[e].emplace_back(t, wts[t * topk + k]);
    }
  std::vector<int64_t> chosen, offset;  // offset: the expert's first row in the activations buffer
  int64_t R = 0;
  for (int64_t e = 0; e < E; ++e)
    if (!routed[e].empty()) {
      chosen.push_back(e);
      offset.push_back(R);
      R += int64_t(routed[e].size());
    }
  std::vector<Matrix> gu, ups, dn;
  for (int64_t e : chosen) {
    gu.push_back(make_matrix(kind, gate_up, gate_up_scale, G, e));
    ups.push_back(split ? up_matrix(e) : gu.back());
    dn.push_back(make_matrix(kind, down, down_scale, G, e));
  }
  std::vector<int64_t> token_rows(R);  // activation row r -> token
  for (size_t u = 0; u < chosen.size(); ++u)
    for (size_t j = 0; j < routed[chosen[u]].size(); ++j) token_rows[offset[u] + j] = routed[chosen[u]][j].first;

  // phase 1: act [R, F] = silu(x·gateᵀ) * (x·upᵀ), each expert on its own tokens
  QRows xq;
  // (GGML: the activation formats gate and up read, then down's)
  const Acts xa = prepare(kind, static_cast<const uint16_t*>(x.data_ptr()), T, H,
                          kind == kGgml ? gu[0].G | ups[0].G : G, xq);
  std::vector<uint16_t> act(R * F);
  const int64_t f_tiles = (F + 3) / 4;
  at::parallel_for(0, f_tiles, tiles_grain(H * R / 2), [&](int64_t t0, int64_t t1) {
    const int64_t f0 = t0 * 4, f1 = std::min(F, t1 * 4), nf = f1 - f0;
    std::vector<float> g, upv;
    for (size_t u = 0; u < chosen.size(); ++u) {
      const int64_t n = int64_t(routed[chosen[u]].size());
      const int64_t* rows = token_rows.data() + offset[u];
      g.resize(n * nf);
      upv.resize(n * nf);
      matvec(xa, rows, n, gu[u], f0, f1, g.data(), nf);
      matvec(xa, rows, n, ups[u], up_row0 + f0, up_row0 + f1, upv.data(), nf);
      for (int64_t j = 0; j < n; ++j) silu_mul(g.data() + j * nf, upv.data() + j * nf, nf, act.data() + (offset[u] + j) * F + f0);
    }
  });

  // phase 2: out[t] = sum over t's experts, ascending, of weight * (act·downᵀ)
  QRows aq;
  const Acts aa = prepare(kind, act.data(), R, F, kind == kGgml ? dn0.G : G, aq);
  std::vector<int64_t> act_rows(R);
  for (int64_t r = 0; r < R; ++r) act_rows[r] = r;
  std::vector<float> acc(T * H, 0.f);
  const int64_t h_tiles = (H + 3) / 4;
  at::parallel_for(0, h_tiles, tiles_grain(F * R), [&](int64_t t0, int64_t t1) {
    const int64_t h0 = t0 * 4, h1 = std::min(H, t1 * 4), nh = h1 - h0;
    std::vector<float> y;
    for (size_t u = 0; u < chosen.size(); ++u) {
      const auto& slots = routed[chosen[u]];
      const int64_t n = int64_t(slots.size());
      y.resize(n * nh);
      matvec(aa, act_rows.data() + offset[u], n, dn[u], h0, h1, y.data(), nh);
      for (int64_t j = 0; j < n; ++j) {
        float* o = acc.data() + slots[j].first * H;
        for (int64_t h = 0; h < nh; ++h)
          o[h0 + h] = round_bf16(o[h0 + h] + round_bf16(round_bf16(y[j * nh + h]) * slots[j].second));
      }
    }
  });
  uint16_t* y = static_cast<uint16_t*>(out.data_ptr());
  for (int64_t i = 0; i < T * H; ++i) y[i] = f32_to_bf16(acc[i]);
  return out;
}

at::Tensor moe_bf16(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                    const at::Tensor& gate_up, const at::Tensor& down) {
  return moe(kBf16, x, expert_indices, expert_weights, gate_up, c10::nullopt, down, c10::nullopt, 0);
}

at::Tensor moe_q8(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_scale, const at::Tensor& down,
                  const at::Tensor& down_scale) {
  return moe(kQ8, x, expert_indices, expert_weights, gate_up, gate_up_scale, down, down_scale, 0);
}

at::Tensor moe_q4(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_sm, const at::Tensor& down,
                  const at::Tensor& down_sm, int64_t group_size) {
  return moe(kQ4, x, expert_indices, expert_weights, gate_up, gate_up_sm, down, down_sm, group_size);
}

// GGML blocks: gate and up [E, F, row bytes] as the file stacks them (types gate_up_info[0], [1]),
// down [E, H, row bytes] (down_info[0]); activations quantized as llama.cpp does (ggml.h)
at::Tensor moe_ggml(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                    const at::Tensor& gate, const at::Tensor& up, const at::Tensor& gate_up_info,
                    const at::Tensor& down, const at::Tensor& down_info) {
  return moe(kGgml, x, expert_indices, expert_weights, gate, gate_up_info, down, down_info, 0,
             up.numel() > 0 ? up : at::Tensor());
}

}  // namespace
