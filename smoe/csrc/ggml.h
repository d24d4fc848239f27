// GGML's block formats (llama.cpp's GGUF files) as the kernels read them, torch-free: the block
// layouts (smoe/ggml.py's table), the activation rows quantized as llama.cpp quantizes them, each
// block unpacked into one common form, and the dequantization prefill widens rows with. The row
// products are ggml_rows.h's, compiled once per variant (included inside each variant's target
// pragma); everything here is scalar and the same in every variant.
//
// Activations (ActRows, quantized once per call for every GGML matrix of it):
//   Q8_K (for the K-quants): per 256 values d = max / -127 where max is the value of the largest
//        magnitude, q = nearest(x / d) (at most 127), and each 16 values' code sum (bsums):
//        llama.cpp's quantize_row_q8_K.
//   Q8_0 (for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL): per 32 values d = max|x| / 127 rounded to
//        fp16, q = round(x · (1/d)) half away from zero, and s = fp16(d · sum q) (Q8_1's, which the
//        types with a min read): llama.cpp's quantize_row_q8_0 / q8_1.
//
// Every block unpacks into unsigned codes with integer scales and mins (K-quants, per 16 values)
// or into signed codes (the 32-value types), so a product is exact integer sums per block and a
// few fp32 operations after them, in the same order in every variant: every variant gives the
// same bits.
//
//   K-quant superblock (256 values): value_i = D·sc_j·u_i − Dm·m_j (j = i / 16)
//     Q2_K  u 0..3,  sc 4 bits, m 4 bits, D = d, Dm = dmin
//     Q3_K  u 0..7 (2 bits + the hmask bit), sc 6 bits − 32, m = 4·sc, Dm = D   (u − 4)
//     Q4_K  u 0..15, sc and m 6 bits (per 32 values), D = d, Dm = dmin
//     Q5_K  u 0..31 (4 bits + qh), as Q4_K
//     Q6_K  u 0..63, sc int8, m = 32·sc, Dm = D                              (u − 32)
//   with Q8_K row r: sum_i value_i · x_i = d_x · (D · Σ_j sc_j Σ_{i∈j} u_i q_i − Dm · Σ_j m_j bsum_j)
//
//   32-value block: value_i = D · w_i (+ M): w = code − 8 (Q4_0), code − 16 (Q5_0), q (Q8_0),
//     table[code] (IQ4_NL), code with a min M (Q4_1, Q5_1)
//   with Q8_0 row r: d_x · D · Σ w_i q_i (+ M · s_x)

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// GGML's type ids (ggml.h's enum ggml_type), as GGUF files and smoe/ggml.py name them
enum GgmlType {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13,
  kQ6_K = 14, kIQ4_NL = 20,
};

struct BlockFormat {
  int64_t elems, bytes;
};

// values and bytes per block; {0, 0} for a type the kernels do not read
constexpr BlockFormat block_format(int type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kIQ4_NL: return {32, 18};
    case kQ2_K: return {256, 84};
    case kQ3_K: return {256, 110};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

constexpr bool is_k_quant(int type) { return block_format(type).elems == 256; }

inline float fp16_to_f32(uint16_t h) {  // exact, and no arithmetic on subnormal floats (a microcode assist each)
  const uint32_t e = (h >> 10) & 0x1f, man = h & 0x3ff;
  float f;
  if (e == 0) {
    f = float(man) * 5.9604644775390625e-08f;  // man · 2^-24: normal in fp32
  } else {
    const uint32_t u = (e == 31 ? 0x7f800000u : (e + 112) << 23) | man << 13;
    std::memcpy(&f, &u, 4);
  }
  return (h & 0x8000) ? -f : f;
}

inline float round_fp16(float f) {  // to the nearest fp16 (ties to even), back to fp32; finite inputs below 65520
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
  float mag;
  std::memcpy(&mag, &a, 4);
  float r;
  if (mag < 6.103515625e-05f) {  // fp16 subnormals: multiples of 2^-24
    r = std::nearbyint(mag * 16777216.f) / 16777216.f;
  } else {  // keep 10 mantissa bits
    uint32_t v = a + 0xfffu + ((a >> 13) & 1u);
    v &= 0xffffe000u;
    std::memcpy(&r, &v, 4);
  }
  uint32_t out;
  std::memcpy(&out, &r, 4);
  out |= sign;
  std::memcpy(&r, &out, 4);
  return r;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}

// ------------------------------------------------------------------------------ activations

struct ActRows {  // R rows of K activations, quantized as the call's types need (quantize_act_rows)
  int64_t K = 0;
  bool has_k = false;
  std::vector<int8_t> qk;   // [R, K] Q8_K codes
  std::vector<float> dk;    // [R, K / 256]
  std::vector<int16_t> bs;  // [R, K / 16] code sums of each 16
  std::vector<int8_t> q0;   // [R, K] Q8_0 codes
  std::vector<float> d0;    // [R, K / 32] scales (fp16 values)
  std::vector<float> s0;    // [R, K / 32] fp16(d · sum q)
  std::vector<int32_t> n0;  // [R, K / 32] sum q (Q4_0's offset of 8 taken out of unsigned products)
};

// Rounding without a library call (the library is built for plain x86-64: std::nearbyint and
// std::round are calls there, ~7 ns a value): adding and subtracting 1.5 · 2^23 rounds a float of
// magnitude below 2^22 to an integer, ties to even (llama.cpp's nearest_int does the same)
inline float round_even(float v) { return (v + 12582912.f) - 12582912.f; }

inline float round_away(float v) {  // roundf: ties away from zero; no branch (the signs are random)
  const float a = std::fabs(v);
  const float r = round_even(a);
  return std::copysign(r + float(a - r == 0.5f), v);  // + 1 where the even rounding took a tie down
}

inline void quantize_q8_k(const float* x, int64_t K, int8_t* q, float* d, int16_t* bsums) {
  for (int64_t b = 0; b < K / 256; ++b) {
    const float* v = x + b * 256;
    float amax = 0.f;  // the largest magnitude, then the first value that has it (llama.cpp's `max`)
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::fabs(v[j]));
    int at = 0;
    while (at < 255 && std::fabs(v[at]) != amax) ++at;
    const float max = v[at];
    int8_t* c = q + b * 256;
    if (amax == 0.f) {
      d[b] = 0.f;
      std::memset(c, 0, 256);
    } else {
      const float iscale = -127.f / max;
      for (int j = 0; j < 256; ++j) c[j] = int8_t(std::min(127.f, round_even(iscale * v[j])));
      d[b] = 1.f / iscale;
    }
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += c[16 * j + i];
      bsums[b * 16 + j] = int16_t(s);
    }
  }
}

inline void quantize_q8_0(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* n) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += q[b * 32 + j] = int8_t(round_away(v[j] * id));
    d[b] = round_fp16(dd);
    s[b] = round_fp16(float(sum) * dd);
    n[b] = sum;
  }
}

// Which quantizations of the activations a GGML type's products read (a Matrix's G for kGgml; the
// matrices of one call or layer OR them): Q8_K for the K-quants, Q8_0 for the 32-value types
enum ActFormats { kActQ8_0 = 1, kActQ8_K = 2 };
constexpr int64_t act_formats(int type) { return is_k_quant(type) ? kActQ8_K : kActQ8_0; }

inline float act_value(uint16_t v) { return bf16_to_f32(v); }
inline float act_value(float v) { return v; }

// R rows of K activations (bf16, or fp32 as llama.cpp keeps them) -> out, in the quantizations
// `formats` names (Q8_K only where K % 256 == 0)
template <typename T>
inline void quantize_act_rows(const T* x, int64_t R, int64_t K, int64_t formats, ActRows& out) {
  out.K = K;
  out.has_k = (formats & kActQ8_K) && K % 256 == 0;
  const bool has_0 = formats & kActQ8_0;
  if (has_0) {
    out.q0.resize(R * K);
    out.d0.resize(R * (K / 32));
    out.s0.resize(R * (K / 32));
    out.n0.resize(R * (K / 32));
  }
  if (out.has_k) {
    out.qk.resize(R * K);
    out.dk.resize(R * (K / 256));
    out.bs.resize(R * (K / 16));
  }
  std::vector<float> row(K);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < K; ++k) row[k] = act_value(x[r * K + k]);
    if (has_0)
      quantize_q8_0(row.data(), K, out.q0.data() + r * K, out.d0.data() + r * (K / 32), out.s0.data() + r * (K / 32),
                    out.n0.data() + r * (K / 32));
    if (out.has_k)
      quantize_q8_k(row.data(), K, out.qk.data() + r * K, out.dk.data() + r * (K / 256), out.bs.data() + r * (K / 16));
  }
}

constexpr int64_t kGgmlPrefetch = 2048;  // bytes ahead of the weight blocks a row product reads

inline void prefetch_span(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + kGgmlPrefetch + o, 0, 3);
}

struct KBlock {  // a K-quant superblock unpacked: value_i = D·sc_j·u_i − Dm·m_j, j = i / 16 (off: m = off·sc, Dm = D)
  alignas(64) uint8_t u[256];
  alignas(32) int16_t sc[16];
  alignas(32) int16_t m[16];
  float D, Dm;
  int off;
};

struct LBlock {  // a 32-value block unpacked: value_i = D·w_i (+ M)
  alignas(32) int8_t w[32];
  float D, M;
};

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes (smoe/ggml.py) -> bytes 0-7 the
// scales, 8-15 the mins, by 32-bit word operations on the three words w0, w1, w2:
//   scale j < 4: w0's bytes & 63          scale j >= 4: w2's low nibbles | (w0's top 2 bits) << 4
//   min j < 4:   w1's bytes & 63          min j >= 4:   w2's high nibbles | (w1's top 2 bits) << 4
inline void k_scales_mins_bytes(const uint8_t* s, uint8_t* out) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t six = 0x3f3f3f3fu, four = 0x0f0f0f0fu, two = 0x03030303u;
  const uint32_t r[4] = {w[0] & six, (w[2] & four) | (((w[0] >> 6) & two) << 4), w[1] & six,
                         ((w[2] >> 4) & four) | (((w[1] >> 6) & two) << 4)};
  std::memcpy(out, r, 16);
}

// ... each for its 32 values: per 16 values in the unpacked block
inline void k_scales_mins(const uint8_t* s, KBlock& o) {
  uint8_t b[16];
  k_scales_mins_bytes(s, b);
  for (int j = 0; j < 16; ++j) o.sc[j] = b[j / 2], o.m[j] = b[8 + j / 2];
}

}  // namespace
