// The kernel self-test: every variant this CPU runs against the portable one, without torch, at
// awkward shapes (K not a multiple of the vector width, N not a multiple of 4, 1..16 token rows,
// int4 groups 32..256). Built alone — for this machine or cross-compiled, e.g. for aarch64 and run
// under qemu (`make neon-selftest`; tests/test_native.py runs both where the tools are).
//
//   matvec       bf16 / q8 / q4 results within 1e-5 of sum |x·w| (only the order of fp32 sums differs)
//   quantize_row the same bytes, block scales and group sums
//   silu_mul     within one bf16 step (the exp polynomial against std::exp)
//   attend       within 1e-5 of the largest output
//   dequantize_rows  the same fp32 bits
//   ggml_matvec  the same fp32 bits (GGML blocks: exact integer sums, one order of fp32 operations)
//
// Prints one line per variant and check; exits 1 on any failure, 0 otherwise.

#include <cstdio>
#include <random>

#include "isa.h"
#include "portable.cpp"
#include "avx512.cpp"
#include "avx2.cpp"
#include "neon.cpp"
#include "variants.cpp"

namespace {

std::mt19937 rng(1234);

std::vector<uint16_t> random_bf16(int64_t n, float scale) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f32_to_bf16(normal(rng));
  return v;
}

template <class T>
std::vector<T> random_bytes(int64_t n, int lo, int hi) {
  std::uniform_int_distribution<int> pick(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(pick(rng));
  return v;
}

int failures = 0;

void expect(bool ok, const char* variant, const char* what, int64_t M, int64_t N, int64_t K, double err) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %-10s %-12s M=%lld N=%lld K=%lld error %.3g\n", variant, what, (long long)M, (long long)N,
                (long long)K, err);
  }
}

// one weight matrix of each kind times M rows, through `v` and through portable
void check_matvec(const Loops& v, Kind kind, int64_t M, int64_t N, int64_t K, int64_t G) {
  const std::vector<uint16_t> x = random_bf16(M * K, 1.f);
  std::vector<uint16_t> wb;
  std::vector<int8_t> wq8;
  std::vector<uint8_t> wq4;
  std::vector<float> scale;
  std::vector<uint16_t> sm;
  Matrix W{kind, N, K, nullptr, nullptr, nullptr, G};
  if (kind == kBf16) {
    wb = random_bf16(N * K, 0.05f);
    W.w = wb.data();
  } else if (kind == kQ8) {
    wq8 = random_bytes<int8_t>(N * K, -128, 127);  // -128 too: a file may hold it
    scale.assign(N, 0.001f);
    W.w = wq8.data();
    W.scale = scale.data();
  } else {
    wq4 = random_bytes<uint8_t>(N * K / 2, 0, 255);
    sm = random_bf16(N * 2 * (K / G), 0.01f);
    W.w = wq4.data();
    W.sm = sm.data();
  }
  std::vector<float> ref(M * N), got(M * N);
  std::vector<int64_t> rows(M);
  for (int64_t i = 0; i < M; ++i) rows[i] = M - 1 - i;  // rows in another order than stored
  QRows q_ref, q_got;
  Acts a{kind, {}, nullptr};
  for (int64_t i = 0; i < M; ++i) a.bf.push_back(x.data() + i * K);
  if (kind != kBf16) {
    active_loops() = &portable::loops;
    quantize_rows(x.data(), M, K, kind, G, q_ref);
    active_loops() = &v;
    quantize_rows(x.data(), M, K, kind, G, q_got);
    const bool same = q_ref.q == q_got.q && q_ref.sv == q_got.sv && q_ref.gs == q_got.gs;
    expect(same, v.name, "quantize_row", M, 0, K, 0);
    a.q = &q_ref;
  }
  portable::loops.matvec(a, rows.data(), M, W, 0, N, ref.data(), N);
  v.matvec(a, rows.data(), M, W, 0, N, got.data(), N);
  // a bound on the fp32 sums' rounding: K * eps * sum |terms|, estimated by |ref| + the rows' scale
  double worst = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    const double bound = 1e-5 * (std::fabs(ref[i]) + std::sqrt(double(K)) * (kind == kBf16 ? 0.05 : 0.2));
    worst = std::max(worst, std::fabs(double(ref[i]) - got[i]) / bound);
  }
  static const char* names[] = {"matvec bf16", "matvec q8", "matvec q4"};
  expect(worst <= 1.0, v.name, names[kind], M, N, K, worst);
  if (M == 1) {  // the rows prefill's GEMMs read: the same bits
    std::vector<float> ref_rows(N * K), got_rows(N * K);
    portable::dequantize_rows(W, 0, N, ref_rows.data());
    v.dequantize_rows(W, 0, N, got_rows.data());
    expect(ref_rows == got_rows, v.name, "dequantize", M, N, K, 0);
  }
}

void check_silu(const Loops& v) {
  std::normal_distribution<float> normal(0.f, 4.f);
  const int64_t n = 1000;
  std::vector<float> g(n), up(n);
  for (int64_t i = 0; i < n; ++i) g[i] = normal(rng), up[i] = normal(rng);
  g[0] = -200.f, g[1] = 200.f, g[2] = 0.f;  // exp's ends
  std::vector<uint16_t> ref(n), got(n);
  portable::silu_mul(g.data(), up.data(), n, ref.data());
  v.silu_mul(g.data(), up.data(), n, got.data());
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = bf16_to_f32(ref[i]), o = bf16_to_f32(got[i]);
    worst = std::max(worst, std::fabs(r - o) / (std::fabs(r) * 0.0079 + 1e-30));  // 2 bf16 steps
  }
  expect(worst <= 1.0, v.name, "silu_mul", 1, n, 0, worst);
}

void check_attend(const Loops& v, int64_t R, int64_t n, int64_t D) {
  const std::vector<uint16_t> keys = random_bf16(n * D, 1.f), values = random_bf16(n * D, 1.f);
  std::vector<float> q(R * D);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& t : q) t = normal(rng);
  std::vector<uint8_t> allowed_bytes = random_bytes<uint8_t>(n, 0, 3);
  bool allowed[4096];
  for (int64_t s = 0; s < n; ++s) allowed[s] = allowed_bytes[s] != 0 || s == n - 1;
  std::vector<float> scores(R * n), ref(R * D), got(R * D);
  portable::attend(q.data(), R, keys.data(), values.data(), allowed, n, D, scores.data(), ref.data());
  v.attend(q.data(), R, keys.data(), values.data(), allowed, n, D, scores.data(), got.data());
  double worst = 0, top = 0;
  for (int64_t i = 0; i < R * D; ++i) top = std::max(top, double(std::fabs(ref[i])));
  for (int64_t i = 0; i < R * D; ++i) worst = std::max(worst, std::fabs(double(ref[i]) - got[i]) / (1e-5 * top + 1e-30));
  expect(worst <= 1.0, v.name, "attend", R, n, D, worst);
}

// GGML blocks (ggml_rows.h): random blocks with finite fp16 scales (some subnormal), M rows; the
// variant's products the same bits as portable's (exact integer sums, one order of fp32 operations)
void check_ggml(const Loops& v, int type, int64_t M, int64_t N, int64_t K) {
  const BlockFormat f = block_format(type);
  const int64_t row_bytes = K / f.elems * f.bytes;
  std::vector<uint8_t> w = random_bytes<uint8_t>(N * row_bytes, 0, 255);
  int scales[2] = {-1, -1};
  switch (type) {
    case kQ2_K: scales[0] = 80, scales[1] = 82; break;
    case kQ3_K: scales[0] = 108; break;
    case kQ6_K: scales[0] = 208; break;
    case kQ4_1: case kQ5_1: case kQ4_K: case kQ5_K: scales[0] = 0, scales[1] = 2; break;
    default: scales[0] = 0;
  }
  std::uniform_int_distribution<int> exponent(1, 18);  // fp16 bits: subnormals (exponent 0) to ~0.06
  std::uniform_int_distribution<int> mantissa(0, 1023);
  for (int64_t b = 0; b < N * K / f.elems; ++b)
    for (int at : scales) {
      if (at < 0) continue;
      const int e = exponent(rng) - 4;  // a quarter of them subnormal
      const uint16_t h = uint16_t((b & 1) << 15 | (e > 0 ? e : 0) << 10 | mantissa(rng));
      std::memcpy(w.data() + b * f.bytes + at, &h, 2);
    }
  const std::vector<uint16_t> x = random_bf16(M * K, 1.f);
  Matrix W{kGgml, N, K, w.data(), nullptr, nullptr, 0};
  W.gtype = type;
  W.row_bytes = row_bytes;
  QRows q;
  quantize_rows(x.data(), M, K, kGgml, act_formats(type), q);
  Acts a{kGgml, {}, &q};
  std::vector<int64_t> rows(M);
  for (int64_t i = 0; i < M; ++i) rows[i] = M - 1 - i;
  std::vector<float> ref(M * N), got(M * N);
  portable::loops.ggml_matvec(a, rows.data(), M, W, 0, N, ref.data(), N);
  v.ggml_matvec(a, rows.data(), M, W, 0, N, got.data(), N);
  bool same = true;
  for (int64_t i = 0; i < M * N; ++i) same &= std::memcmp(&ref[i], &got[i], 4) == 0;
  expect(same, v.name, "ggml matvec", M, N, K, double(type));
  std::vector<float> ref_rows(N * K), got_rows(N * K);  // prefill's rows: the same bits
  portable::loops.ggml_dequantize(type, w.data(), row_bytes, K, 0, N, ref_rows.data());
  v.ggml_dequantize(type, w.data(), row_bytes, K, 0, N, got_rows.data());
  expect(std::memcmp(ref_rows.data(), got_rows.data(), 4 * N * K) == 0, v.name, "ggml dequantize", M, N, K,
         double(type));
}

}  // namespace

int main() {
  int variants = 0;
  for (const Loops* v : compiled_variants()) {
    if (!v->supported() || v == &portable::loops) continue;
    ++variants;
    const int before = failures;
    for (int64_t M : {1, 2, 3, 4, 5, 8, 13, 16})
      for (int64_t K : {32, 96, 100, 224, 1000, 1024})
        for (int64_t N : {1, 3, 4, 7}) {
          check_matvec(*v, kBf16, M, N, K, 0);
          check_matvec(*v, kQ8, M, N, K, 0);
          for (int64_t G : {32, 64, 128, 256})
            if (K % G == 0) check_matvec(*v, kQ4, M, N, K, G);
        }
    for (int type : {kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kIQ4_NL, kQ2_K, kQ3_K, kQ4_K, kQ5_K, kQ6_K})
      for (int64_t M : {1, 3, 16})
        for (int64_t K : {256, 768}) check_ggml(*v, type, M, 5, is_k_quant(type) ? K : K - 32);
    check_silu(*v);
    for (int64_t R : {1, 4, 9})
      for (int64_t D : {8, 64, 100, 128, 256, 264}) check_attend(*v, R, 37, D);
    std::printf("%-10s %s\n", v->name, failures == before ? "ok" : "FAILED");
  }
  std::printf("%d variant(s) besides portable checked, %d failure(s)\n", variants, failures);
  return failures == 0 ? 0 : 1;
}
