// smoe's native CPU kernels: matrix-vector products for decode (a few token rows) in bf16,
// int8 and int4, and the fused MoE decode op that runs all chosen experts of a layer in one
// call. Registered as torch.library ops (namespace smoe); their fake implementations and the
// Python side are in smoe/native.py; docs/KERNELS.md explains the layouts and the numbers.
//
// Instruction sets: the kernels use AVX-512 (F, BW, VL, DQ) with BF16 dot products
// (vdpbf16ps) and VNNI integer dot products (vpdpbusd). They are compiled for those
// instructions function by function (the pragma below) and called only after the CPU was
// asked at run time (`supported()`); the rest of the file is plain x86-64, so the library
// loads on any CPU and Python falls back to PyTorch's kernels when `supported()` is false.
//
// Threads: output rows are split with at::parallel_for, torch's own pool.
//
// Shapes: M token rows, K inputs, N outputs; E experts, T tokens, F expert hidden, H hidden.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

// ------------------------------------------------------------------------------ formats
//
// bf16: weight rows [N, K] bf16 as stored; activations bf16.
// q8:   weight rows [N, K] int8 (w = q * scale[n]); activations quantized to int8 in blocks of
//       32 (x = q * d_b). The kernel flips each weight byte's sign bit (q + 128, unsigned) to
//       use the unsigned x signed VNNI product and subtracts 128 * sum(q_x) once per row.
// q4:   weight rows [N, K/2] bytes, each block of 32 columns as 16 bytes holding column j in
//       the low nibble and column j + 16 in the high nibble (codes 0..15); per group of G
//       columns a scale s and an offset m (bf16, [N, 2, K/G]): w = code * s + m. A step reads
//       128 columns (64 bytes, 4 blocks): the low nibbles are one vector, the high nibbles
//       another, and in both 32-bit lane i belongs to block i / 4, so one integer sum per lane
//       serves both and one float multiply-add per step applies the block and group scales.
//       The activations are quantized in the order the nibbles come out, so the weights are
//       never shuffled.

constexpr int kQBlock = 32;  // activation quantization block

inline int64_t chunk_of(int kind) { return kind == 2 ? 128 : 64; }  // columns per vector step: q4 128, q8 64

enum Kind { kBf16 = 0, kQ8 = 1, kQ4 = 2 };

struct QRows {  // R rows of K activations quantized to int8 in blocks of 32
  int64_t K = 0, Kp = 0, G = 0, ng = 0;  // Kp: K rounded up to a step; ng: floats of `gs` per row
  std::vector<int8_t> q;                 // [R, Kp] in the kernel's column order, zero padded
  std::vector<float> sv;                 // [R, Kp/step, 16]: each 32-bit lane's block scale
  std::vector<float> gs;                 // q8: [R, 1] 128 * sum_b d_b * sum(q_b); q4: [R, K/G] per group
                                         // sum_{b in g} d_b * sum(q_b), what the group offsets multiply
};

// one row of K bf16 activations -> its codes, per-lane block scales and sums (defined below, AVX-512)
void quantize_row(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs);

// R rows of K bf16 activations, one after another
void quantize_rows(const uint16_t* x, int64_t R, int64_t K, Kind kind, int64_t G, QRows& out) {
  const int64_t kChunk = chunk_of(kind);
  out.K = K;
  out.Kp = (K + kChunk - 1) / kChunk * kChunk;
  out.G = G;
  out.ng = kind == kQ8 ? 1 : K / G;
  out.q.assign(R * out.Kp, 0);
  out.sv.assign(R * (out.Kp / kChunk) * 16, 0.f);
  out.gs.assign(R * out.ng, 0.f);
  for (int64_t r = 0; r < R; ++r)
    quantize_row(x + r * K, K, kind, G, out.q.data() + r * out.Kp, out.sv.data() + r * (out.Kp / kChunk) * 16,
                 out.gs.data() + r * out.ng);
}

// One weight matrix of one expert (or a plain linear), as the kernels read it.
struct Matrix {
  Kind kind;
  int64_t N, K;
  const void* w;             // bf16 [N, K] | int8 [N, K] | uint8 [N, K/2]
  const float* scale;        // q8: [N]
  const uint16_t* sm;        // q4: [N, 2, K/G] bf16 (s, then m)
  int64_t G;                 // q4 group
};

// Activation rows as the kernels read them: bf16 rows, or quantized rows.
struct Acts {
  Kind kind;
  std::vector<const uint16_t*> bf;  // bf16 row pointers
  const QRows* q = nullptr;
};

// ------------------------------------------------------------------------------ AVX-512 kernels

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma")

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
  for (int64_t c = 0; c < Kp / kChunk; ++c)
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
    const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(last ? tail : ~__mmask64(0), w + k), flip);
    for (int m = 0; m < MR; ++m) {
      const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq[m] + k));
      a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sv[m] + c * 16), a[m]);
    }
  });
  for (int m = 0; m < MR; ++m) res[m] = _mm512_add_ps(acc[0][m], acc[1][m]);
}

// The int4 kernel asks for its codes 2 KiB ahead with a non-temporal hint: measured in whole
// decode steps on Zen 4 (variants switched every 8 steps in one process), +2 to +11 %, ~+6 % on
// average; the same prefetch in the bf16 and int8 kernels cost 7-20 % (they stream with less
// work per byte, where the hardware prefetchers keep up alone), so they have none.
constexpr int64_t kQ4Prefetch = 2048;

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
    _mm_prefetch(reinterpret_cast<const char*>(codes + c * 64) + kQ4Prefetch, _MM_HINT_NTA);
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

#pragma GCC pop_options


// ------------------------------------------------------------------------------ checks

void check(bool ok, const char* what) { TORCH_CHECK(ok, "smoe native kernels: ", what); }

void check_acts(const at::Tensor& x, int64_t K) {
  check(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "activations must be bf16 on the CPU");
  check(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "activations must be contiguous [M, K]");
}

Matrix make_matrix(Kind kind, const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t G,
                   int64_t e = -1) {
  // w: [N, K] (or [E, N, K] with expert e); for q4 w is [.., N, K/2] and scale holds sm [.., N, 2, K/G]
  const bool stacked = e >= 0;
  check(w.is_contiguous() && w.device().is_cpu() && w.dim() == (stacked ? 3 : 2), "weights must be contiguous");
  const int64_t N = w.size(-2);
  Matrix m{kind, N, 0, nullptr, nullptr, nullptr, G};
  const int64_t per_expert = stacked ? w.stride(0) : 0;
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

// ------------------------------------------------------------------------------ linear

// y_i [M, N_i] = x [M, K] · W_iᵀ rounded to bf16, for every matrix i (all with the same K): the
// activations prepared once per kind (quantized once for all int8 matrices, once for all int4),
// and one split of all the matrices' row tiles across the threads.
void linears_into(const uint16_t* x, int64_t M, const std::vector<Matrix>& Ws, const std::vector<uint16_t*>& ys) {
  const int64_t K = Ws[0].K;
  QRows storage[3];
  Acts acts[3];
  bool ready[3] = {false, false, false};
  for (const Matrix& W : Ws) {
    check(W.K == K, "matrices of one call must share their input size");
    // int4 activations carry per-group sums: every int4 matrix of the call must share its group
    check(!ready[W.kind] || W.kind != kQ4 || storage[kQ4].G == W.G, "int4 matrices of one call must share a group size");
    if (!ready[W.kind]) acts[W.kind] = prepare(W.kind, x, M, K, W.G, storage[W.kind]);
    ready[W.kind] = true;
  }
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
               const c10::optional<at::Tensor>& down_scale, int64_t G) {
  check(expert_indices.scalar_type() == at::kLong && expert_weights.scalar_type() == at::kFloat,
        "expert_indices int64 and expert_weights fp32 expected");
  check(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0), "stacked [E, out, in] weights expected");
  const int64_t T = x.size(0), topk = expert_indices.size(1), E = gate_up.size(0);
  const Matrix gu0 = make_matrix(kind, gate_up, gate_up_scale, G, 0);
  const Matrix dn0 = make_matrix(kind, down, down_scale, G, 0);
  const int64_t H = gu0.K, F2 = gu0.N, F = F2 / 2;
  check(dn0.N == H && dn0.K == F && F2 % 2 == 0, "gate_up [E, 2F, H] and down [E, H, F] expected");
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
  std::vector<Matrix> gu, dn;
  for (int64_t e : chosen) {
    gu.push_back(make_matrix(kind, gate_up, gate_up_scale, G, e));
    dn.push_back(make_matrix(kind, down, down_scale, G, e));
  }
  std::vector<int64_t> token_rows(R);  // activation row r -> token
  for (size_t u = 0; u < chosen.size(); ++u)
    for (size_t j = 0; j < routed[chosen[u]].size(); ++j) token_rows[offset[u] + j] = routed[chosen[u]][j].first;

  // phase 1: act [R, F] = silu(x·gateᵀ) * (x·upᵀ), each expert on its own tokens
  QRows xq;
  const Acts xa = prepare(kind, static_cast<const uint16_t*>(x.data_ptr()), T, H, G, xq);
  std::vector<uint16_t> act(R * F);
  const int64_t f_tiles = (F + 3) / 4;
  at::parallel_for(0, f_tiles, tiles_grain(H * R / 2), [&](int64_t t0, int64_t t1) {
    const int64_t f0 = t0 * 4, f1 = std::min(F, t1 * 4), nf = f1 - f0;
    std::vector<float> g, up;
    for (size_t u = 0; u < chosen.size(); ++u) {
      const int64_t n = int64_t(routed[chosen[u]].size());
      const int64_t* rows = token_rows.data() + offset[u];
      g.resize(n * nf);
      up.resize(n * nf);
      matvec(xa, rows, n, gu[u], f0, f1, g.data(), nf);
      matvec(xa, rows, n, gu[u], F + f0, F + f1, up.data(), nf);
      for (int64_t j = 0; j < n; ++j) silu_mul(g.data() + j * nf, up.data() + j * nf, nf, act.data() + (offset[u] + j) * F + f0);
    }
  });

  // phase 2: out[t] = sum over t's experts, ascending, of weight * (act·downᵀ)
  QRows aq;
  const Acts aa = prepare(kind, act.data(), R, F, G, aq);
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

// the activations as the integer kernels see them, for tests: [M, K] dequantized (q * d)
at::Tensor quantize_activations(const at::Tensor& x, int64_t group_size) {
  check_acts(x, x.size(1));
  const int64_t M = x.size(0), K = x.size(1);
  QRows q;
  prepare(kQ8, static_cast<const uint16_t*>(x.data_ptr()), M, K, group_size, q);
  at::Tensor out = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k)
      o[i * K + k] = float(q.q[i * q.Kp + k]) * q.sv[i * (q.Kp / 64) * 16 + (k / 64) * 16 + (k % 64) / 32 * 8];
  return out;
}


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
// Python calls it from smoe/native.py's NativeBlock; every other case runs the modules.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma")

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

// x [heads, D] bf16 in place: x·cos + rotate_half(x)·sin, each product and the sum rounded (model.apply_rotary)
void rope(uint16_t* x, int64_t heads, int64_t D, const uint16_t* cos, const uint16_t* sin) {
  const int64_t half = D / 2;
  std::vector<float> rotated(D);
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t* r = x + h * D;
    for (int64_t d = 0; d < D; ++d) rotated[d] = d < half ? -bf16_to_f32(r[d + half]) : bf16_to_f32(r[d - half]);
    for (int64_t d = 0; d < D; ++d)
      r[d] = f32_to_bf16(round_bf16(bf16_to_f32(r[d]) * bf16_to_f32(cos[d])) +
                         round_bf16(rotated[d] * bf16_to_f32(sin[d])));
  }
}

// A linear's weight as the kernels read it: bf16 [N, K] (no scale), int8 [N, K] with fp32 scales,
// or int4 bytes [N, K/2] with sm [N, 2, K/G]; stacked [E, ...] with expert e.
Kind kind_of(const at::Tensor& w) {
  if (w.scalar_type() == at::kBFloat16) return kBf16;
  if (w.scalar_type() == at::kChar) return kQ8;
  check(w.scalar_type() == at::kByte, "weights must be bf16, int8 or int4 bytes");
  return kQ4;
}

int64_t group_of(const at::Tensor& w, const at::Tensor& scale) {
  return kind_of(w) == kQ4 ? 2 * w.size(-1) / scale.size(-1) : 0;
}

Matrix weight_matrix(const at::Tensor& w, const at::Tensor& scale) {
  const Kind kind = kind_of(w);
  return make_matrix(kind, w, kind == kBf16 ? c10::nullopt : c10::optional<at::Tensor>(scale), group_of(w, scale));
}

// weights: attn_norm, ffn_norm, router, then (weight, scale) for q, k, v, o, gate_up, down (scale
// empty for bf16); meta: query heads, kv heads, experts per token, layer, first cache row. k_all,
// v_all: the whole cache [L, rows, G, S, D] (this step's rows are row0..row0+B-1 of the layer);
// slots [B] the slot each row's new key goes to; mask [B, kv_len] (True = may attend) or none.
at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, double eps,
                        const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                        const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                        const at::Tensor& sin) {
  check(w.size() == 15 && meta.size() == 5, "decode_layer takes 15 weights and 5 sizes");
  const int64_t B = x.size(0), H = x.size(1), Q = meta[0], G = meta[1], topk = meta[2], layer = meta[3],
                row0 = meta[4];
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
    rope(q.data() + b * Q * D, Q, D, bf(cos) + b * D, bf(sin) + b * D);
    rope(k.data() + b * G * D, G, D, bf(cos) + b * D, bf(sin) + b * D);
    check(slot[b] >= 0 && slot[b] < S, "cache slot out of range");
    for (int64_t g = 0; g < G; ++g) {
      std::memcpy(kc + ((b * G + g) * S + slot[b]) * D, k.data() + (b * G + g) * D, D * 2);
      std::memcpy(vc + ((b * G + g) * S + slot[b]) * D, v.data() + (b * G + g) * D, D * 2);
    }
  }
  // attention in fp32 (model.one_token_attention's arithmetic; its sums in another order), one
  // task per (row, kv head) with its Q/G query heads
  const int64_t R = Q / G;  // query heads per kv head
  at::Tensor att = at::empty({B, Q * D}, x.options());
  uint16_t* attp = static_cast<uint16_t*>(att.data_ptr());
  at::parallel_for(0, B * G, 1, [&](int64_t p0, int64_t p1) {
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
  const Kind kind = kind_of(w[11]);
  check(kind_of(w[13]) == kind, "gate_up and down must be of one kind");
  auto scale = [&](int i) { return kind == kBf16 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(w[i]); };
  const at::Tensor y = moe(kind, hn, idx, wts, w[11], scale(12), w[13], scale(14), group_of(w[11], w[12]));
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

// A decode step's layers one after another (weights: 15 per layer, meta: 5 per layer, as
// decode_layer takes them; eps: one per layer): one call from Python per step instead of one per
// layer, whose interpreter work between layers runs with caches the weights have just flushed.
at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> eps,
                         const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                         const at::Tensor& sin) {
  const int64_t L = int64_t(eps.size());
  check(int64_t(w.size()) == 15 * L && int64_t(meta.size()) == 5 * L, "decode_layers takes 15 weights and 5 sizes per layer");
  at::Tensor y = x;
  for (int64_t l = 0; l < L; ++l)
    y = decode_layer(y, w.slice(15 * l, 15), meta.slice(5 * l, 5), eps[l], k_all, v_all, slots, mask, kv_len, cos, sin);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor codes, Tensor sm, int group_size) -> Tensor");
  m.def("moe_bf16(Tensor x, Tensor expert_indices, Tensor expert_weights, Tensor gate_up, Tensor down) -> Tensor");
  m.def("moe_q8(Tensor x, Tensor expert_indices, Tensor expert_weights, Tensor gate_up, Tensor gate_up_scale, "
        "Tensor down, Tensor down_scale) -> Tensor");
  m.def("moe_q4(Tensor x, Tensor expert_indices, Tensor expert_weights, Tensor gate_up, Tensor gate_up_sm, "
        "Tensor down, Tensor down_sm, int group_size) -> Tensor");
  m.def("quantize_activations(Tensor x, int group_size) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor[] weights, int[] meta, float eps, Tensor(a!) k_all, Tensor(b!) v_all, "
        "Tensor slots, Tensor? mask, int kv_len, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] meta, float[] eps, Tensor(a!) k_all, Tensor(b!) v_all, "
        "Tensor slots, Tensor? mask, int kv_len, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_q8", &linear_q8);
  m.impl("linear_q4", &linear_q4);
  m.impl("moe_bf16", &moe_bf16);
  m.impl("moe_q8", &moe_q8);
  m.impl("moe_q4", &moe_q4);
  m.impl("quantize_activations", &quantize_activations);
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
  m.impl("rms_norm", &rms_norm_op);
}

// ------------------------------------------------------------------------------ the Python module

static PyObject* py_supported(PyObject*, PyObject*) { return PyBool_FromLong(cpu_supported()); }

static PyMethodDef methods[] = {
    {"supported", py_supported, METH_NOARGS, "Whether this CPU has AVX-512 BF16 and VNNI (the kernels' instructions)."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "smoe's native CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
