// What the kernel families share: argument checks, weight matrices as the
// kernels read them, activation rows prepared once per call.

#include "kernels.h"

namespace {

// ------------------------------------------------------------------------------ checks

void check(bool ok, const char* what) { TORCH_CHECK(ok, "smoe native kernels: ", what); }

void check_acts(const at::Tensor& x, int64_t K) {
  check(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "activations must be bf16 on the CPU");
  check(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "activations must be contiguous [M, K]");
}

Matrix make_matrix(Kind kind, const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t G,
                   int64_t e) {
  // w: [N, K] (or [E, N, K] with expert e); for q4 w is [.., N, K/2] and scale holds sm [.., N, 2, K/G]
  const bool stacked = e >= 0;
  check(w.is_contiguous() && w.device().is_cpu() && w.dim() == (stacked ? 3 : 2), "weights must be contiguous");
  const int64_t N = w.size(-2);
  Matrix m{kind, N, 0, nullptr, nullptr, nullptr, G};
  const int64_t per_expert = stacked ? w.stride(0) : 0;
  if (kind == kGgml) {  // scale: the GGML type ids (int32; the first is this matrix's)
    check(w.scalar_type() == at::kByte && scale.has_value() && scale->scalar_type() == at::kInt &&
              scale->numel() >= 1 && scale->is_contiguous(), "GGML blocks (uint8) with their int32 type expected");
    return ggml_matrix(w, scale->data_ptr<int32_t>()[0], e);
  }
  if (kind == kBf16) {
    check(w.scalar_type() == at::kBFloat16, "bf16 weights expected");
    m.K = w.size(-1);
    m.w = static_cast<const uint16_t*>(w.data_ptr()) + (stacked ? e * per_expert : 0);
  } else if (kind == kQ8) {
    check(w.scalar_type() == at::kChar && scale->scalar_type() == at::kFloat && scale->is_contiguous(),
          "int8 weights with fp32 scales expected");
    m.K = w.size(-1);
    m.w = static_cast<const int8_t*>(w.data_ptr()) + (stacked ? e * per_expert : 0);
    m.scale = scale->data_ptr<float>() + (stacked ? e * N : 0);
  } else {
    check(w.scalar_type() == at::kByte && scale->scalar_type() == at::kBFloat16 && scale->is_contiguous(),
          "int4 codes (uint8) with bf16 scales expected");
    m.K = 2 * w.size(-1);
    check(G >= kQBlock && (G & (G - 1)) == 0 && m.K % G == 0 && scale->size(-1) == m.K / G,
          "int4 group size must be a power of two of at least 32 and divide K");
    m.w = static_cast<const uint8_t*>(w.data_ptr()) + (stacked ? e * per_expert : 0);
    m.sm = static_cast<const uint16_t*>(scale->data_ptr()) + (stacked ? e * scale->stride(0) : 0);
  }
  return m;
}

// GGML blocks [N, row bytes] (or [E, N, row bytes] with expert e) of GGML type `type`
Matrix ggml_matrix(const at::Tensor& blocks, int type, int64_t e) {
  const bool stacked = e >= 0;
  check(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.device().is_cpu() &&
            blocks.dim() == (stacked ? 3 : 2), "GGML blocks must be contiguous uint8 [(E,) N, row bytes] on the CPU");
  const BlockFormat f = block_format(type);
  check(f.elems > 0, "a GGML type the kernels do not read");
  const int64_t row_bytes = blocks.size(-1);
  check(row_bytes % f.bytes == 0, "GGML rows must be whole blocks");
  Matrix m{kGgml, blocks.size(-2), row_bytes / f.bytes * f.elems, nullptr, nullptr, nullptr, 0};
  m.gtype = type;
  m.G = act_formats(type);  // the activations it reads (ggml.h)
  m.row_bytes = row_bytes;
  m.w = static_cast<const uint8_t*>(blocks.data_ptr()) + (stacked ? e * blocks.stride(0) : 0);
  return m;
}

Acts prepare(Kind kind, const uint16_t* x, int64_t M, int64_t K, int64_t G, QRows& storage) {
  Acts a{kind, {}, nullptr};
  if (kind == kBf16) {
    for (int64_t i = 0; i < M; ++i) a.bf.push_back(x + i * K);
    return a;
  }
  quantize_rows(x, M, K, kind, G, storage);
  a.q = &storage;
  return a;
}

int64_t tiles_grain(int64_t rows_per_tile_work) {
  // at least ~16k multiply-adds per task, so tiny matrices do not pay for the thread pool
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, rows_per_tile_work));
}

// A linear's weight as the kernels read it: bf16 [N, K] (no scale), int8 [N, K] with fp32 scales,
// or int4 bytes [N, K/2] with sm [N, 2, K/G]; stacked [E, ...] with expert e.
// GGML blocks are uint8 with int32 type ids where int4 codes have bf16 scales and offsets.
Kind kind_of(const at::Tensor& w, const at::Tensor& scale) {
  if (w.scalar_type() == at::kBFloat16) return kBf16;
  if (w.scalar_type() == at::kChar) return kQ8;
  check(w.scalar_type() == at::kByte, "weights must be bf16, int8, int4 bytes or GGML blocks");
  return scale.defined() && scale.scalar_type() == at::kInt ? kGgml : kQ4;
}

int64_t group_of(const at::Tensor& w, const at::Tensor& scale) {
  return kind_of(w, scale) == kQ4 ? 2 * w.size(-1) / scale.size(-1) : 0;
}

Matrix weight_matrix(const at::Tensor& w, const at::Tensor& scale) {
  const Kind kind = kind_of(w, scale);
  return make_matrix(kind, w, kind == kBf16 ? c10::nullopt : c10::optional<at::Tensor>(scale), group_of(w, scale));
}

}  // namespace
