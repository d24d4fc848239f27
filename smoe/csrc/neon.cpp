// The inner loops for aarch64 NEON with the dot-product extension (vdotq_s32: Armv8.2 and later —
// Apple M1 on, Graviton 2 on, Ampere Altra, Cortex-A76 on), chosen where the kernel reports
// HWCAP_ASIMDDP. bf16: weights widened to fp32 (a shift of the 16 bits) and vfmaq; int8 and
// int4: signed x signed 4-byte dot products into int32 lanes per block of 32 columns, the block
// sum times its scale d_b (and the group scale) in fp32. Activation quantization, SiLU·up and
// attention are portable.cpp's. Built by the aarch64 cross compiler and tested under qemu
// (`make neon-selftest`, selftest.cpp) where no ARM machine is at hand.

#include "isa.h"

#if defined(__aarch64__)

#include <arm_neon.h>
#include <sys/auxv.h>

#include "rows.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

namespace {

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
namespace neon {

inline void widen8_bf16(const uint16_t* p, float32x4_t& lo, float32x4_t& hi) {  // 8 bf16 -> 2 x 4 fp32
  const uint16x8_t v = vld1q_u16(p);
  lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
  hi = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
}

struct Rows {  // the row kernels, for rows.h's matvec_rows (what each computes: rows.h), one weight row a call
  static constexpr int kWeightRows = 1;

  // 8 columns a step in two accumulators of 4 lanes (x zero padded to 16: full loads)
  template <int MR, int NR>
  __attribute__((noinline)) static void bf16(const float* const* x, const uint16_t* w, int64_t, int64_t K, float* res) {
    static_assert(NR == 1, "one weight row a call");
    float32x4_t a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = a1[m] = vdupq_n_f32(0.f);
    auto step = [&](int64_t k, const uint16_t* wk) __attribute__((always_inline)) {
      float32x4_t w0, w1;
      widen8_bf16(wk, w0, w1);
      for (int m = 0; m < MR; ++m) {
        a0[m] = vfmaq_f32(a0[m], vld1q_f32(x[m] + k), w0);
        a1[m] = vfmaq_f32(a1[m], vld1q_f32(x[m] + k + 4), w1);
      }
    };
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) step(k, w + k);
    if (k < K) {  // the last columns from a zero-padded copy: no read past the row
      uint16_t tail[8] = {};
      std::memcpy(tail, w + k, (K - k) * sizeof(uint16_t));
      step(k, tail);
    }
    for (int m = 0; m < MR; ++m) res[m] = vaddvq_f32(vaddq_f32(a0[m], a1[m]));
  }

  template <int MR, int NR>
  __attribute__((noinline)) static void q8(const int8_t* const* xq, const float* const* sv, const int8_t* w, int64_t,
                                           int64_t K, float* res) {
    static_assert(NR == 1, "one weight row a call");
    float32x4_t a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = a1[m] = vdupq_n_f32(0.f);
    auto step = [&](int64_t b, const int8_t* wb, float32x4_t* a) __attribute__((always_inline)) {
      const int8x16_t w0 = vld1q_s8(wb), w1 = vld1q_s8(wb + 16);
      for (int m = 0; m < MR; ++m) {
        const int8_t* x = xq[m] + b * kQBlock;
        const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(x)), w1, vld1q_s8(x + 16));
        a[m] = vfmaq_n_f32(a[m], vcvtq_f32_s32(d), block_scale(sv[m], kQ8, b));
      }
    };
    const int64_t full = K / kQBlock;
    int64_t b = 0;
    for (; b + 2 <= full; b += 2) {
      step(b, w + b * kQBlock, a0);
      step(b + 1, w + (b + 1) * kQBlock, a1);
    }
    if (b < full) {
      step(b, w + b * kQBlock, a0);
      ++b;
    }
    if (K % kQBlock != 0) {  // the activations are zero padded; the weights from a zero-padded copy
      int8_t tail[kQBlock] = {};
      std::memcpy(tail, w + full * kQBlock, K % kQBlock);
      step(full, tail, (full & 1) ? a1 : a0);
    }
    for (int m = 0; m < MR; ++m) res[m] = vaddvq_f32(vaddq_f32(a0[m], a1[m]));
  }

  // per block of 32 columns (16 code bytes): low nibbles with the block's first 16 activations,
  // high nibbles with its last 16 (QRows' order: step b / 4, at 16 (b % 4) and 64 + 16 (b % 4))
  template <int MR, int NR>
  __attribute__((noinline)) static void q4(const int8_t* const* xq, const float* const* sv, const float* const* xs,
                                           const uint8_t* codes, int64_t, const uint16_t* sm, int64_t, int64_t K,
                                           int64_t G, float* res) {
    static_assert(NR == 1, "one weight row a call");
    float32x4_t a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) a0[m] = a1[m] = vdupq_n_f32(0.f);
    const uint8x16_t low = vdupq_n_u8(0x0F);
    const int64_t nb = K / kQBlock, ng = K / G;
    const int gshift = __builtin_ctzll(uint64_t(G));  // G is a power of two (make_matrix): no division per step
    auto step = [&](int64_t b, float32x4_t* a) __attribute__((always_inline)) {
      const uint8x16_t v = vld1q_u8(codes + b * 16);
      const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
      const float s = bf16_to_f32(sm[(b * kQBlock) >> gshift]);
      const int64_t at = (b / 4) * 128 + (b % 4) * 16;
      for (int m = 0; m < MR; ++m) {
        const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(xq[m] + at)), hi, vld1q_s8(xq[m] + at + 64));
        a[m] = vfmaq_n_f32(a[m], vcvtq_f32_s32(d), block_scale(sv[m], kQ4, b) * s);
      }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      step(b, a0);
      step(b + 1, a1);
    }
    if (b < nb) step(b, a0);
    for (int m = 0; m < MR; ++m) {
      float offsets = 0.f;
      for (int64_t g = 0; g < ng; ++g) offsets += bf16_to_f32(sm[ng + g]) * xs[m][g];
      res[m] = vaddvq_f32(vaddq_f32(a0[m], a1[m])) + offsets;
    }
  }
};

void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
            int64_t ldo) {
  matvec_rows<Rows>(a, rows, M, W, n0, n1, out, ldo);
}

// GGML blocks: portable's integer sums, compiled here for NEON with the dot-product extension
using portable::kdot;
using portable::ldot;
using portable::mdot;
#include "ggml_rows.h"

bool supported() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }

const Loops loops = {"neon", supported, matvec, portable::quantize_row,
                     portable::silu_mul, portable::attend, portable::dequantize_rows, ggml_matvec, ggml_dequantize};

}  // namespace neon
#pragma GCC pop_options

}  // namespace

#endif  // __aarch64__
