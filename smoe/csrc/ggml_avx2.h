// GGML blocks unpacked with AVX2 (ggml.h's common form; ggml_rows.h's scalar loops compute the same
// bytes): included by the AVX2 variants (avx2.h) and the AVX-512 one (avx512.cpp) before
// ggml_rows.h, whose products then take these overloads. 32 bytes a step, aligned stores.

inline int32_t hsum_i32(__m256i v) {  // exact
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

inline int32_t mdot(const int16_t* m, const int16_t* bsums) {  // Σ_j m_j · bsums_j (ggml_rows.h)
  return hsum_i32(_mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums))));
}

inline float half(const uint8_t* p) {  // fp16 -> fp32 by F16C: exact (half_at's value), no branches
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// bits (shift, shift + width) of every byte, as 0 .. 2^width - 1
template <int shift, int width>
inline __m256i bit_field(__m256i v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(char((1 << width) - 1)));
}

inline void store32(uint8_t* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }

// 16 int16 into a block's scales or mins
inline void store16(int16_t* p, __m256i v) { std::memcpy(p, &v, 32); }

// 16 bytes of nibbles -> 32 bytes: the low nibbles (values 0..15), then the high ones (16..31)
inline __m256i nibble_pairs(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
  return _mm256_set_m128i(hi, lo);
}

// 32 bits -> 32 bytes, byte j = 16 where bit j is set (the fifth bit of Q5_0 / Q5_1)
inline __m256i fifth_bit_bytes(const uint8_t* qh4) {
  uint32_t bits;
  std::memcpy(&bits, qh4, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)),
                                             _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                              2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i mask = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(16));
}

inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ4_0>) {
  store32(reinterpret_cast<uint8_t*>(o.w), _mm256_sub_epi8(nibble_pairs(b + 2), _mm256_set1_epi8(8)));
  o.D = half(b), o.M = 0.f;
}
inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ4_1>) {
  store32(reinterpret_cast<uint8_t*>(o.w), nibble_pairs(b + 4));
  o.D = half(b), o.M = half(b + 2);
}
inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ5_0>) {
  const __m256i codes = _mm256_or_si256(nibble_pairs(b + 6), fifth_bit_bytes(b + 2));
  store32(reinterpret_cast<uint8_t*>(o.w), _mm256_sub_epi8(codes, _mm256_set1_epi8(16)));
  o.D = half(b), o.M = 0.f;
}
inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ5_1>) {
  store32(reinterpret_cast<uint8_t*>(o.w), _mm256_or_si256(nibble_pairs(b + 8), fifth_bit_bytes(b + 4)));
  o.D = half(b), o.M = half(b + 2);
}
inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kQ8_0>) {
  store32(reinterpret_cast<uint8_t*>(o.w), load32(b + 2));
  o.D = half(b), o.M = 0.f;
}
inline void unpack(const uint8_t* b, LBlock& o, std::integral_constant<int, kIQ4_NL>) {
  const __m256i table = _mm256_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                                         -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
  store32(reinterpret_cast<uint8_t*>(o.w), _mm256_shuffle_epi8(table, nibble_pairs(b + 2)));
  o.D = half(b), o.M = 0.f;
}

// Q3_K's sixteen 6-bit scales (12 bytes p): low 4 bits the low (j < 8) / high (j >= 8) nibbles of
// p[0..7]; top 2 bits bits 2(j / 4) of byte p[8 + j % 4] — as int16 minus 32, and m = 4·sc
inline void q3_k_scales(const uint8_t* p, KBlock& o) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(v, _mm_set1_epi8(15)),
                                         _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
  uint32_t t;
  std::memcpy(&t, p + 8, 4);
  const __m128i top = _mm_and_si128(_mm_setr_epi32(int(t), int(t >> 2), int(t >> 4), int(t >> 6)), _mm_set1_epi8(3));
  const __m256i sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_or_si128(low, _mm_slli_epi16(top, 4))),
                                      _mm256_set1_epi16(32));
  store16(o.sc, sc);
  store16(o.m, _mm256_slli_epi16(sc, 2));
}

// Q4_K / Q5_K: the 8 scales and 8 mins, each over its two 16-value halves
inline void k_scales_mins_simd(const uint8_t* s, KBlock& o) {
  alignas(16) uint8_t b[16];
  k_scales_mins_bytes(s, b);
  const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i twice = _mm_unpacklo_epi8(v, v), twice_m = _mm_unpackhi_epi8(v, v);  // each byte twice
  store16(o.sc, _mm256_cvtepu8_epi16(twice));
  store16(o.m, _mm256_cvtepu8_epi16(twice_m));
}

// A K-quant superblock as 8 steps of 32 unsigned codes (`Chunks<T>::at(c)`: values 32c..32c+31,
// computed in registers from the block's bytes) and its scales, mins and D / Dm / off (`scales`,
// into a KBlock's sc, m, D, Dm, off). `unpack` stores the 8 steps into u (the rows of a call share
// them); one token row multiplies them as they come (ggml_rows.h's row_k_one: no stores at all).
template <int T>
struct Chunks;

template <>
struct Chunks<kQ2_K> {
  const uint8_t* b;
  static void scales(const uint8_t* b, KBlock& o) {
    const __m256i sc = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    store16(o.sc, _mm256_and_si256(sc, _mm256_set1_epi16(15)));
    store16(o.m, _mm256_srli_epi16(sc, 4));
    o.D = half(b + 80), o.Dm = half(b + 82), o.off = 0;
  }
  __m256i at(int c) const {  // bits 2(c % 4) of q's half c / 4
    const __m256i q = load32(b + 16 + 32 * (c / 4));
    return _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), _mm256_set1_epi8(3));
  }
};

template <>
struct Chunks<kQ3_K> {
  const uint8_t* b;
  static void scales(const uint8_t* b, KBlock& o) {
    q3_k_scales(b + 96, o);
    o.D = o.Dm = half(b + 108), o.off = 4;
  }
  __m256i at(int c) const {  // 2 bits of q's half c / 4, and bit c of hmask at bit 2
    const __m256i q = load32(b + 32 + 32 * (c / 4)), hm = load32(b);
    const __m256i crumb = _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c % 4)), _mm256_set1_epi8(3));
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hm, c), _mm256_set1_epi8(1));
    return _mm256_or_si256(crumb, _mm256_slli_epi16(high, 2));
  }
};

template <>
struct Chunks<kQ4_K> {
  const uint8_t* b;
  static void scales(const uint8_t* b, KBlock& o) {
    k_scales_mins_simd(b + 4, o);
    o.D = half(b), o.Dm = half(b + 2), o.off = 0;
  }
  __m256i at(int c) const {  // the low (c even) or high nibbles of 32 bytes c / 2
    const __m256i q = load32(b + 16 + 32 * (c / 2));
    return c % 2 == 0 ? low_nibbles(q) : high_nibbles(q);
  }
};

template <>
struct Chunks<kQ5_K> {
  const uint8_t* b;
  static void scales(const uint8_t* b, KBlock& o) {
    k_scales_mins_simd(b + 4, o);
    o.D = half(b), o.Dm = half(b + 2), o.off = 0;
  }
  __m256i at(int c) const {  // Q4_K's nibbles with bit c of qh at bit 4
    const __m256i q = load32(b + 48 + 32 * (c / 2)), qh = load32(b + 16);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, c), _mm256_set1_epi8(1));
    return _mm256_or_si256(c % 2 == 0 ? low_nibbles(q) : high_nibbles(q), _mm256_slli_epi16(high, 4));
  }
};

template <>
struct Chunks<kQ6_K> {
  const uint8_t* b;
  static void scales(const uint8_t* b, KBlock& o) {
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    store16(o.sc, sc);
    store16(o.m, _mm256_slli_epi16(sc, 5));
    o.D = o.Dm = half(b + 208), o.off = 32;
  }
  __m256i at(int c) const {  // half h = c / 4, group g = c % 4: a nibble of ql, 2 bits of qh at bits 4-5
    const int h = c / 4, g = c % 4;
    const __m256i ql = load32(b + 64 * h + 32 * (g % 2)), bits = load32(b + 128 + 32 * h);
    const __m256i low = g < 2 ? low_nibbles(ql) : high_nibbles(ql);
    const __m256i top = g == 0 ? _mm256_slli_epi16(bits, 4) : g == 1 ? _mm256_slli_epi16(bits, 2)
                        : g == 2 ? bits : _mm256_srli_epi16(bits, 2);
    return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
  }
};

struct Stored {  // a block's codes unpacked into memory, as Chunks gives them
  const uint8_t* u;
  __m256i at(int c) const { return _mm256_load_si256(reinterpret_cast<const __m256i*>(u + 32 * c)); }
};

template <int T>
inline void unpack_chunks(const uint8_t* b, KBlock& o) {
  Chunks<T>::scales(b, o);
  const Chunks<T> chunks{b};
  for (int c = 0; c < 8; ++c) store32(o.u + 32 * c, chunks.at(c));
}

inline void unpack(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ2_K>) { unpack_chunks<kQ2_K>(b, o); }
inline void unpack(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ3_K>) { unpack_chunks<kQ3_K>(b, o); }
inline void unpack(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ4_K>) { unpack_chunks<kQ4_K>(b, o); }
inline void unpack(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ5_K>) { unpack_chunks<kQ5_K>(b, o); }
inline void unpack(const uint8_t* b, KBlock& o, std::integral_constant<int, kQ6_K>) { unpack_chunks<kQ6_K>(b, o); }

// A 32-value block's signed values in registers (the LBlock unpack above, without its store), and
// where its scale D and min M are: one token row multiplies 8 blocks a step (ggml_rows.h's row_l_one)
template <int T>
struct LValues;
template <>
struct LValues<kQ4_0> {
  static __m256i at(const uint8_t* b) { return _mm256_sub_epi8(nibble_pairs(b + 2), _mm256_set1_epi8(8)); }
};
template <>
struct LValues<kQ4_1> {
  static __m256i at(const uint8_t* b) { return nibble_pairs(b + 4); }
};
template <>
struct LValues<kQ5_0> {
  static __m256i at(const uint8_t* b) {
    return _mm256_sub_epi8(_mm256_or_si256(nibble_pairs(b + 6), fifth_bit_bytes(b + 2)), _mm256_set1_epi8(16));
  }
};
template <>
struct LValues<kQ5_1> {
  static __m256i at(const uint8_t* b) { return _mm256_or_si256(nibble_pairs(b + 8), fifth_bit_bytes(b + 4)); }
};
template <>
struct LValues<kQ8_0> {
  static __m256i at(const uint8_t* b) { return load32(b + 2); }
};
template <>
struct LValues<kIQ4_NL> {
  static __m256i at(const uint8_t* b) {
    const __m256i table = _mm256_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                                           -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
    return _mm256_shuffle_epi8(table, nibble_pairs(b + 2));
  }
};

// 8 vectors of 8 int32 lanes -> their 8 sums, in order (a tree of hadds; exact)
inline __m256i sums8(const __m256i* p) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// 8 fp16 at p, p + stride, ... -> fp32 (F16C: exact)
inline __m256 halves8(const uint8_t* p, int64_t stride) {
  uint16_t h[8];
  for (int j = 0; j < 8; ++j) std::memcpy(h + j, p + j * stride, 2);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}

// Σ_j sc_j Σ u·q over a block's 256 codes as `chunks` gives them (Chunks: computed in registers;
// Stored: unpacked in memory), 32 values a step: the pairs' products (u <= 63, |q| <= 127: no int16
// saturation) times sub-block 2c's scale in int16 lanes 0-7 and 2c + 1's in lanes 8-15. (On the
// Intel VM a 512-bit form of these steps — halves joined by vinserti64x4, scales spread by vpermw —
// ran 20-25 % slower: Q4_K 20.8 against 24.6 G values/s a thread. The AVX-512 variant has its own
// kdot_chunks of another form, SMOE_OWN_KDOT: avx512.cpp.) With m and bsums: minus Σ_j m_j · bsums_j
// in the same reduction (Q3_K, Q6_K: the offset is in m).
#ifndef SMOE_OWN_KDOT
template <class C>
inline int32_t kdot_chunks(const C& chunks, const int8_t* q, const int16_t* sc, const int16_t* m = nullptr,
                           const int16_t* bsums = nullptr) {
  const __m256i scales = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc));
  const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  __m256i acc = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i qq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
    const __m256i s = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(scales, _mm256_set1_epi32(c)), spread);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(chunks.at(c), qq), s));
  }
  if (m != nullptr)
    acc = _mm256_sub_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m)),
                                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsums))));
  return hsum_i32(acc);
}

// the same sums over a block unpacked into memory (batches: one unpacking for every row)
inline int32_t kdot(const uint8_t* u, const int8_t* q, const int16_t* sc) { return kdot_chunks(Stored{u}, q, sc); }
#endif

#define SMOE_GGML_FUSED 1  // ggml_rows.h: one token row multiplies Chunks as they come (the variant's kdot_chunks)
