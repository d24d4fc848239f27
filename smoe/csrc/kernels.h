// smoe's native CPU kernels, the torch side: argument checks and weight matrices from tensors,
// and the declarations of each family's functions. The formats, scalars and instruction-set
// variants of the inner loops are isa.h's (torch-free). native.cpp includes every file into one
// translation unit (all of it in an anonymous namespace: measured 15 % faster decode than
// separate objects). The families, one file each:
//
//   linear.cpp        linear_bf16 / _q8 / _q4: few token rows times one weight
//   moe.cpp           moe_bf16 / _q8 / _q4: all chosen experts of a MoE layer in one call
//   decode_layer.cpp  decode_layer(s), decode_step, rms_norm: whole decoder layers / a whole decode step
//   prefill.cpp       linear_prefill: many rows, weights rebuilt a block at a time, fp32 or bf16 GEMMs
//   activations.cpp   activation quantization to int8 blocks, as the op tests read it
//   common.cpp        argument checks, weight matrices, activation preparation
//   module.cpp        the ops' registration (torch.library, namespace smoe) and the Python module
//
// and the inner loops, one file per instruction set (isa.h lists them: avx512.cpp, avx2.cpp,
// neon.cpp, portable.cpp; variants.cpp picks one at load), each compiled for its instructions by
// a target pragma and called only where the CPU has them: the library itself is built for the
// plain architecture and loads on any CPU of it.
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

#include "isa.h"

namespace {

// ------------------------------------------------------------------------------ common.cpp

void check(bool ok, const char* what);
void check_acts(const at::Tensor& x, int64_t K);
Matrix make_matrix(Kind kind, const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t G, int64_t e = -1);
Acts prepare(Kind kind, const uint16_t* x, int64_t M, int64_t K, int64_t G, QRows& storage);
int64_t tiles_grain(int64_t rows_per_tile_work);
Matrix ggml_matrix(const at::Tensor& blocks, int type, int64_t e = -1);
Kind kind_of(const at::Tensor& w, const at::Tensor& scale);
int64_t group_of(const at::Tensor& w, const at::Tensor& scale);
Matrix weight_matrix(const at::Tensor& w, const at::Tensor& scale);

// ------------------------------------------------------------------------------ the families

// linear.cpp
void linears_into(const uint16_t* x, int64_t M, const std::vector<Matrix>& Ws, const std::vector<uint16_t*>& ys);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sm, int64_t group_size);

at::Tensor linear_ggml(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& info);

// moe.cpp
at::Tensor moe(Kind kind, const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
               const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
               const c10::optional<at::Tensor>& down_scale, int64_t G, const at::Tensor& up = at::Tensor());
at::Tensor moe_ggml(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                    const at::Tensor& gate, const at::Tensor& up, const at::Tensor& gate_up_info,
                    const at::Tensor& down, const at::Tensor& down_info);
at::Tensor moe_bf16(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                    const at::Tensor& gate_up, const at::Tensor& down);
at::Tensor moe_q8(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_scale, const at::Tensor& down,
                  const at::Tensor& down_scale);
at::Tensor moe_q4(const at::Tensor& x, const at::Tensor& expert_indices, const at::Tensor& expert_weights,
                  const at::Tensor& gate_up, const at::Tensor& gate_up_sm, const at::Tensor& down,
                  const at::Tensor& down_sm, int64_t group_size);

// prefill.cpp
at::Tensor linear_prefill(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                          int64_t group_size, bool bf16_gemm);

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
std::tuple<at::Tensor, at::Tensor> decode_step(at::IntArrayRef tokens, const at::Tensor& embed,
                                               const at::Tensor& embed_scale, at::TensorList w,
                                               at::IntArrayRef meta, at::ArrayRef<double> eps,
                                               const at::Tensor& k_all, const at::Tensor& v_all,
                                               const at::Tensor& slots, const c10::optional<at::Tensor>& mask,
                                               int64_t kv_len, const at::Tensor& cos, const at::Tensor& sin,
                                               const at::Tensor& norm, double norm_eps, const at::Tensor& head,
                                               const at::Tensor& head_scale);

}  // namespace
