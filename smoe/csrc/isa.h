// What smoe's inner loops share, without torch: the weight and activation formats as the kernels
// read them, bf16 scalars, and the instruction-set variants of the four inner loops with the one
// in use. kernels.h (the torch side) includes it; selftest.cpp (built alone, also for aarch64 and
// run under qemu) includes it without torch.
//
// Variants, best first; each is the same five loops (matvec, quantize_row, silu_mul, attend,
// dequantize_rows) for
// one instruction set, in a file of its own:
//
//   avx512     avx512.cpp   AVX-512 F/BW/VL/DQ with BF16 (vdpbf16ps) and VNNI (vpdpbusd) dot products
//   avx2-vnni  avx2.h       AVX2 + FMA + F16C with AVX-VNNI (vpdpbusd on 256 bits: Alder Lake, Zen 5)
//   avx2       avx2.h       AVX2 + FMA + F16C: bf16 widened to fp32 and FMA; int8 products by
//                           maddubs/madd (llama.cpp's way without VNNI)
//   neon       neon.cpp     aarch64 NEON with the dot-product extension (vdotq_s32)
//   portable   portable.cpp plain C++ that every CPU runs (the compiler vectorizes what it can)
//
// The best one the CPU runs is chosen when the library loads; `select_variant` forces another
// (Python: SMOE_ISA=portable|avx2|avx2-vnni|avx512|neon, smoe/kernels/ops.py), so one machine
// tests every variant it can run. Every variant reads the same layouts below and computes the
// same integer block sums; only the order of their fp32 sums differs, so results agree to a
// few ulp of fp32 (tests/test_native.py compares each against PyTorch).
//
// Shapes: M token rows, K inputs, N outputs; G an int4 group's columns.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// ------------------------------------------------------------------------------ scalars

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch rounds
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

}  // namespace

#include "ggml.h"  // GGML's block formats (kind kGgml): their activations and unpacking

namespace {

// ------------------------------------------------------------------------------ formats
//
// bf16: weight rows [N, K] bf16 as stored; activations bf16.
// q8:   weight rows [N, K] int8 (w = q * scale[n]); activations quantized to int8 in blocks of
//       32 (x = q * d_b). Every variant sums each block's products exactly in int32, then
//       multiplies by d_b in fp32 (AVX-512 flips each weight byte's sign bit, q + 128, to use the
//       unsigned x signed VNNI product and subtracts 128 * sum(q_x) once per row; AVX2 and NEON
//       multiply |w| by x with w's sign).
// q4:   weight rows [N, K/2] bytes, each block of 32 columns as 16 bytes holding column j in
//       the low nibble and column j + 16 in the high nibble (codes 0..15); per group of G
//       columns a scale s and an offset m (bf16, [N, 2, K/G]): w = code * s + m.
//       E.g. a block's columns 0..31 with codes c0..c31 are the bytes c0|c16<<4, c1|c17<<4, ...
//
// Activations in the kernels' column order (QRows): a step of 64 columns (q8) or 128 (q4: 64
// code bytes, 4 blocks); within a q4 step the low halves (16 columns) of its 4 blocks come first,
// then their high halves, the order the nibbles come out of 64 bytes, so the weights are never
// shuffled. Per step 16 floats `sv`: 32-bit lane i's block scale (q8: block i / 8 of the step,
// q4: block i / 4), the layout AVX-512 multiplies by; narrower variants read the same floats.

constexpr int kQBlock = 32;  // activation quantization block

inline int64_t chunk_of(int kind) { return kind == 2 ? 128 : 64; }  // columns per step: q4 128, q8 64

enum Kind { kBf16 = 0, kQ8 = 1, kQ4 = 2, kGgml = 3 };  // kGgml: a GGML block format (ggml.h)

struct QRows {  // R rows of K activations quantized to int8 in blocks of 32
  int64_t K = 0, Kp = 0, G = 0, ng = 0;  // Kp: K rounded up to a step; ng: floats of `gs` per row
  std::vector<int8_t> q;                 // [R, Kp] in the kernel's column order, zero padded
  std::vector<float> sv;                 // [R, Kp/step, 16]: each 32-bit lane's block scale
  std::vector<float> gs;                 // q8: [R, 1] 128 * sum_b d_b * sum(q_b); q4: [R, K/G] per group
                                         // sum_{b in g} d_b * sum(q_b), what the group offsets multiply
  ActRows blocks;                        // kGgml: the rows as llama.cpp quantizes them (ggml.h)
};

// block b's scale d_b in a row's `sv` (q8: lane 8 (b % 2) of step b / 2; q4: lane 4 (b % 4) of step b / 4)
inline float block_scale(const float* sv, Kind kind, int64_t b) {
  return kind == kQ4 ? sv[(b / 4) * 16 + (b % 4) * 4] : sv[(b / 2) * 16 + (b % 2) * 8];
}

// The end of every variant's quantize_row: a row's block scales d[b] and code sums sum[b] (b <
// Kp / 32) -> its per-lane scales `sv` and its sums `gs` (q8: 128 · sum_b d_b · sum_b, the AVX-512
// kernel's correction; q4: per group sum_{b in g} d_b · sum_b, what the group offsets multiply).
inline void row_scales_and_sums(Kind kind, int64_t K, int64_t Kp, int64_t G, const float* d, const float* sum,
                                float* sv, float* gs) {
  const int64_t step = chunk_of(kind), nblocks = Kp / kQBlock;
  for (int64_t c = 0; c < Kp / step; ++c)
    for (int lane = 0; lane < 16; ++lane) sv[c * 16 + lane] = kind == kQ4 ? d[4 * c + lane / 4] : d[2 * c + lane / 8];
  if (kind == kQ8) {
    double c = 0;
    for (int64_t b = 0; b < nblocks; ++b) c += double(d[b]) * sum[b];
    gs[0] = float(128.0 * c);
  } else {
    const int64_t per_group = G / kQBlock;
    for (int64_t g = 0; g < K / G; ++g) {
      float t = 0.f;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) t += d[b] * sum[b];
      gs[g] = t;
    }
  }
}

// One weight matrix of one expert (or a plain linear), as the kernels read it.
struct Matrix {
  Kind kind;
  int64_t N, K;
  const void* w;             // bf16 [N, K] | int8 [N, K] | uint8 [N, K/2]
  const float* scale;        // q8: [N]
  const uint16_t* sm;        // q4: [N, 2, K/G] bf16 (s, then m)
  int64_t G;                 // q4 group; kGgml: the activation formats it reads (ggml.h act_formats)
  int gtype = 0;             // kGgml: the GGML type (ggml.h), w its blocks, rows row_bytes apart
  int64_t row_bytes = 0;
};

// Activation rows as the kernels read them: bf16 rows, or quantized rows.
struct Acts {
  Kind kind;
  std::vector<const uint16_t*> bf;  // bf16 row pointers
  const QRows* q = nullptr;
};

// ------------------------------------------------------------------------------ the inner loops
//
// Each variant defines, in its own namespace:
//
// matvec: out[i * ldo + (n - n0)] = row rows[i] of the activations times weight row n, for n in
//   [n0, n1); a row's result does not depend on which other rows share the call (batch invariance).
// quantize_row: one row of K bf16 activations -> its codes, per-lane block scales and group sums
//   in QRows' layout: d_b = max|x_b| / 127, q = round-half-even(x / d_b), a true division.
// silu_mul: out[i] = bf16(bf16(silu(bf16(g[i]))) * bf16(up[i])), F.silu(gate) * up on bf16 tensors.
// attend: attention of R query rows (fp32, [R, D]) over n keys/values (bf16 rows of D, `allowed`
//   or all), out [R, D] fp32; scores: scratch of R * n floats.
// dequantize_rows: weight rows [n0, n1) into out [n1 - n0, K] fp32, bit for bit the same in every
//   variant (code · s + m: a product, then a sum; prefill.cpp's GEMMs read them).

struct Loops {
  const char* name;
  bool (*supported)();  // whether this CPU runs it (asked once, at load)
  void (*matvec)(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1,
                 float* out, int64_t ldo);
  void (*quantize_row)(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs);
  void (*silu_mul)(const float* g, const float* up, int64_t n, uint16_t* out);
  void (*attend)(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed,
                 int64_t n, int64_t D, float* scores, float* out);
  void (*dequantize_rows)(const Matrix& W, int64_t n0, int64_t n1, float* out);
  void (*ggml_matvec)(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1,
                      float* out, int64_t ldo);  // matvec for kGgml (ggml_rows.h)
  void (*ggml_dequantize)(int type, const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1,
                          float* out);  // dequantize_rows for kGgml: gguf's values, the same bits everywhere
};

// the variants compiled into this library, best first (variants.cpp), and the one in use
const std::vector<const Loops*>& compiled_variants();
const Loops*& active_loops();
bool select_variant(const char* name);  // false: unknown here, or this CPU cannot run it

// The families call the active variant's loops by these names.
inline void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1,
                   float* out, int64_t ldo) {
  if (W.kind == kGgml)
    active_loops()->ggml_matvec(a, rows, M, W, n0, n1, out, ldo);
  else
    active_loops()->matvec(a, rows, M, W, n0, n1, out, ldo);
}
inline void quantize_row(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs) {
  active_loops()->quantize_row(x, K, kind, G, q, sv, gs);
}
inline void silu_mul(const float* g, const float* up, int64_t n, uint16_t* out) {
  active_loops()->silu_mul(g, up, n, out);
}
inline void dequantize_rows(const Matrix& W, int64_t n0, int64_t n1, float* out) {
  if (W.kind == kGgml)
    active_loops()->ggml_dequantize(W.gtype, static_cast<const uint8_t*>(W.w), W.row_bytes, W.K, n0, n1, out);
  else
    active_loops()->dequantize_rows(W, n0, n1, out);
}
inline void attend(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed,
                   int64_t n, int64_t D, float* scores, float* out) {
  active_loops()->attend(q, R, keys, values, allowed, n, D, scores, out);
}

// R rows of K bf16 activations, one after another, into `out` (variants.cpp)
void quantize_rows(const uint16_t* x, int64_t R, int64_t K, Kind kind, int64_t G, QRows& out);

}  // namespace
