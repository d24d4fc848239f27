// The GGML row products (ggml.h has the formats and the arithmetic), included by every variant
// inside its own namespace and target pragma, after it has defined its three integer sums (and,
// optionally, `unpack` overloads of its own for some types: ggml_avx2.h):
//
//   int32_t kdot(const uint8_t* u, const int8_t* q, const int16_t* sc)  Σ_j sc_j · Σ_{i<16} u_{16j+i} q_{16j+i}, 256 values
//   int32_t mdot(const int16_t* m, const int16_t* bsums)               Σ_{j<16} m_j · bsums_j
//   int32_t ldot(const int8_t* w, const int8_t* q)                     Σ_{i<32} w_i q_i
//
// Each weight block is unpacked once (the loops below, which the compiler vectorizes for the
// variant's instructions) and multiplied by every token row of the call; each row's fp32 sums
// run block by block in two alternating accumulators, the same order in every variant, so every
// variant gives the same bits.

inline void unpack_scalar(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ2_K>) {
  const uint8_t* q = b + 16;
  for (int j = 0; j < 16; ++j) o.sc[j] = b[j] & 15, o.m[j] = b[j] >> 4;
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l) o.u[h * 128 + s * 32 + l] = (q[h * 32 + l] >> (2 * s)) & 3;
  o.D = half_at(b + 80), o.Dm = half_at(b + 82), o.off = 0;
}

inline void unpack_scalar(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ3_K>) {
  const uint8_t *hm = b, *q = b + 32, *p = b + 96;
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? p[j] & 15 : p[j - 8] >> 4, top = (p[8 + j % 4] >> (2 * (j / 4))) & 3;
    o.sc[j] = int16_t((low | top << 4) - 32);
    o.m[j] = int16_t(4 * o.sc[j]);
  }
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l)
        o.u[h * 128 + s * 32 + l] = ((q[h * 32 + l] >> (2 * s)) & 3) | (((hm[l] >> (h * 4 + s)) & 1) << 2);
  o.D = o.Dm = half_at(b + 108), o.off = 4;
}

inline void unpack_scalar(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ4_K>) {
  k_scales_mins(b + 4, o);
  const uint8_t* q = b + 16;
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) o.u[64 * i + l] = q[32 * i + l] & 15, o.u[64 * i + 32 + l] = q[32 * i + l] >> 4;
  o.D = half_at(b), o.Dm = half_at(b + 2), o.off = 0;
}

inline void unpack_scalar(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ5_K>) {
  k_scales_mins(b + 4, o);
  const uint8_t *qh = b + 16, *q = b + 48;
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      o.u[64 * i + l] = (q[32 * i + l] & 15) | (((qh[l] >> (2 * i)) & 1) << 4);
      o.u[64 * i + 32 + l] = (q[32 * i + l] >> 4) | (((qh[l] >> (2 * i + 1)) & 1) << 4);
    }
  o.D = half_at(b), o.Dm = half_at(b + 2), o.off = 0;
}

inline void unpack_scalar(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ6_K>) {
  const uint8_t *ql = b, *qh = b + 128;
  for (int j = 0; j < 16; ++j) o.sc[j] = int8_t(b[192 + j]), o.m[j] = int16_t(32 * o.sc[j]);
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t lo = ql[64 * h + l], hi = ql[64 * h + 32 + l], bits = qh[32 * h + l];
      o.u[128 * h + l] = (lo & 15) | ((bits & 3) << 4);
      o.u[128 * h + 32 + l] = (hi & 15) | (((bits >> 2) & 3) << 4);
      o.u[128 * h + 64 + l] = (lo >> 4) | (((bits >> 4) & 3) << 4);
      o.u[128 * h + 96 + l] = (hi >> 4) | (((bits >> 6) & 3) << 4);
    }
  o.D = o.Dm = half_at(b + 208), o.off = 32;
}

inline void nibbles(const uint8_t* q, int bias, int8_t* w) {
  for (int l = 0; l < 16; ++l) w[l] = int8_t((q[l] & 15) - bias), w[l + 16] = int8_t((q[l] >> 4) - bias);
}

inline void fifth_bits(const uint8_t* qh4, const uint8_t* q, int bias, int8_t* w) {
  uint32_t qh;
  std::memcpy(&qh, qh4, 4);
  for (int l = 0; l < 16; ++l) {
    w[l] = int8_t(((q[l] & 15) | ((qh >> l) & 1) << 4) - bias);
    w[l + 16] = int8_t(((q[l] >> 4) | ((qh >> (l + 16)) & 1) << 4) - bias);
  }
}

inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ4_0>) {
  nibbles(b + 2, 8, o.w), o.D = half_at(b), o.M = 0.f;
}
inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ4_1>) {
  nibbles(b + 4, 0, o.w), o.D = half_at(b), o.M = half_at(b + 2);
}
inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ5_0>) {
  fifth_bits(b + 2, b + 6, 16, o.w), o.D = half_at(b), o.M = 0.f;
}
inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ5_1>) {
  fifth_bits(b + 4, b + 8, 0, o.w), o.D = half_at(b), o.M = half_at(b + 2);
}
inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ8_0>) {
  std::memcpy(o.w, b + 2, 32), o.D = half_at(b), o.M = 0.f;
}
inline void unpack_scalar(const uint8_t* b, LBlock& o, std::integral_constant<int, kIQ4_NL>) {
  static const int8_t table[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  for (int l = 0; l < 16; ++l) o.w[l] = table[b[2 + l] & 15], o.w[l + 16] = table[b[2 + l] >> 4];
  o.D = half_at(b), o.M = 0.f;
}

// a block unpacked by the scalar loops above, unless the variant has its own unpack for that
// type (declared before it includes this file: a non-template overload is preferred)
template <int T, class Block>
inline void unpack(const uint8_t* b, Block& o, std::integral_constant<int, T> t) {
  unpack_scalar(b, o, t);
}

constexpr int kGgmlMaxRows = 16;  // token rows one call takes (MAX_ROWS, smoe/kernels/ops.py)

#ifdef SMOE_GGML_FUSED
// One weight row of a K-quant times one token row, each block's codes multiplied as they are
// computed (ggml_avx2.h's Chunks, the variant's kdot_chunks): row_k's arithmetic, the same bits.
template <int T>
void row_k_one(const uint8_t* w, int64_t K, const ActRows& a, int64_t r, float* out) {
  constexpr int64_t bytes = block_format(T).bytes;
  float acc[2] = {0.f, 0.f};
  KBlock k;  // its scales only
  const int64_t nb = K / 256;
  const int8_t* q = a.qk.data() + r * K;
  const int16_t* bsums = a.bs.data() + r * (K / 16);
  for (int64_t sb = 0; sb < nb; ++sb) {
    const uint8_t* b = w + sb * bytes;
    prefetch_span(b, bytes);
    Chunks<T>::scales(b, k);
    const float dx = a.dk[r * nb + sb];
    if constexpr (T == kQ3_K || T == kQ6_K) {  // the offset in m (off != 0): isum − msum in one reduction
      acc[sb & 1] += (dx * k.D) * float(kdot_chunks(Chunks<T>{b}, q + sb * 256, k.sc, k.m, bsums + sb * 16));
    } else {
      const int32_t isum = kdot_chunks(Chunks<T>{b}, q + sb * 256, k.sc), msum = mdot(k.m, bsums + sb * 16);
      acc[sb & 1] += (dx * k.D) * float(isum) - (dx * k.Dm) * float(msum);
    }
  }
  out[0] = acc[0] + acc[1];
}
#endif

// One weight row of a K-quant times M token rows: out[i * ldo]. The blocks are unpacked one ahead
// of the products (two buffers): a product read right after the unpacking's stores would wait on
// them (loads wider than the stores that wrote them are not forwarded: measured 2-5x slower).
template <int T>
void row_k(const uint8_t* w, int64_t K, const ActRows& a, const int64_t* rows, int64_t M, float* out, int64_t ldo) {
#ifdef SMOE_GGML_FUSED
  if (M == 1) return row_k_one<T>(w, K, a, rows[0], out);
#endif
  constexpr int64_t bytes = block_format(T).bytes;
  float acc[kGgmlMaxRows][2] = {};
  KBlock blk[2];
  const int64_t nb = K / 256;
  unpack(w, blk[0], std::integral_constant<int, T>());
  for (int64_t sb = 0; sb < nb; ++sb) {
    if (sb + 1 < nb) {
      const uint8_t* next = w + (sb + 1) * bytes;
      prefetch_span(next, bytes);
      unpack(next, blk[(sb + 1) & 1], std::integral_constant<int, T>());
    }
    const KBlock& k = blk[sb & 1];
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rows[i];
      const int32_t isum = kdot(k.u, a.qk.data() + r * K + sb * 256, k.sc);
      const int32_t msum = mdot(k.m, a.bs.data() + r * (K / 16) + sb * 16);
      const float dx = a.dk[r * nb + sb];
      acc[i][sb & 1] += k.off ? (dx * k.D) * float(isum - msum) : (dx * k.D) * float(isum) - (dx * k.Dm) * float(msum);
    }
  }
  for (int64_t i = 0; i < M; ++i) out[i * ldo] = acc[i][0] + acc[i][1];
}

constexpr int64_t kGroup = 8;  // 32-value blocks unpacked together, a group ahead of their products

// The 32-value types' fp32 order: block b's term into lane b % 8 of 8 accumulators, then the lanes
// added by a fixed tree — what 8 vector lanes do, so the scalar form gives the same bits
inline float lanes_sum(const float* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

#ifdef SMOE_GGML_FUSED
// One weight row of a 32-value type times M token rows, 8 blocks a step: their values computed once
// in registers (LValues), for each row 8 integer block sums at once (block_dot, sums8), each
// block's term (d_x · D) · sum (+ M · s_x) 8 lanes at a time (the same IEEE operations as the
// scalar form's), added into the row's 8 lane accumulators.
template <int T>
void row_l_fused(const uint8_t* w, int64_t K, const ActRows& a, const int64_t* rows, int64_t M, float* out,
                 int64_t ldo) {
  constexpr int64_t bytes = block_format(T).bytes;
  constexpr bool with_min = T == kQ4_1 || T == kQ5_1;
  alignas(32) float acc[kGgmlMaxRows][8];  // lane j: the blocks b with b % 8 == j (lanes_sum's order)
  std::memset(acc, 0, M * sizeof(acc[0]));  // (the rows of this call only: a row product is short)
  const int64_t nb = K / 32;
  int64_t bi = 0;
#ifdef SMOE_GGML_NIBBLES
  if constexpr (T == kQ4_0 || T == kQ4_1) bi = nibble_steps<T>(w, K, a, rows, M, acc);  // the variant's, same bits
#endif
  for (; bi + 8 <= nb; bi += 8) {
    const uint8_t* b = w + bi * bytes;
    prefetch_span(b, 8 * bytes);
    __m256i v[8], mag[8];  // the values, and their magnitudes (block_dot's unsigned operand)
    for (int j = 0; j < 8; ++j) v[j] = LValues<T>::at(b + j * bytes), mag[j] = _mm256_sign_epi8(v[j], v[j]);
    const __m256 D = halves8(b, bytes);
    const __m256 Mn = with_min ? halves8(b + 2, bytes) : _mm256_setzero_ps();
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rows[i];
      const int8_t* q = a.q0.data() + r * K + bi * 32;
      __m256i p[8];
      for (int j = 0; j < 8; ++j)
        p[j] = signed_dot(mag[j], v[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j)));
      __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a.d0.data() + r * nb + bi), D), _mm256_cvtepi32_ps(sums8(p)));
      if (with_min) t = _mm256_add_ps(t, _mm256_mul_ps(Mn, _mm256_loadu_ps(a.s0.data() + r * nb + bi)));
      _mm256_store_ps(acc[i], _mm256_add_ps(_mm256_load_ps(acc[i]), t));
    }
  }
  for (; bi < nb; ++bi) {  // the last blocks, one at a time, into their lanes
    const uint8_t* b = w + bi * bytes;
    const __m256i v = LValues<T>::at(b);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rows[i];
      const int32_t isum = hsum_i32(
          block_dot(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q0.data() + r * K + bi * 32))));
      float t = (a.d0[r * nb + bi] * half_at(b)) * float(isum);
      if (with_min) t += half_at(b + 2) * a.s0[r * nb + bi];
      acc[i][bi % 8] += t;
    }
  }
  for (int64_t i = 0; i < M; ++i) out[i * ldo] = lanes_sum(acc[i]);
}
#endif

// one weight row of a 32-value type times M token rows (the blocks unpacked a group ahead, as row_k)
template <int T>
void row_l(const uint8_t* w, int64_t K, const ActRows& a, const int64_t* rows, int64_t M, float* out, int64_t ldo) {
#ifdef SMOE_GGML_FUSED
  return row_l_fused<T>(w, K, a, rows, M, out, ldo);
#endif
  constexpr int64_t bytes = block_format(T).bytes;
  float acc[kGgmlMaxRows][8] = {};  // lane b % 8 (lanes_sum)
  LBlock blk[2][kGroup];
  const int64_t nb = K / 32, ng = (nb + kGroup - 1) / kGroup;
  auto unpack_group = [&](int64_t g) __attribute__((always_inline)) {
    const int64_t first = g * kGroup, count = std::min(kGroup, nb - first);
    prefetch_span(w + first * bytes, count * bytes);
    for (int64_t j = 0; j < count; ++j) unpack(w + (first + j) * bytes, blk[g & 1][j], std::integral_constant<int, T>());
  };
  unpack_group(0);
  for (int64_t g = 0; g < ng; ++g) {
    if (g + 1 < ng) unpack_group(g + 1);
    const int64_t first = g * kGroup, count = std::min(kGroup, nb - first);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rows[i];
      for (int64_t j = 0; j < count; ++j) {
        const int64_t bi = first + j, at = r * nb + bi;
        const LBlock& l = blk[g & 1][j];
        float v = (a.d0[at] * l.D) * float(ldot(l.w, a.q0.data() + r * K + bi * 32));
        if (T == kQ4_1 || T == kQ5_1) v += l.M * a.s0[at];
        acc[i][bi % 8] += v;
      }
    }
  }
  for (int64_t i = 0; i < M; ++i) out[i * ldo] = lanes_sum(acc[i]);
}

// out[i * ldo + (n - n0)] = token row rows[i] times weight row n, n in [n0, n1) (isa.h's matvec)
void ggml_matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
                 int64_t ldo) {
  const ActRows& g = a.q->blocks;
  const uint8_t* base = static_cast<const uint8_t*>(W.w);
  for (int64_t m0 = 0; m0 < M; m0 += kGgmlMaxRows) {
    const int64_t mm = std::min<int64_t>(kGgmlMaxRows, M - m0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = base + n * W.row_bytes;
      float* o = out + m0 * ldo + (n - n0);
      switch (W.gtype) {
        case kQ2_K: row_k<kQ2_K>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ3_K: row_k<kQ3_K>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ4_K: row_k<kQ4_K>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ5_K: row_k<kQ5_K>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ6_K: row_k<kQ6_K>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ4_0: row_l<kQ4_0>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ4_1: row_l<kQ4_1>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ5_0: row_l<kQ5_0>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ5_1: row_l<kQ5_1>(w, W.K, g, rows + m0, mm, o, ldo); break;
        case kQ8_0: row_l<kQ8_0>(w, W.K, g, rows + m0, mm, o, ldo); break;
        default: row_l<kIQ4_NL>(w, W.K, g, rows + m0, mm, o, ldo);
      }
    }
  }
}

// rows [n0, n1) of a GGML matrix into out [n1 - n0, K] fp32, bit for bit gguf's values: each block
// unpacked (the scalar form: GCC 12 at -O2 compiled the variants' vector unpacking followed by these
// loops into all zeros — selftest.cpp caught it; -O1 / -O3 were right), then value = (D·sc)·(u − off) or (D·sc)·u − Dm·m per 16 values
// (K-quants), D·w (+ M) per 32 — gguf's products in gguf's order, in loops the compiler vectorizes
template <int T>
void dequantize_type(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1, float* out) {
  constexpr BlockFormat f = block_format(T);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t bi = 0; bi < K / f.elems; ++bi) {
      const uint8_t* blk = w + n * row_bytes + bi * f.bytes;
      float* ob = out + (n - n0) * K + bi * f.elems;
      if constexpr (f.elems == 256) {
#ifdef SMOE_GGML_DEQUANT512
        dequantize_k512<T>(blk, ob);  // the variant's, from the codes in registers: the same values
        continue;
#endif
        KBlock k;
        unpack_scalar(blk, k, std::integral_constant<int, T>());
        for (int j = 0; j < 16; ++j) {
          const float a = k.D * float(k.sc[j]), b = k.Dm * float(k.m[j]);
          const uint8_t* u = k.u + 16 * j;
          float* o = ob + 16 * j;
          if (k.off)
            for (int i = 0; i < 16; ++i) o[i] = a * float(int(u[i]) - k.off);
          else
            for (int i = 0; i < 16; ++i) o[i] = a * float(u[i]) - b;
        }
      } else {
        LBlock l;
        unpack_scalar(blk, l, std::integral_constant<int, T>());
        if (T == kQ4_1 || T == kQ5_1)
          for (int i = 0; i < 32; ++i) ob[i] = l.D * float(l.w[i]) + l.M;
        else
          for (int i = 0; i < 32; ++i) ob[i] = l.D * float(l.w[i]);
      }
    }
}

void ggml_dequantize(int type, const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int64_t n1, float* out) {
  switch (type) {
    case kQ2_K: return dequantize_type<kQ2_K>(w, row_bytes, K, n0, n1, out);
    case kQ3_K: return dequantize_type<kQ3_K>(w, row_bytes, K, n0, n1, out);
    case kQ4_K: return dequantize_type<kQ4_K>(w, row_bytes, K, n0, n1, out);
    case kQ5_K: return dequantize_type<kQ5_K>(w, row_bytes, K, n0, n1, out);
    case kQ6_K: return dequantize_type<kQ6_K>(w, row_bytes, K, n0, n1, out);
    case kQ4_0: return dequantize_type<kQ4_0>(w, row_bytes, K, n0, n1, out);
    case kQ4_1: return dequantize_type<kQ4_1>(w, row_bytes, K, n0, n1, out);
    case kQ5_0: return dequantize_type<kQ5_0>(w, row_bytes, K, n0, n1, out);
    case kQ5_1: return dequantize_type<kQ5_1>(w, row_bytes, K, n0, n1, out);
    case kQ8_0: return dequantize_type<kQ8_0>(w, row_bytes, K, n0, n1, out);
    default: return dequantize_type<kIQ4_NL>(w, row_bytes, K, n0, n1, out);
  }
}

#undef SMOE_GGML_FUSED
#undef SMOE_GGML_NIBBLES
#undef SMOE_OWN_KDOT
#undef SMOE_GGML_DEQUANT512
