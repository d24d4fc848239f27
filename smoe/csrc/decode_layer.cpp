// decode_layer / decode_layers / decode_step / rms_norm: whole decoder layers of a decode step in
// one call, or the whole step from token ids to logits (the PyTorch twin: smoe/model.py's Block,
// RMSNorm and Transformer.forward).

#include "kernels.h"

namespace {

// ------------------------------------------------------------------------------ one decoder layer, one token per row
//
// A whole Block of smoe/model.py for a decode step (one new token in each of B rows, a KV cache),
// in one call, rounding where the PyTorch modules round:
//   h = RMSNorm(x)                        fp32 statistics, normalised value rounded to bf16, times the weight
//   q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ         one pass over the threads, activations prepared once
//   RoPE ("rotate half"): q·cos + rot(q)·sin, each product and the sum rounded to bf16
//   the new k, v written to the row's slot; attention over the first kv_len slots (mask: True =
//   may attend) in fp32, as model.one_token_attention computes it; rounded to bf16
//   x = x + attn·Woᵀ                      (bf16)
//   h = RMSNorm(x); router logits h·Wrᵀ (bf16) -> softmax (fp32) -> top-k -> renormalised
//   x = x + the fused MoE op of those experts
// Python calls it from smoe/kernels/decode.py's DecodePlan; every other case runs the modules.

// y [M, H] bf16 = weight * bf16(x * rsqrt(mean(x²) + eps)), the statistics in fp32 (model.RMSNorm)
void rms_norm(const uint16_t* x, int64_t M, int64_t H, const uint16_t* weight, float eps, uint16_t* y) {
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* r = x + m * H;
    float ss = 0.f;
    for (int64_t h = 0; h < H; ++h) {
      const float v = bf16_to_f32(r[h]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(H) + eps);
    for (int64_t h = 0; h < H; ++h)
      y[m * H + h] = f32_to_bf16(bf16_to_f32(weight[h]) * round_bf16(bf16_to_f32(r[h]) * inv));
  }
}

// x [heads, D] bf16 in place: x·cos + rotate_half(x)·sin — or with pairs, each dimension rotated with its
// neighbour in (2i, 2i+1) — each product and the sum rounded (model.apply_rotary)
void rope(uint16_t* x, int64_t heads, int64_t D, const uint16_t* cos, const uint16_t* sin, bool pairs) {
  const int64_t half = D / 2;
  std::vector<float> rotated(D);
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t* r = x + h * D;
    for (int64_t d = 0; d < D; ++d)
      rotated[d] = pairs ? (d % 2 ? bf16_to_f32(r[d - 1]) : -bf16_to_f32(r[d + 1]))
                         : d < half ? -bf16_to_f32(r[d + half]) : bf16_to_f32(r[d - half]);
    for (int64_t d = 0; d < D; ++d)
      r[d] = f32_to_bf16(round_bf16(bf16_to_f32(r[d]) * bf16_to_f32(cos[d])) +
                         round_bf16(rotated[d] * bf16_to_f32(sin[d])));
  }
}

// weights: attn_norm, ffn_norm, router, then (weight, scale) for q, k, v, o, gate_up, down (scale
// empty for bf16; GGML blocks: int32 type ids), then GGML's separate up blocks (else empty); meta: query heads, kv heads, experts per token, layer, RoPE over adjacent pairs (1) or halves (0), first cache row. k_all,
// v_all: the whole cache [L, rows, G, S, D] (this step's rows are row0..row0+B-1 of the layer);
// slots [B] the slot each row's new key goes to; mask [B, kv_len] (True = may attend) or none.
at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, double eps,
                        const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                        const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                        const at::Tensor& sin) {
  check(w.size() == 16 && meta.size() == 6, "decode_layer takes 16 weights and 6 sizes");
  const int64_t B = x.size(0), H = x.size(1), Q = meta[0], G = meta[1], topk = meta[2], layer = meta[3],
                row0 = meta[5];
  const bool pairs = meta[4] != 0;
  check_acts(x, H);
  check(k_all.dim() == 5 && k_all.is_contiguous() && v_all.is_contiguous() && k_all.sizes() == v_all.sizes() &&
            layer >= 0 && layer < k_all.size(0) && row0 >= 0 && row0 + B <= k_all.size(1) && k_all.size(2) == G &&
            k_all.scalar_type() == at::kBFloat16 && v_all.scalar_type() == at::kBFloat16,
        "caches must be contiguous bf16 [L, rows, G, S, D] holding this layer and rows");
  const int64_t S = k_all.size(3), D = k_all.size(4);
  check(Q % G == 0 && kv_len >= 1 && kv_len <= S, "heads and cache length do not fit");
  check(slots.scalar_type() == at::kLong && slots.numel() == B && slots.is_contiguous(), "slots must be int64 [B]");
  check(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
            sin.is_contiguous() && cos.numel() == B * D && sin.numel() == B * D, "cos, sin must be bf16 [B, D]");
  const bool* allowed = nullptr;
  if (mask.has_value()) {
    check(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == B * kv_len,
          "mask must be bool [B, kv_len]");
    allowed = mask->data_ptr<bool>();
  }
  auto bf = [](const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); };
  for (int i = 0; i < 3; ++i) check(w[i].scalar_type() == at::kBFloat16 && w[i].is_contiguous(), "norms and router must be bf16");
  const Matrix Wq = weight_matrix(w[3], w[4]), Wk = weight_matrix(w[5], w[6]), Wv = weight_matrix(w[7], w[8]),
               Wo = weight_matrix(w[9], w[10]), Wr = make_matrix(kBf16, w[2], c10::nullopt, 0);
  check(Wq.K == H && Wq.N == Q * D && Wk.N == G * D && Wv.N == G * D && Wo.K == Q * D && Wo.N == H && Wr.K == H,
        "attention weights do not match the hidden size and heads");
  const uint16_t* xin = bf(x);

  // attention
  std::vector<uint16_t> h(B * H), q(B * Q * D), k(B * G * D), v(B * G * D), o(B * H);
  rms_norm(xin, B, H, bf(w[0]), float(eps), h.data());
  linears_into(h.data(), B, {Wq, Wk, Wv}, {q.data(), k.data(), v.data()});
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t first = (layer * k_all.size(1) + row0) * G * S * D;  // this layer's rows of the cache: [B, G, S, D]
  uint16_t* kc = static_cast<uint16_t*>(k_all.data_ptr()) + first;
  uint16_t* vc = static_cast<uint16_t*>(v_all.data_ptr()) + first;
  for (int64_t b = 0; b < B; ++b) {
    rope(q.data() + b * Q * D, Q, D, bf(cos) + b * D, bf(sin) + b * D, pairs);
    rope(k.data() + b * G * D, G, D, bf(cos) + b * D, bf(sin) + b * D, pairs);
    check(slot[b] >= 0 && slot[b] < S, "cache slot out of range");
    for (int64_t g = 0; g < G; ++g) {
      std::memcpy(kc + ((b * G + g) * S + slot[b]) * D, k.data() + (b * G + g) * D, D * 2);
      std::memcpy(vc + ((b * G + g) * S + slot[b]) * D, v.data() + (b * G + g) * D, D * 2);
    }
  }
  // attention in fp32 (model.one_token_attention's arithmetic; its sums in another order), one
  // task per (row, kv head) with its Q/G query heads; on one thread where all of it is less
  // than ~16k multiply-adds (a parallel region costs more than it saves there)
  const int64_t R = Q / G;  // query heads per kv head
  at::Tensor att = at::empty({B, Q * D}, x.options());
  uint16_t* attp = static_cast<uint16_t*>(att.data_ptr());
  const int64_t per_task = 2 * R * D * kv_len;
  at::parallel_for(0, B * G, B * G * per_task < 16384 ? B * G : 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> qf(R * D), scores(R * kv_len), out(R * D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / G, g = p % G;
      for (int64_t i = 0; i < R * D; ++i) qf[i] = bf16_to_f32(q[(b * Q + g * R) * D + i]);
      attend(qf.data(), R, kc + (b * G + g) * S * D, vc + (b * G + g) * S * D,
             allowed ? allowed + b * kv_len : nullptr, kv_len, D, scores.data(), out.data());
      for (int64_t i = 0; i < R * D; ++i) attp[(b * Q + g * R) * D + i] = f32_to_bf16(out[i]);
    }
  });
  linears_into(bf(att), B, {Wo}, {o.data()});
  at::Tensor x1 = at::empty({B, H}, x.options());
  uint16_t* x1p = static_cast<uint16_t*>(x1.data_ptr());
  for (int64_t i = 0; i < B * H; ++i) x1p[i] = f32_to_bf16(bf16_to_f32(xin[i]) + bf16_to_f32(o[i]));

  // experts
  at::Tensor hn = at::empty({B, H}, x.options());
  rms_norm(x1p, B, H, bf(w[1]), float(eps), static_cast<uint16_t*>(hn.data_ptr()));
  const int64_t E = Wr.N;
  check(topk >= 1 && topk <= E, "experts per token out of range");
  std::vector<uint16_t> logits(B * E);
  linears_into(bf(hn), B, {Wr}, {logits.data()});
  at::Tensor idx = at::empty({B, topk}, x.options().dtype(at::kLong));
  at::Tensor wts = at::empty({B, topk}, x.options().dtype(at::kFloat));
  std::vector<float> probs(E);
  std::vector<int64_t> order(E);
  for (int64_t b = 0; b < B; ++b) {  // softmax in fp32 (times the sum's reciprocal, as ATen's), top-k, renormalised
    float mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, bf16_to_f32(logits[b * E + e]));
    for (int64_t e = 0; e < E; ++e) sum += probs[e] = std::exp(bf16_to_f32(logits[b * E + e]) - mx);
    const float inv = 1.f / sum;
    for (int64_t e = 0; e < E; ++e) probs[e] *= inv;
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + topk, order.end(),
                      [&](int64_t a, int64_t c) { return probs[a] > probs[c] || (probs[a] == probs[c] && a < c); });
    float total = 0.f;
    for (int64_t j = 0; j < topk; ++j) total += probs[order[j]];
    for (int64_t j = 0; j < topk; ++j) {
      idx.data_ptr<int64_t>()[b * topk + j] = order[j];
      wts.data_ptr<float>()[b * topk + j] = probs[order[j]] / total;
    }
  }
  const Kind kind = kind_of(w[11], w[12]);
  check(kind_of(w[13], w[14]) == kind, "gate_up and down must be of one kind");
  auto scale = [&](int i) { return kind == kBf16 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(w[i]); };
  const at::Tensor y = moe(kind, hn, idx, wts, w[11], scale(12), w[13], scale(14), group_of(w[11], w[12]),
                           w[15].numel() > 0 ? w[15] : at::Tensor());
  const uint16_t* yp = bf(y);
  for (int64_t i = 0; i < B * H; ++i) x1p[i] = f32_to_bf16(bf16_to_f32(x1p[i]) + bf16_to_f32(yp[i]));
  return x1;
}

// RMSNorm of M rows as decode_layer computes it (the model's final norm in a decode step)
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 1,
        "rms_norm takes contiguous bf16 rows on the CPU");
  const int64_t H = x.size(-1);
  check(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == H,
        "rms_norm's weight must be bf16 [H]");
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0)
    rms_norm(static_cast<const uint16_t*>(x.data_ptr()), x.numel() / H, H,
             static_cast<const uint16_t*>(weight.data_ptr()), float(eps), static_cast<uint16_t*>(y.data_ptr()));
  return y;
}

// A decode step's layers one after another (weights: 16 per layer, meta: 6 per layer, as
// decode_layer takes them; eps: one per layer): one call from Python per step instead of one per
// layer, whose interpreter work between layers runs with caches the weights have just flushed.
at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> eps,
                         const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                         const at::Tensor& sin) {
  const int64_t L = int64_t(eps.size());
  check(int64_t(w.size()) == 16 * L && int64_t(meta.size()) == 6 * L, "decode_layers takes 16 weights and 6 sizes per layer");
  at::Tensor y = x;
  for (int64_t l = 0; l < L; ++l)
    y = decode_layer(y, w.slice(16 * l, 16), meta.slice(6 * l, 6), eps[l], k_all, v_all, slots, mask, kv_len, cos, sin);
  return y;
}

// Each row's greedy token: the first index of its largest logit, as torch's max(-1).indices gives
// it (-0 and +0 equal; a NaN is the largest, the first one wins). bf16 bits compared as integers
// ordered like the values (negatives' magnitudes negated), a loop the compiler vectorizes.
void greedy_tokens(const uint16_t* logits, int64_t B, int64_t V, int64_t* best) {
  auto key = [](uint16_t b) { return (b & 0x8000) ? -int32_t(b & 0x7fff) : int32_t(b); };
  for (int64_t r = 0; r < B; ++r) {
    const uint16_t* l = logits + r * V;
    int32_t top = INT32_MIN, nan = 0;
    for (int64_t i = 0; i < V; ++i) {
      top = std::max(top, key(l[i]));
      nan |= (l[i] & 0x7fff) > 0x7f80;
    }
    int64_t at = 0;
    if (nan)
      while ((l[at] & 0x7fff) <= 0x7f80) ++at;
    else
      while (key(l[at]) != top) ++at;
    best[r] = at;
  }
}

// A whole decode step after the cache's plan: the tokens' embedding rows, every layer (as
// decode_layers), the final RMSNorm (as rms_norm) and the head (as the head's linear op), each
// rounded where the modules round; returns the logits [B, V] bf16 and each row's greedy token [B].
// embed: (table, scale) as a linear's weight — bf16 [V, H], or GGML blocks [V, row bytes] with their
// type id (a GGUF file's token_embd used in place: the rows dequantized, then rounded to bf16, as
// GGMLEmbedding rounds them); norm [H] bf16; head: (weight, scale) of a bf16 / int8 / int4 / GGML linear.
std::tuple<at::Tensor, at::Tensor> decode_step(at::IntArrayRef tokens, const at::Tensor& embed,
                                               const at::Tensor& embed_scale, at::TensorList w,
                                               at::IntArrayRef meta, at::ArrayRef<double> eps,
                                               const at::Tensor& k_all, const at::Tensor& v_all,
                                               const at::Tensor& slots, const c10::optional<at::Tensor>& mask,
                                               int64_t kv_len, const at::Tensor& cos, const at::Tensor& sin,
                                               const at::Tensor& norm, double norm_eps, const at::Tensor& head,
                                               const at::Tensor& head_scale) {
  const int64_t B = int64_t(tokens.size());
  check(B >= 1 && embed.dim() == 2 && embed.is_contiguous() && embed.device().is_cpu() &&
            (embed.scalar_type() == at::kBFloat16 || kind_of(embed, embed_scale) == kGgml),
        "the embedding must be contiguous bf16 [V, H] or GGML blocks on the CPU");
  const Matrix We = weight_matrix(embed, embed_scale);
  const int64_t V = We.N, H = We.K;
  at::Tensor x = at::empty({B, H}, norm.options().dtype(at::kBFloat16));
  uint16_t* xs = static_cast<uint16_t*>(x.data_ptr());
  std::vector<float> row(We.kind == kBf16 ? 0 : H);
  for (int64_t b = 0; b < B; ++b) {
    check(tokens[b] >= 0 && tokens[b] < V, "token id outside the embedding");
    if (We.kind == kBf16) {
      std::memcpy(xs + b * H, static_cast<const uint16_t*>(We.w) + tokens[b] * H, H * 2);
    } else {
      dequantize_rows(We, tokens[b], tokens[b] + 1, row.data());
      for (int64_t i = 0; i < H; ++i) xs[b * H + i] = f32_to_bf16(row[i]);
    }
  }
  const at::Tensor y = decode_layers(x, w, meta, eps, k_all, v_all, slots, mask, kv_len, cos, sin);
  const at::Tensor h = rms_norm_op(y, norm, norm_eps);
  const Matrix Wh = weight_matrix(head, head_scale);
  check(Wh.K == H, "the head's input size must be the hidden size");
  at::Tensor logits = at::empty({B, Wh.N}, norm.options().dtype(at::kBFloat16));
  linears_into(static_cast<const uint16_t*>(h.data_ptr()), B, {Wh}, {static_cast<uint16_t*>(logits.data_ptr())});
  at::Tensor best = at::empty({B}, norm.options().dtype(at::kLong));
  greedy_tokens(static_cast<const uint16_t*>(logits.data_ptr()), B, Wh.N, best.data_ptr<int64_t>());
  return {logits, best};
}

}  // namespace
