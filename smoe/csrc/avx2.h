// The AVX2 inner loops (isa.h declares what each computes), included twice by avx2.cpp: as
// `avx2` (AVX2 + FMA + F16C) and as `avx2_vnni` (the same with AVX-VNNI), each under its own
// target pragma. The one difference is the 8-bit product: `dot_u8s8(u, s)` sums each 4 bytes'
// products u·s (u unsigned, s signed) into an int32 lane, by maddubs + madd or by vpdpbusd.
//
// bf16: weights widened to fp32 (a shift of the 16 bits), activation rows widened once per call;
// 16 columns a step in two accumulators. int8: per block of 32 columns |w| times x with w's sign
// (vpsignb: exact, also for w = -128, whose |w| = 128 fits the unsigned operand), the block's int32
// sum times its scale d_b. int4: per 32 code bytes (two blocks: the low nibbles meet the blocks'
// first 16 activations, the high nibbles their last 16, QRows' order) the codes times the
// activations, lanes 0-3 of the sum for the first block and 4-7 for the second, times d_b and
// the group's scale; the offsets' part once per row. Each weight row is read once per call, for
// up to 4 token rows, and every row's sums run in the same order whatever shares its call.

inline __m256 widen_bf16(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float hsum(__m256 v) {  // a fixed tree: halves, pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i dot2_u8s8(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {  // dot_u8s8(u1, s1) + dot_u8s8(u2, s2)
#if SMOE_AVX2_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u1, s1), u2, s2);
#else  // pairs of int16 products: |codes·x| <= 2 * 2 * 15 * 127 for int4, so no saturation
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if SMOE_AVX2_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else  // |w|·|x| <= 128 * 127, two of them fit an int16
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Every row kernel asks for its weights 2 KiB ahead into every cache level (_MM_HINT_T0), one
// line at a time. Measured in whole decode steps (Intel Xeon, SPR class, AVX2 emulated, 2
// threads, benchmark checkpoint): int4 53 -> 73 tok/s (the non-temporal hint it had before fills
// only L1), int8 49 -> 57, bf16 27 -> 35; the demo model's step 880 -> 674 us in bf16.
constexpr int64_t kPrefetch = 2048;

struct Rows {  // the row kernels, for rows.h's matvec_rows (what each computes: rows.h)
  static constexpr int kWeightRows = 4;  // weight rows one call takes for one token row

  // res[m * NR + r] = weight row w + r * ldw times (fp32, zero padded to 16) token rows x[m]
  template <int MR, int NR>
  __attribute__((noinline)) static void bf16(const float* const* x, const uint16_t* w, int64_t ldw, int64_t K,
                                             float* res) {
    __m256 a0[MR][NR], a1[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) a0[m][r] = a1[m][r] = _mm256_setzero_ps();
    auto step = [&](int64_t k, const uint16_t* const* wk) __attribute__((always_inline)) {
      __m256 w0[NR], w1[NR];
      for (int r = 0; r < NR; ++r) w0[r] = widen_bf16(wk[r]), w1[r] = widen_bf16(wk[r] + 8);
      for (int m = 0; m < MR; ++m) {
        const __m256 x0 = _mm256_loadu_ps(x[m] + k), x1 = _mm256_loadu_ps(x[m] + k + 8);
        for (int r = 0; r < NR; ++r) {
          a0[m][r] = _mm256_fmadd_ps(x0, w0[r], a0[m][r]);
          a1[m][r] = _mm256_fmadd_ps(x1, w1[r], a1[m][r]);
        }
      }
    };
    const uint16_t* wk[NR];
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      for (int r = 0; r < NR; ++r) {
        wk[r] = w + r * ldw + k;
        _mm_prefetch(reinterpret_cast<const char*>(wk[r]) + kPrefetch, _MM_HINT_T0);
      }
      step(k, wk);
      for (int r = 0; r < NR; ++r) wk[r] += 16;
      step(k + 16, wk);
    }
    for (; k + 16 <= K; k += 16) {
      for (int r = 0; r < NR; ++r) wk[r] = w + r * ldw + k;
      step(k, wk);
    }
    if (k < K) {  // the last columns from zero-padded copies: no read past the row
      uint16_t tail[NR][16] = {};
      for (int r = 0; r < NR; ++r) {
        std::memcpy(tail[r], w + r * ldw + k, (K - k) * sizeof(uint16_t));
        wk[r] = tail[r];
      }
      step(k, wk);
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) res[m * NR + r] = hsum(_mm256_add_ps(a0[m][r], a1[m][r]));
  }

  // res[m * NR + r] = sum_b d_b * sum_{k in b} qx[k] * qw[k] (the caller multiplies by the row's scale)
  template <int MR, int NR>
  __attribute__((noinline)) static void q8(const int8_t* const* xq, const float* const* sv, const int8_t* w,
                                           int64_t ldw, int64_t K, float* res) {
    __m256 a0[MR][NR], a1[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) a0[m][r] = a1[m][r] = _mm256_setzero_ps();
    // (the same products and sums in either order of the loops; the order keeps the 16 registers
    // enough: one token row's codes and scale held across the weight rows, or one weight row's
    // across the token rows)
    auto step = [&](int64_t b, const int8_t* const* wb, __m256 (*a)[NR]) __attribute__((always_inline)) {
      if constexpr (NR > 1) {
        static_assert(MR == 1, "several weight rows for one token row");
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[0] + b * kQBlock));
        const __m256 d = _mm256_set1_ps(block_scale(sv[0], kQ8, b));
        for (int r = 0; r < NR; ++r) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[r]));
          a[0][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv))), d, a[0][r]);
        }
      } else {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[0]));
        const __m256i magnitude = _mm256_abs_epi8(wv);
        for (int m = 0; m < MR; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + b * kQBlock));
          const __m256 d = _mm256_set1_ps(block_scale(sv[m], kQ8, b));
          a[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(x, wv))), d, a[m][0]);
        }
      }
    };
    const int8_t* wb[NR];
    auto rows_at = [&](int64_t b) __attribute__((always_inline)) {
      for (int r = 0; r < NR; ++r) wb[r] = w + r * ldw + b * kQBlock;
    };
    const int64_t full = K / kQBlock;
    int64_t b = 0;
    for (; b + 2 <= full; b += 2) {
      rows_at(b);
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wb[r]) + kPrefetch, _MM_HINT_T0);
      step(b, wb, a0);
      rows_at(b + 1);
      step(b + 1, wb, a1);
    }
    if (b < full) {
      rows_at(b);
      step(b, wb, a0);
      ++b;
    }
    if (K % kQBlock != 0) {  // the activations are zero padded; the weights from zero-padded copies
      int8_t tail[NR][kQBlock] = {};
      for (int r = 0; r < NR; ++r) {
        std::memcpy(tail[r], w + r * ldw + full * kQBlock, K % kQBlock);
        wb[r] = tail[r];
      }
      step(full, wb, (full & 1) ? a1 : a0);
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) res[m * NR + r] = hsum(_mm256_add_ps(a0[m][r], a1[m][r]));
  }

  // res[m * NR + r] = sum_b d_b * s_g(b) * sum_{k in b} qx[k] * code[k] + sum_g m_g * xs_g, for
  // weight row r: codes + r * ldw bytes, its scales and offsets sm + r * lds
  template <int MR, int NR>
  __attribute__((noinline)) static void q4(const int8_t* const* xq, const float* const* sv, const float* const* xs,
                                           const uint8_t* codes, int64_t ldw, const uint16_t* sm, int64_t lds,
                                           int64_t K, int64_t G, float* res) {
    __m256 a0[MR][NR], a1[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) a0[m][r] = a1[m][r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int64_t nb = K / kQBlock, ng = K / G;
    const int gshift = __builtin_ctzll(uint64_t(G));  // G is a power of two (make_matrix): no division per step
    // a pair's two blocks share a group unless G is 32; a lone last block's partner takes its group
    auto group_scale = [&](int r, int64_t b) __attribute__((always_inline)) {
      return bf16_to_f32(sm[r * lds + std::min((b * kQBlock) >> gshift, ng - 1)]);
    };
    // pair p: blocks 2p and 2p + 1, code bytes 32p .. 32p + 31; in QRows, step p / 2, half p % 2
    // (as q8: one token row's codes held across the weight rows, or one weight row's across the
    // token rows; the same products and sums either way)
    auto step = [&](int64_t p, const uint8_t* const* bytes, __m256 (*a)[NR]) __attribute__((always_inline)) {
      const int64_t at = (p / 2) * 128 + (p % 2) * 32;
      auto codes_of = [&](int r, __m256i& lo, __m256i& hi, __m256& ws) __attribute__((always_inline)) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes[r]) + kPrefetch, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes[r]));
        lo = _mm256_and_si256(v, low);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        ws = G > kQBlock ? _mm256_set1_ps(group_scale(r, 2 * p))
                         : _mm256_set_m128(_mm_set1_ps(group_scale(r, 2 * p + 1)), _mm_set1_ps(group_scale(r, 2 * p)));
      };
      if constexpr (NR > 1) {
        static_assert(MR == 1, "several weight rows for one token row");
        const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[0] + at));
        const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[0] + at + 64));
        const __m256 d = _mm256_loadu_ps(sv[0] + (p / 2) * 16 + (p % 2) * 8);
        for (int r = 0; r < NR; ++r) {
          __m256i lo, hi;
          __m256 ws;
          codes_of(r, lo, hi, ws);
          a[0][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2_u8s8(lo, xlo, hi, xhi)), _mm256_mul_ps(d, ws), a[0][r]);
        }
      } else {
        __m256i lo, hi;
        __m256 ws;
        codes_of(0, lo, hi, ws);
        for (int m = 0; m < MR; ++m) {
          const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + at));
          const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + at + 64));
          const __m256 d = _mm256_loadu_ps(sv[m] + (p / 2) * 16 + (p % 2) * 8);
          a[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2_u8s8(lo, xlo, hi, xhi)), _mm256_mul_ps(d, ws), a[m][0]);
        }
      }
    };
    const uint8_t* bytes[NR];
    auto rows_at = [&](int64_t p) __attribute__((always_inline)) {
      for (int r = 0; r < NR; ++r) bytes[r] = codes + r * ldw + p * 32;
    };
    const int64_t pairs = nb / 2;
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2) {
      rows_at(p);
      step(p, bytes, a0);
      rows_at(p + 1);
      step(p + 1, bytes, a1);
    }
    if (p < pairs) {
      rows_at(p);
      step(p, bytes, a0);
      ++p;
    }
    if (nb & 1) {  // a last lone block: its 16 bytes and zeros (the activations past K are zero)
      uint8_t tail[NR][32] = {};
      for (int r = 0; r < NR; ++r) {
        std::memcpy(tail[r], codes + r * ldw + p * 32, 16);
        bytes[r] = tail[r];
      }
      step(p, bytes, (p & 1) ? a1 : a0);
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) {
        float offsets = 0.f;
        for (int64_t g = 0; g < ng; ++g) offsets += bf16_to_f32(sm[r * lds + ng + g]) * xs[m][g];
        res[m * NR + r] = hsum(_mm256_add_ps(a0[m][r], a1[m][r])) + offsets;
      }
  }
};

void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
            int64_t ldo) {
  matvec_rows<Rows>(a, rows, M, W, n0, n1, out, ldo);
}

// exp for 8 lanes (Cephes' expf polynomial, as avx512.cpp's exp16): n = round(x·log2 e),
// r = x − n·ln 2, p(r)·2^n with n clamped so that 2^n is 0 below and inf above the range
inline __m256 exp8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-127.f)), _mm256_set1_ps(128.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(clamped), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));  // 2^-127 encodes as 0, 2^128 as inf
}

inline __m256 round8_bf16(__m256 x) {  // to bf16 and back, round to nearest even (x finite or inf)
  const __m256i u = _mm256_castps_si256(x);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(int(0xffff0000u))));
}

void silu_mul(const float* g, const float* up, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = round8_bf16(_mm256_loadu_ps(g + i)), uv = round8_bf16(_mm256_loadu_ps(up + i));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 silu = round8_bf16(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
    float y[8];
    _mm256_storeu_ps(y, _mm256_mul_ps(silu, uv));
    for (int l = 0; l < 8; ++l) out[i + l] = f32_to_bf16(y[l]);
  }
  if (i < n) portable::silu_mul(g + i, up + i, n - i, out + i);
}

// attention: portable's arithmetic, 8 lanes at a time (head dims that are multiples of 8 up to
// 256; others: portable's). Each key and value is widened once for all R query rows; every
// (row, column) sum still runs over the keys in order.
void attend(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed, int64_t n,
            int64_t D, float* scores, float* out) {
  if (D % 8 != 0 || D > 256) return portable::attend(q, R, keys, values, allowed, n, D, scores, out);
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t chunks = D / 8;
  __m256 key[32];
  for (int64_t s = 0; s < n; ++s) {
    if (allowed != nullptr && !allowed[s]) {
      for (int64_t r = 0; r < R; ++r) scores[r * n + s] = -INFINITY;
      continue;
    }
    for (int64_t c = 0; c < chunks; ++c) key[c] = widen_bf16(keys + s * D + 8 * c);
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + 8 * c), key[c], acc);
      scores[r * n + s] = hsum(acc) * scale;
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax (masked keys: -inf -> 0)
    float* p = scores + r * n;
    float top = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < n; ++s) top = std::max(top, p[s]);
    int64_t s = 0;
    __m256 total = _mm256_setzero_ps();
    for (; s + 8 <= n; s += 8) {
      const __m256 v = _mm256_loadu_ps(p + s);
      const __m256 live = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(live, exp8(_mm256_sub_ps(v, _mm256_set1_ps(top))));
      _mm256_storeu_ps(p + s, e);
      total = _mm256_add_ps(total, e);
    }
    sum = hsum(total);
    for (; s < n; ++s) sum += p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - top);
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; ++t) p[t] *= inv;
  }
  constexpr int kRows = 8;  // query rows per pass over the values (accumulators in registers)
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {
      const int64_t rn = std::min<int64_t>(kRows, R - r0);
      __m256 acc[kRows];
      for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t s = 0; s < n; ++s) {
        if (allowed != nullptr && !allowed[s]) continue;
        const __m256 v = widen_bf16(values + s * D + 8 * c);
        for (int64_t r = 0; r < rn; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scores[(r0 + r) * n + s]), v, acc[r]);
      }
      for (int64_t r = 0; r < rn; ++r) _mm256_storeu_ps(out + (r0 + r) * D + 8 * c, acc[r]);
    }
}

// Activations to int8 in blocks of 32, portable's arithmetic 8 lanes at a time (the same bytes):
// d_b = max|x_b| / 127, q = round-half-even(x / d_b), a true division.
void quantize_row(const uint16_t* x, int64_t K, Kind kind, int64_t G, int8_t* q, float* sv, float* gs) {
  const int64_t step = chunk_of(kind), Kp = (K + step - 1) / step * step, nblocks = Kp / kQBlock;
  float d[nblocks > 0 ? nblocks : 1], sum[nblocks > 0 ? nblocks : 1];
  const __m256 sign = _mm256_set1_ps(-0.f), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' lanes back in column order
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t k0 = b * kQBlock, n = std::max<int64_t>(0, std::min<int64_t>(kQBlock, K - k0));
    uint16_t padded[kQBlock] = {};
    const uint16_t* xb = x + k0;
    if (n < kQBlock) {  // the row's last, partial block (or a block past K) from a zero-padded copy
      std::memcpy(padded, x + k0, n * sizeof(uint16_t));
      xb = padded;
    }
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = widen_bf16(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float scale = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.f;
    __m256i codes = _mm256_setzero_si256();
    int32_t total = 0;
    if (scale > 0.f) {
      const __m256 sv8 = _mm256_set1_ps(scale);
      __m256i c[4], t = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], sv8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
        t = _mm256_add_epi32(t, c[i]);
      }
      codes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), order);
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
      total = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1)));
    }
    d[b] = scale;
    sum[b] = float(total);
    const int64_t c = k0 / step, j = k0 % step;  // the step, and the block's first column in it
    int8_t* first = q + c * step + (kind == kQ4 ? (j / kQBlock) * 16 : j);
    int8_t* second = kind == kQ4 ? first + 64 : first + 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(first), _mm256_castsi256_si128(codes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(second), _mm256_extracti128_si256(codes, 1));
  }
  row_scales_and_sums(kind, K, Kp, G, d, sum, sv, gs);
}

// weight rows [n0, n1) into fp32 for prefill's GEMMs: portable's arithmetic (a product, then a
// sum: the same bits), 8 columns at a time
void dequantize_rows(const Matrix& W, int64_t n0, int64_t n1, float* out) {
  const int64_t K = W.K;
  if (K % kQBlock != 0) return portable::dequantize_rows(W, n0, n1, out);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    if (W.kind == kBf16) {
      const uint16_t* w = static_cast<const uint16_t*>(W.w) + n * K;
      for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(o + k, widen_bf16(w + k));
    } else if (W.kind == kQ8) {
      const int8_t* w = static_cast<const int8_t*>(W.w) + n * K;
      const __m256 s = _mm256_set1_ps(W.scale[n]);
      for (int64_t k = 0; k < K; k += 8) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k)));
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
      }
    } else {  // per block of 32 columns, 16 bytes: column j in the low nibble, j + 16 in the high one
      const uint8_t* codes = static_cast<const uint8_t*>(W.w) + n * (K / 2);
      const uint16_t* sm = W.sm + n * 2 * (K / W.G);
      const int64_t ng = K / W.G;
      const int gshift = __builtin_ctzll(uint64_t(W.G));
      for (int64_t b = 0; b < K / kQBlock; ++b) {
        const int64_t g = (b * kQBlock) >> gshift;
        const __m256 s = _mm256_set1_ps(bf16_to_f32(sm[g])), m = _mm256_set1_ps(bf16_to_f32(sm[ng + g]));
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16));
        const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  // columns 0-7, 8-15, 16-23, 24-31
        for (int i = 0; i < 4; ++i) {
          const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
          _mm256_storeu_ps(o + b * kQBlock + 8 * i, _mm256_add_ps(_mm256_mul_ps(c, s), m));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ GGML blocks (ggml_rows.h)

#include "ggml_avx2.h"

// a 32-value block's signed values times 32 activation codes: 8 int32 lanes summing to Σ w·q
inline __m256i signed_dot(__m256i mag, __m256i w, __m256i q) { return dot_u8s8(mag, _mm256_sign_epi8(q, w)); }
inline __m256i block_dot(__m256i w, __m256i q) { return signed_dot(_mm256_sign_epi8(w, w), w, q); }

// a block unpacked into memory (batches: one unpacking for every row)
inline int32_t ldot(const int8_t* w, const int8_t* q) {
  return hsum_i32(block_dot(load32(reinterpret_cast<const uint8_t*>(w)), load32(reinterpret_cast<const uint8_t*>(q))));
}

#include "ggml_rows.h"
