// The inner loops in plain C++, for every CPU (isa.h declares what each computes): the variant
// the others are tested against in selftest.cpp, and what runs where no other does (an x86-64
// without AVX2, an ARM without the dot-product extension, any other architecture). The sums run
// in arrays of 16 lanes that the compiler turns into whatever vectors the target has.

#include "isa.h"

namespace {
namespace portable {

constexpr int kLanes = 16;

inline float sum_lanes(const float* acc) {  // a fixed tree: the same for every row
  float t[kLanes];
  std::memcpy(t, acc, sizeof(t));
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

// sum_k x[k] * w[k], bf16 inputs, fp32 lanes
float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += bf16_to_f32(x[k + l]) * bf16_to_f32(w[k + l]);
  for (int l = 0; k + l < K; ++l) acc[l] += bf16_to_f32(x[k + l]) * bf16_to_f32(w[k + l]);
  return sum_lanes(acc);
}

// exact sum of n products of int8 codes
inline int32_t dot_i8(const int8_t* a, const int8_t* b, int n) {
  int32_t s = 0;
  for (int j = 0; j < n; ++j) s += int32_t(a[j]) * int32_t(b[j]);
  return s;
}

inline int32_t dot_u4(const uint8_t* codes16, const int8_t* lo, const int8_t* hi) {  // one block of 32 columns
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) s += int32_t(codes16[j] & 0x0F) * lo[j] + int32_t(codes16[j] >> 4) * hi[j];
  return s;
}

// q8 row: scale[n] * sum_b d_b * sum_{k in b} qx[k] * qw[k]
float dot_q8(const int8_t* xq, const float* sv, const int8_t* w, int64_t K) {
  float acc[2] = {0.f, 0.f};
  const int64_t nb = (K + kQBlock - 1) / kQBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int n = int(std::min<int64_t>(kQBlock, K - b * kQBlock));
    acc[b & 1] += float(dot_i8(xq + b * kQBlock, w + b * kQBlock, n)) * block_scale(sv, kQ8, b);
  }
  return acc[0] + acc[1];
}

// q4 row: sum_b d_b * s_g(b) * sum codes * qx + sum_g m_g * xs_g
float dot_q4(const int8_t* xq, const float* sv, const float* xs, const uint8_t* codes, const uint16_t* sm, int64_t K,
             int64_t G) {
  float acc[2] = {0.f, 0.f};
  const int64_t nb = K / kQBlock, ng = K / G;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t step = b / 4, j = b % 4;
    const int8_t* x = xq + step * 128 + j * 16;
    const int32_t s = dot_u4(codes + b * 16, x, x + 64);
    acc[b & 1] += float(s) * (block_scale(sv, kQ4, b) * bf16_to_f32(sm[b * kQBlock / G]));
  }
  float offsets = 0.f;
  for (int64_t g = 0; g < ng; ++g) offsets += bf16_to_f32(sm[ng + g]) * xs[g];
  return (acc[0] + acc[1]) + offsets;
}

void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
            int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rows[i];
      float y;
      if (W.kind == kBf16) {
        y = dot_bf16(a.bf[r], static_cast<const uint16_t*>(W.w) + n * W.K, W.K);
      } else {
        const QRows& q = *a.q;
        const int8_t* xq = q.q.data() + r * q.Kp;
        const float* sv = q.sv.data() + r * (q.Kp / chunk_of(W.kind)) * 16;
        if (W.kind == kQ8)
          y = W.scale[n] * dot_q8(xq, sv, static_cast<const int8_t*>(W.w) + n * W.K, W.K);
        else
          y = dot_q4(xq, sv, q.gs.data() + r * q.ng, static_cast<const uint8_t*>(W.w) + n * (W.K / 2),
                     W.sm + n * 2 * (W.K / W.G), W.K, W.G);
      }
      out[i * ldo + (n - n0)] = y;
    }
}

void quantize_row(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs) {
  const int64_t step = chunk_of(kind), Kp = (K + step - 1) / step * step, nblocks = Kp / kQBlock;
  std::vector<float> d(nblocks), sum(nblocks);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t k0 = b * kQBlock, n = std::max<int64_t>(0, std::min<int64_t>(kQBlock, K - k0));
    float v[kQBlock] = {}, amax = 0.f;
    for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(v[j] = bf16_to_f32(x[k0 + j])));
    const float scale = amax / 127.f;
    int8_t codes[kQBlock] = {};
    int32_t total = 0;
    if (scale > 0.f)
      for (int j = 0; j < kQBlock; ++j) {
        codes[j] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(v[j] / scale))));
        total += codes[j];
      }
    d[b] = scale;
    sum[b] = float(total);
    const int64_t c = k0 / step, j = k0 % step;  // the step, and the block's first column in it
    int8_t* first = q + c * step + (kind == kQ4 ? (j / kQBlock) * 16 : j);
    int8_t* second = kind == kQ4 ? first + 64 : first + 16;
    std::memcpy(first, codes, 16);
    std::memcpy(second, codes + 16, 16);
  }
  row_scales_and_sums(kind, K, Kp, G, d.data(), sum.data(), sv, gs);
}

void silu_mul(const float* g, const float* up, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = round_bf16(g[i]);
    const float silu = round_bf16(gv / (1.f + std::exp(-gv)));
    out[i] = f32_to_bf16(silu * round_bf16(up[i]));
  }
}

void attend(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed, int64_t n,
            int64_t D, float* scores, float* out) {
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<float> key(D);
  for (int64_t s = 0; s < n; ++s) {
    const bool live = allowed == nullptr || allowed[s];
    for (int64_t d = 0; d < D && live; ++d) key[d] = bf16_to_f32(keys[s * D + d]);
    for (int64_t r = 0; r < R; ++r) {
      if (!live) {
        scores[r * n + s] = -INFINITY;
        continue;
      }
      float acc[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += q[r * D + d + l] * key[d + l];
      for (int l = 0; d + l < D; ++l) acc[l] += q[r * D + d + l] * key[d + l];
      scores[r * n + s] = sum_lanes(acc) * scale;
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax (masked keys: -inf -> 0)
    float* p = scores + r * n;
    float top = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < n; ++s) top = std::max(top, p[s]);
    for (int64_t s = 0; s < n; ++s) sum += p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - top);
    const float inv = 1.f / sum;
    for (int64_t s = 0; s < n; ++s) p[s] *= inv;
  }
  std::fill(out, out + R * D, 0.f);
  std::vector<float> value(D);
  for (int64_t s = 0; s < n; ++s) {
    if (allowed != nullptr && !allowed[s]) continue;
    for (int64_t d = 0; d < D; ++d) value[d] = bf16_to_f32(values[s * D + d]);
    for (int64_t r = 0; r < R; ++r) {
      const float p = scores[r * n + s];
      for (int64_t d = 0; d < D; ++d) out[r * D + d] += p * value[d];
    }
  }
}

// rows [n0, n1) of W into out [n1 - n0, K] fp32 (w = bf16 value | q · scale | code · s + m)
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

// GGML blocks (ggml_rows.h): the integer sums as plain loops
inline int32_t kdot(const uint8_t* u, const int8_t* q, const int16_t* sc) {
  int32_t total = 0;
  for (int j = 0; j < 16; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += int32_t(u[16 * j + i]) * q[16 * j + i];
    total += sc[j] * s;
  }
  return total;
}

inline int32_t mdot(const int16_t* m, const int16_t* bsums) {
  int32_t total = 0;
  for (int j = 0; j < 16; ++j) total += int32_t(m[j]) * bsums[j];
  return total;
}

inline int32_t ldot(const int8_t* w, const int8_t* q) { return dot_i8(w, q, 32); }

#include "ggml_rows.h"

bool supported() { return true; }

const Loops loops = {"portable", supported, matvec, quantize_row, silu_mul, attend, dequantize_rows, ggml_matvec,
                     ggml_dequantize};

}  // namespace portable

}  // namespace
