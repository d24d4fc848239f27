// The AVX2 variants of the inner loops: avx2.h built twice, as `avx2` (AVX2 + FMA + F16C: Haswell
// and later, Zen 1-4) and as `avx2_vnni` (with AVX-VNNI's 256-bit vpdpbusd: Alder Lake and later,
// Zen 5), each under its own target pragma so the library itself stays plain x86-64 and either
// runs only where cpu_supports said the CPU has its instructions. Activation quantization gives
// portable.cpp's bytes (selftest.cpp compares them).

#include "isa.h"
#include "rows.h"

#if defined(__x86_64__)

#include <immintrin.h>

namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define SMOE_AVX2_VNNI 0
#include "avx2.h"
#undef SMOE_AVX2_VNNI

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

const Loops loops = {"avx2", supported, matvec, quantize_row, silu_mul, attend, dequantize_rows, ggml_matvec, ggml_dequantize};
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avx2_vnni {
#define SMOE_AVX2_VNNI 1
#include "avx2.h"
#undef SMOE_AVX2_VNNI

bool supported() { return avx2::supported() && __builtin_cpu_supports("avxvnni"); }

const Loops loops = {"avx2-vnni", supported, matvec, quantize_row, silu_mul, attend, dequantize_rows, ggml_matvec, ggml_dequantize};
}  // namespace avx2_vnni
#pragma GCC pop_options

}  // namespace

#endif  // __x86_64__
