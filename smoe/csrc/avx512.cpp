// The inner loops for AVX-512 (F, BW, VL, DQ) with BF16 dot products (vdpbf16ps) and VNNI
// integer dot products (vpdpbusd): the matrix-vector products of every format, activation
// quantization, SiLU·up and attention (kernels.h declares them). Compiled for those
// instructions function by function (the target pragma) and called only where
// supported() said the CPU has them.

#include "isa.h"

#if defined(__x86_64__)

#include <immintrin.h>

namespace {
namespace avx512 {

// ------------------------------------------------------------------------------ AVX-512 kernels

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")

// Horizontal sums of accumulators, several at once: each vector is summed by the same tree
// (halves, then pairs of pairs) whether it is reduced alone or with 3 or 7 others, so a row's
// result does not depend on how many rows its tile had (batch invariance).
inline __m256 half_sum(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {  // lanes 0..3: the sums of a, b, c, d
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half_sum(a), half_sum(b)), _mm256_hadd_ps(half_sum(c), half_sum(d)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <int N>
inline void reduce(const __m512* acc, float* out) {
  int r = 0;
  for (; r + 4 <= N; r += 4) _mm_storeu_ps(out + r, sum4(acc[r], acc[r + 1], acc[r + 2], acc[r + 3]));
  for (; r < N; ++r) out[r] = _mm_cvtss_f32(sum4(acc[r], acc[r], acc[r], acc[r]));
}

// exp for 16 lanes: n = round(x·log2 e), r = x − n·ln 2 (two-part ln 2), a degree-6 polynomial
// (Cephes' expf coefficients, ~1 ulp), scaled by 2^n (scalef gives inf and 0 beyond the range)
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 round16_bf16(__m512 x) {  // to bf16 and back, round to nearest even
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// out[i] = bf16(bf16(silu(bf16(g[i]))) * bf16(up[i])): F.silu(gate) * up on bf16 tensors
void silu_mul(const float* g, const float* up, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = round16_bf16(_mm512_maskz_loadu_ps(m, g + i)), uv = round16_bf16(_mm512_maskz_loadu_ps(m, up + i));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 silu = round16_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
    _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, uv)));
  }
}

// Activations to int8 in blocks of 32: d_b = max|x_b| / 127, q = round-half-even(x / d_b) (a true
// division, as Python's reference divides), laid out in the kernel's column order (q4: the first
// 16 of a block in the step's low half, the next 16 in its high half).
void quantize_row(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs) {
  const int64_t kChunk = chunk_of(kind), Kp = (K + kChunk - 1) / kChunk * kChunk, nblocks = Kp / kQBlock;
  float d[nblocks > 0 ? nblocks : 1], sum[nblocks > 0 ? nblocks : 1];
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t k0 = b * kQBlock, n = std::max<int64_t>(0, std::min<int64_t>(kQBlock, K - k0));
    const __mmask16 m0 = __mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1), m1 = __mmask16(n >= 32 ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0);
    auto load = [&](int64_t k, __mmask16 m) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + k)), 16));
    };
    const __m512 v0 = load(k0, m0), v1 = load(k0 + 16, m1);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const float scale = amax / 127.f;
    __m512i q0 = _mm512_setzero_si512(), q1 = q0;
    if (scale > 0.f) {
      const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
      auto code = [&](__m512 v) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));
      };
      q0 = code(v0);
      q1 = code(v1);
    }
    d[b] = scale;
    sum[b] = float(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    const int64_t chunk = k0 / kChunk, j = k0 % kChunk;
    int8_t* first = q + chunk * kChunk + (kind == kQ4 ? (j / kQBlock) * 16 : j);
    int8_t* second = kind == kQ4 ? first + 64 : first + 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(first), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(second), _mm512_cvtepi32_epi8(q1));
  }
  row_scales_and_sums(kind, K, Kp, G, d, sum, sv, gs);
}

// The dot products below read ONE weight row at a time for up to 4 token rows (MR): each thread
// then streams one contiguous run of memory, which the hardware prefetchers follow best.
// Measured on Zen 4 (2 threads, weights from memory): one row at a time 33-36 GB/s, tiles of 8
// interleaved rows 26-30, 2 rows 20-21, with or without software prefetch. Consecutive column
// chunks alternate between two accumulators (chunk c -> c % 2) so two chains of dependent
// dot-product instructions are in flight; the two are summed, then reduced by `reduce`'s tree.
// That order is the same for every MR, so a row's result does not depend on its batch.
// The loops run over whole chunks with plain loads; only the last, partial chunk is masked.
// With one token row, `dot_rows` takes NR consecutive weight rows (still one run of memory) and
// reduces their accumulators together: one horizontal sum for 4 rows instead of 4 (by the same
// tree, so the result is the row's own).

// The column loop of every row kernel: step(c, a, last) for the whole chunks c = 0 .. full - 1,
// alternating between the accumulators a0 and a1 (chunk c -> c % 2, one order for every MR), then
// once with last = true for the partial chunk if there is one. Every call names a0 or a1: an
// accumulator picked by index (acc[c & 1]) made GCC keep both on the stack, stored every step.
template <class Step>
__attribute__((always_inline)) inline void alternate_chunks(int64_t full, bool partial, __m512* a0, __m512* a1,
                                                            const Step& step) {
  int64_t c = 0;
  for (; c + 2 <= full; c += 2) {
    step(c, a0, false);
    step(c + 1, a1, false);
  }
  if (c < full) step(c++, a0, false);
  if (partial) {
    if (c & 1) step(c, a1, true);
    else step(c, a0, true);
  }
}

// The int8 and int4 kernels ask for their weights 2 KiB ahead into every cache level
// (_MM_HINT_T0). Measured in whole decode steps on an Intel Xeon (SPR class, 2 threads): int4
// 52 -> 90 tok/s and int8 57 -> 63 on the benchmark checkpoint; the non-temporal hint this kernel
// had before (+6 % on Zen 4 against none) fills only L1 there. The bf16 kernel streams with
// less work per byte, where the hardware prefetchers keep up alone: a prefetch cost it 8 %.
constexpr int64_t kPrefetch = 2048;

// acc[m] += the products of weight row w with token rows x[m], bf16 inputs, fp32 accumulation
template <int MR>
__attribute__((noinline)) void row_bf16(const uint16_t* const* x, const uint16_t* w, int64_t K, __m512* res) {
  __m512 acc[2][MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  const __mmask32 tail = _cvtu32_mask32((1u << (K % 32)) - 1u);
  alternate_chunks(K / 32, K % 32 != 0, acc[0], acc[1], [&](int64_t c, __m512* a, bool last) __attribute__((always_inline)) {
    const int64_t k = c * 32;  // 32 columns
    const __mmask32 mask = last ? tail : __mmask32(0xFFFFFFFFu);
    const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < MR; ++m)
      a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x[m] + k), (__m512bh)wv);
  });
  for (int m = 0; m < MR; ++m) res[m] = _mm512_add_ps(acc[0][m], acc[1][m]);
}

// res[m] = the lanes of sum_b d_b * sum_{k in b} qx[k] * (qw[k] + 128)   (the caller removes the +128)
template <int MR>
__attribute__((noinline)) void row_q8(const int8_t* const* xq, const float* const* sv, const int8_t* w, int64_t K, __m512* res) {
  __m512 acc[2][MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __mmask64 tail = _cvtu64_mask64((uint64_t(1) << (K % 64)) - 1);
  alternate_chunks(K / 64, K % 64 != 0, acc[0], acc[1], [&](int64_t c, __m512* a, bool last) __attribute__((always_inline)) {
    const int64_t k = c * 64;  // 64 columns
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(last ? tail : ~__mmask64(0), w + k), flip);
    for (int m = 0; m < MR; ++m) {
      const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq[m] + k));
      a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sv[m] + c * 16), a[m]);
    }
  });
  for (int m = 0; m < MR; ++m) res[m] = _mm512_add_ps(acc[0][m], acc[1][m]);
}



// res[m] = the lanes of sum_g (s[g] * sum_{b in g} d_b * sum_{k in b} qx[k] * code[k] + m[g] * sum_{b in g} d_b * sum qx)
// scale_index: 32 words; word 2i + 1 is the group (from the step's first) of lane i's block.
// The offsets' part is one short dot product per row after the codes' (xs: the activations'
// per-group sums), not a multiply-add per step.
template <int MR>
__attribute__((noinline)) void row_q4(const int8_t* const* xq, const float* const* sv, const float* const* xs, const uint8_t* codes,
                   const uint16_t* sm, int64_t K, int64_t G, __m512i sidx, __m512* res) {
  __m512 acc[2][MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t ng = K / G, full = K / 128;
  const int gshift = __builtin_ctzll(uint64_t(G));  // G is a power of two (make_matrix)
  const __mmask8 full_groups = __mmask8((1u << std::min<int64_t>(4, 128 >> std::min(gshift, 7))) - 1);
  // the last, partial step holds whole blocks of 32: its bytes and its groups' scales masked
  const int64_t tail_blocks = (K % 128) / kQBlock;
  const __mmask64 tail_bytes = _cvtu64_mask64((uint64_t(1) << (16 * tail_blocks)) - 1);
  const __mmask8 tail_groups = __mmask8((1u << std::min<int64_t>(4, (tail_blocks * kQBlock + G - 1) >> gshift)) - 1);
  alternate_chunks(full, K % 128 != 0, acc[0], acc[1], [&](int64_t c, __m512* a, bool last) __attribute__((always_inline)) {
    const int64_t k = c * 128;  // 128 columns: 64 bytes, 4 blocks
    _mm_prefetch(reinterpret_cast<const char*>(codes + c * 64) + kPrefetch, _MM_HINT_T0);
    const __m512i v = _mm512_maskz_loadu_epi8(last ? tail_bytes : ~__mmask64(0), codes + c * 64);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    const __m128i s = _mm_maskz_loadu_epi16(last ? tail_groups : full_groups, sm + (k >> gshift));  // up to 4 scales
    const __m512 ws = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, sidx, _mm512_castsi128_si512(s)));
    for (int m = 0; m < MR; ++m) {
      const __m512i xlo = _mm512_loadu_si512(xq[m] + k), xhi = _mm512_loadu_si512(xq[m] + k + 64);
      const __m512 d = _mm512_loadu_ps(sv[m] + c * 16);
      const __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
      a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(d, ws), a[m]);
    }
  });
  for (int m = 0; m < MR; ++m) {
    __m512 offsets = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16) {
      const __m512 mv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(sm + ng + g))), 16));
      offsets = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xs[m] + g), offsets);
    }
    if (g < ng) {
      const __mmask16 mask = __mmask16((1u << (ng - g)) - 1);
      const __m512 mv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, sm + ng + g)), 16));
      offsets = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, xs[m] + g), offsets);
    }
    res[m] = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), offsets);
  }
}

// One group of up to 4 activation rows, as the dot products read them (set up once per matvec call).
struct RowGroup {
  int64_t mr = 0;
  const int64_t* rows = nullptr;
  const uint16_t* x[4] = {};  // bf16
  const int8_t* xq[4] = {};   // quantized: codes, per-lane block scales, per-group sums (q4) or the q8 correction
  const float* sv[4] = {};
  const float* xs[4] = {};
};

// out[r * MR + m] = weight row n + r times token row m of the group, for r < NR
template <int MR, int NR>
void dot_rows(const RowGroup& g, const Matrix& W, int64_t n, __m512i sidx, float* out) {
  __m512 res[NR * MR];
  for (int r = 0; r < NR; ++r) {
    if (W.kind == kBf16)
      row_bf16<MR>(g.x, static_cast<const uint16_t*>(W.w) + (n + r) * W.K, W.K, res + r * MR);
    else if (W.kind == kQ8)
      row_q8<MR>(g.xq, g.sv, static_cast<const int8_t*>(W.w) + (n + r) * W.K, W.K, res + r * MR);
    else
      row_q4<MR>(g.xq, g.sv, g.xs, static_cast<const uint8_t*>(W.w) + (n + r) * (W.K / 2),
                 W.sm + (n + r) * 2 * (W.K / W.G), W.K, W.G, sidx, res + r * MR);
  }
  reduce<NR * MR>(res, out);
  if (W.kind == kQ8)
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) out[r * MR + m] = W.scale[n + r] * (out[r * MR + m] - g.xs[m][0]);
}

// out[i * ldo + (n - n0)] = row rows[i] of the activations times weight row n, for n in [n0, n1):
// weight row by weight row, each for the token rows in groups of up to 4
void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
            int64_t ldo) {
  const int64_t ngroups = (M + 3) / 4;
  RowGroup small[4];  // up to 16 rows without an allocation
  std::vector<RowGroup> more(ngroups > 4 ? ngroups : 0);
  RowGroup* groups = ngroups > 4 ? more.data() : small;
  for (int64_t i = 0; i < ngroups; ++i) {
    RowGroup& g = groups[i];
    g.mr = std::min<int64_t>(4, M - 4 * i);
    g.rows = rows + 4 * i;
    for (int64_t m = 0; m < g.mr; ++m) {
      const int64_t r = g.rows[m];
      if (W.kind == kBf16) {
        g.x[m] = a.bf[r];
        continue;
      }
      const QRows& q = *a.q;
      g.xq[m] = q.q.data() + r * q.Kp;
      g.sv[m] = q.sv.data() + r * (q.Kp / chunk_of(W.kind)) * 16;
      g.xs[m] = q.gs.data() + r * q.ng;
    }
  }
  uint16_t scale_index[32] = {};  // q4: lane i's group within a step (see row_q4)
  if (W.kind == kQ4)
    for (int lane = 0; lane < 16; ++lane) scale_index[2 * lane + 1] = uint16_t((lane / 4) * kQBlock / W.G);
  const __m512i sidx = _mm512_loadu_si512(scale_index);
  float buf[4];
  int64_t n = n0;
  if (M == 1)  // one token row: 4 weight rows per call
    for (; n + 4 <= n1; n += 4) {
      dot_rows<1, 4>(groups[0], W, n, sidx, buf);
      for (int r = 0; r < 4; ++r) out[n - n0 + r] = buf[r];
    }
  for (; n < n1; ++n)
    for (int64_t i = 0; i < ngroups; ++i) {
      const RowGroup& g = groups[i];
      switch (g.mr) {
        case 1: dot_rows<1, 1>(g, W, n, sidx, buf); break;
        case 2: dot_rows<2, 1>(g, W, n, sidx, buf); break;
        case 3: dot_rows<3, 1>(g, W, n, sidx, buf); break;
        default: dot_rows<4, 1>(g, W, n, sidx, buf);
      }
      for (int64_t m = 0; m < g.mr; ++m) out[(4 * i + m) * ldo + (n - n0)] = buf[m];
    }
}

// ------------------------------------------------------------------------------ GGML blocks (ggml_rows.h)

#define SMOE_OWN_KDOT 1  // ggml_avx2.h: this variant's kdot_chunks and kdot are the 512-bit ones below
#include "ggml_avx2.h"

// a 32-value block's signed values times 32 activation codes: 8 int32 lanes summing to Σ w·q
inline __m256i signed_dot(__m256i mag, __m256i w, __m256i q) {  // mag = |w|
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), mag, _mm256_sign_epi8(q, w));
}
inline __m256i block_dot(__m256i w, __m256i q) { return signed_dot(_mm256_sign_epi8(w, w), w, q); }

// a block unpacked into memory (batches: one unpacking for every row)
inline int32_t ldot(const int8_t* w, const int8_t* q) {
  return hsum_i32(block_dot(load32(reinterpret_cast<const uint8_t*>(w)), load32(reinterpret_cast<const uint8_t*>(q))));
}

// This variant's K-quant superblock dot (ggml_rows.h's row_k_one and row_k call it; ggml_avx2.h's
// 256-bit kdot_chunks is the AVX2 variants'), with 512-bit VNNI: chunks 2i and 2i + 1 (64 codes,
// unsigned) in one register, vpdpbusd against their 64 activation codes (16 int32 lanes of 4
// products), each lane times its 16-value sub-block's scale (lane l of step i: sub-block 4i + l / 4)
// and summed in int32 — the integer the 256-bit form's int16 pairs give, exactly (|Σ| < 2^31). On
// AMD Zen 5 the 256-bit form held batch-1 decode of a Q4_K_M file at 0.90x llama.cpp's AVX-512 build.
template <class C>
inline int32_t kdot_chunks(const C& chunks, const int8_t* q, const int16_t* sc, const int16_t* m = nullptr,
                           const int16_t* bsums = nullptr) {
  const __m512i scales = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
  __m512i acc = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(chunks.at(2 * i)), chunks.at(2 * i + 1), 1);
    const int g = 4 * i;
    const __m512i s = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1, g + 2, g + 2, g + 2, g + 2, g + 3, g + 3, g + 3, g + 3),
        scales);
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(q + 64 * i));
    acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(p, s));
  }
  const int32_t total = _mm512_reduce_add_epi32(acc);
  return m != nullptr ? total - mdot(m, bsums) : total;
}

// the same sums over a block unpacked into memory (batches: one unpacking for every row)
inline int32_t kdot(const uint8_t* u, const int8_t* q, const int16_t* sc) { return kdot_chunks(Stored{u}, q, sc); }

// A K-quant superblock dequantized from its codes in registers (Chunks: no store of the codes, no
// scalar unpacking — ggml_rows.h's dequantize_type takes it for the K-quants): per 16 values j,
// a = D·sc_j, then a·(u − off), or a·u − Dm·m_j — the scalar form's IEEE operations lane by lane, so
// gguf's values bit for bit. Prefill on AVX-512 CPUs dequantizes every expert's rows once a prompt
// chunk; with the scalar unpacking Q3_K's took ~1/3 of a Q3_K_M prompt's time on Zen 5.
#define SMOE_GGML_DEQUANT512 1
template <int T>
inline void dequantize_k512(const uint8_t* b, float* out) {
  KBlock k;
  Chunks<T>::scales(b, k);
  const Chunks<T> chunks{b};
  for (int c = 0; c < 8; ++c) {
    const __m256i codes = chunks.at(c);
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * c + h;
      const __m128i u8 = h == 0 ? _mm256_castsi256_si128(codes) : _mm256_extracti128_si256(codes, 1);
      const __m512i u = _mm512_cvtepu8_epi32(u8);
      const __m512 a = _mm512_set1_ps(k.D * float(k.sc[j]));
      __m512 v;
      if (k.off)
        v = _mm512_mul_ps(a, _mm512_cvtepi32_ps(_mm512_sub_epi32(u, _mm512_set1_epi32(k.off))));
      else
        v = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_cvtepi32_ps(u)), _mm512_set1_ps(k.Dm * float(k.m[j])));
      _mm512_storeu_ps(out + 16 * j, v);
    }
  }
}

// Q4_0 / Q4_1 rows 8 blocks a step with 512-bit VNNI (ggml_rows.h's row_l_fused takes its steps from
// here): two blocks' 4-bit codes, unsigned (0..15), in one register — each block's 16 bytes
// broadcast into two 128-bit lanes, the second lane's words shifted right by 4 (the high nibbles,
// values 16..31), masked to 4 bits — times the activation codes by vpdpbusd (unsigned × signed:
// no sign tricks), each block's sum, then Q4_0's offset taken out as 8·Σq (ActRows.n0): the very
// integer sums of the 256-bit form (signed_dot on n − 8), so the fp32 steps after them, the same
// as row_l_fused's, give the same bits. On AMD Zen 5 the 256-bit form held batch-1 decode of a
// Q4_0 file at 0.69x llama.cpp's AVX-512 build.
#define SMOE_GGML_NIBBLES 1
template <int T>
int64_t nibble_steps(const uint8_t* w, int64_t K, const ActRows& a, const int64_t* rows, int64_t M, float (*acc)[8]) {
  constexpr int64_t bytes = block_format(T).bytes, codes = T == kQ4_0 ? 2 : 4;
  constexpr bool with_min = T == kQ4_1;
  const int64_t nb = K / 32;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m256 acc0 = _mm256_load_ps(acc[0]);
  int64_t bi = 0;
  for (; bi + 8 <= nb; bi += 8) {
    const uint8_t* b = w + bi * bytes;
    prefetch_span(b, 8 * bytes);
    __m512i v[4];  // blocks 2j and 2j + 1: [low nibbles, high nibbles] of each
    for (int j = 0; j < 4; ++j) {
      const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 * j * bytes + codes));
      const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (2 * j + 1) * bytes + codes));
      const __m512i z = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(first), 0xFF00, second);
      v[j] = _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xFF00FF00u, z, 4), low4);
    }
    const __m256 D = halves8(b, bytes);
    const __m256 Mn = with_min ? halves8(b + 2, bytes) : _mm256_setzero_ps();
    auto term = [&](int64_t r) __attribute__((always_inline)) {  // row r's 8 block terms of this step
      const int8_t* q = a.q0.data() + r * K + bi * 32;
      __m256i p[8];
      for (int j = 0; j < 4; ++j) {
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[j], _mm512_loadu_si512(q + 64 * j));
        p[2 * j] = _mm512_castsi512_si256(s), p[2 * j + 1] = _mm512_extracti64x4_epi64(s, 1);
      }
      __m256i isum = sums8(p);
      if (T == kQ4_0)
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.n0.data() + r * nb + bi)), 3));
      __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.d0.data() + r * nb + bi), D), _mm256_cvtepi32_ps(isum));
      if (with_min) t = _mm256_add_ps(t, _mm256_mul_ps(Mn, _mm256_loadu_ps(a.s0.data() + r * nb + bi)));
      return t;
    };
    if (M == 1) {  // (a decode step's one row: its accumulator stays in a register)
      acc0 = _mm256_add_ps(acc0, term(rows[0]));
      continue;
    }
    for (int64_t i = 0; i < M; ++i) _mm256_store_ps(acc[i], _mm256_add_ps(_mm256_load_ps(acc[i]), term(rows[i])));
  }
  if (M == 1) _mm256_store_ps(acc[0], acc0);
  return bi;
}

#include "ggml_rows.h"

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")

inline __m512 load_bf16_as_f32(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// Attention of R query rows (fp32, [R, D]) over n keys/values (bf16 rows of D, `allowed` or all),
// out [R, D] fp32. scores: scratch of R * n floats.
void attend(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed, int64_t n,
            int64_t D, float* scores, float* out) {
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t chunks = (D + 15) / 16;
  auto mask_of = [&](int64_t c) { return __mmask16(c * 16 + 16 <= D ? 0xFFFF : (1u << (D - c * 16)) - 1); };
  // scores, 4 query rows at a time: each key is read once for them and their 4 sums reduced together
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, R - r0);
    for (int64_t s = 0; s < n; ++s) {
      if (allowed != nullptr && !allowed[s]) {
        for (int64_t r = 0; r < nr; ++r) scores[(r0 + r) * n + s] = -INFINITY;
        continue;
      }
      const uint16_t* k = keys + s * D;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask16 m = mask_of(c);
        const __m512 kv = load_bf16_as_f32(k + c * 16, m);
        for (int64_t r = 0; r < nr; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + (r0 + r) * D + c * 16), kv, acc[r]);
      }
      float t[4];
      _mm_storeu_ps(t, sum4(acc[0], acc[1], acc[2], acc[3]));
      for (int64_t r = 0; r < nr; ++r) scores[(r0 + r) * n + s] = t[r] * scale;
    }
  }
  // softmax of each row, 16 scores at a time (masked-out keys: -inf -> 0)
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = 0; r < R; ++r) {
    float* p = scores + r * n;
    __m512 mx = minus_inf;
    for (int64_t s = 0; s < n; s += 16) {
      const __mmask16 m = n - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - s)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(minus_inf, m, p + s));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
      const __mmask16 m = n - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - s)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, p + s);
      const __mmask16 live = _mm512_mask_cmp_ps_mask(m, v, minus_inf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_maskz_sub_ps(live, v, top)));
      _mm512_mask_storeu_ps(p + s, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t s = 0; s < n; s += 16) {
      const __mmask16 m = n - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - s)) - 1);
      _mm512_mask_storeu_ps(p + s, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + s), inv));
    }
  }
  // out = p·v: per 16 columns and 4 query rows, the sum over the keys in registers
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t nr = std::min<int64_t>(4, R - r0);
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 m = mask_of(c);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t s = 0; s < n; ++s) {
        if (allowed != nullptr && !allowed[s]) continue;
        const __m512 vv = load_bf16_as_f32(values + s * D + c * 16, m);
        for (int64_t r = 0; r < nr; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(r0 + r) * n + s]), vv, acc[r]);
      }
      for (int64_t r = 0; r < nr; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * D + c * 16, m, acc[r]);
    }
  }
}

#pragma GCC pop_options

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c");
}

const Loops loops = {"avx512", supported, matvec, quantize_row, silu_mul, attend, portable::dequantize_rows, ggml_matvec,
                     ggml_dequantize};

}  // namespace avx512
}  // namespace

#endif  // __x86_64__
