// The ops' registration (torch.library, namespace smoe) and the Python module `smoe._native`.

#include <Python.h>

#include <torch/library.h>

#include "kernels.h"


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
