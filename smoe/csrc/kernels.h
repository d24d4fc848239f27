// smoe's native CPU kernels, what every file of them shares: the weight and activation formats
// as the kernels read them, bf16 scalars, the argument checks, and the declarations of each
// family's functions. native.cpp includes every file into one translation unit (all of it in
// this anonymous namespace: measured 15 % faster decode than separate objects). The families,
// one file each:
//
//   linear.cpp        linear_bf16 / _q8 / _q4: few token rows times one weight
//   moe.cpp           moe_bf16 / _q8 / _q4: all chosen experts of a MoE layer in one call
//   decode_layer.cpp  decode_layer(s), rms_norm: whole decoder layers of a decode step
//   activations.cpp   activation quantization to int8 blocks (and the op tests read it through)
//   common.cpp        argument checks, weight matrices, activation preparation
//   module.cpp        the ops' registration (torch.library, namespace smoe) and the Python module
//
// and the inner loops for an instruction set in files of their own: avx512.cpp (AVX-512 F/BW/VL/DQ
// with BF16 and VNNI dot products: the matrix-vector products, activation quantization, SiLU,
// attention), compiled for those instructions by a target pragma and called only after the CPU
// was asked at run time (`cpu_supported()`); the rest is plain x86-64, so the library loads on any
// CPU and Python falls back to PyTorch's kernels where it may not call them. A new instruction set
// adds its own file of the functions declared under "inner loops" below.
//
// Their fake implementations and the Python side are in smoe/kernels/ (ops.py, native.py,
// decode.py); docs/KERNELS.md explains the layouts and the numbers.
//
// Threads: output rows are split with at::parallel_for, torch's own pool.
//
// Shapes: M token rows, K inputs, N outputs; E experts, T tokens, F expert hidden, H hidden.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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

bool cpu_supported();  // AVX-512 F/BW/VL/DQ, BF16 and VNNI: what avx512.cpp needs

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

// R rows of K bf16 activations, one after another (activations.cpp)
void quantize_rows(const uint16_t* x, int64_t R, int64_t K, Kind kind, int64_t G, QRows& out);

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

// ------------------------------------------------------------------------------ inner loops (avx512.cpp)

// out[i] = bf16(bf16(silu(bf16(g[i]))) * bf16(up[i])): F.silu(gate) * up on bf16 tensors
void silu_mul(const float* g, const float* up, int64_t n, uint16_t* out);

// out[i * ldo + (n - n0)] = row rows[i] of the activations times weight row n, for n in [n0, n1)
void matvec(const Acts& a, const int64_t* rows, int64_t M, const Matrix& W, int64_t n0, int64_t n1, float* out,
            int64_t ldo);

// Attention of R query rows (fp32, [R, D]) over n keys/values (bf16 rows of D, `allowed` or all),
// out [R, D] fp32. scores: scratch of R * n floats.
void attend(const float* q, int64_t R, const uint16_t* keys, const uint16_t* values, const bool* allowed, int64_t n,
            int64_t D, float* scores, float* out);

// ------------------------------------------------------------------------------ common.cpp

void check(bool ok, const char* what);
void check_acts(const at::Tensor& x, int64_t K);
Matrix make_matrix(Kind kind, const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t G, int64_t e = -1);
Acts prepare(Kind kind, const uint16_t* x, int64_t M, int64_t K, int64_t G, QRows& storage);
int64_t tiles_grain(int64_t rows_per_tile_work);
Kind kind_of(const at::Tensor& w);
int64_t group_of(const at::Tensor& w, const at::Tensor& scale);
Matrix weight_matrix(const at::Tensor& w, const at::Tensor& scale);

// ------------------------------------------------------------------------------ the families

// linear.cpp
void linears_into(const uint16_t* x, int64_t M, const std::vector<Matrix>& Ws, const std::vector<uint16_t*>& ys);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sm, int64_t group_size);

// moe.cpp
at::Tensor moe(Kind kind, const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
               const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
               const c10::optional<at::Tensor>& down_scale, int64_t G);
at::Tensor moe_bf16(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                    const at::Tensor& gate_up, const at::Tensor& down);
at::Tensor moe_q8(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_scale, const at::Tensor& down,
                  const at::Tensor& down_scale);
at::Tensor moe_q4(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_sm, const at::Tensor& down,
                  const at::Tensor& down_sm, int64_t group_size);

// activations.cpp
at::Tensor quantize_activations(const at::Tensor& x, int64_t group_size);

// decode_layer.cpp
at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, double eps,
                        const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                        const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                        const at::Tensor& sin);
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> eps,
                         const at::Tensor& k_all, const at::Tensor& v_all, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& mask, int64_t kv_len, const at::Tensor& cos,
                         const at::Tensor& sin);

}  // namespace
