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
  m.def("linear_ggml(Tensor x, Tensor blocks, Tensor info) -> Tensor");
  m.def("moe_ggml(Tensor x, Tensor expert_indices, Tensor expert_weights, Tensor gate, Tensor up, Tensor gate_up_info, "
        "Tensor down, Tensor down_info) -> Tensor");
  m.def("quantize_activations(Tensor x, int group_size) -> Tensor");
  m.def("linear_prefill(Tensor x, Tensor w, Tensor? scale, int group_size, bool bf16_gemm=False) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor[] weights, int[] meta, float eps, Tensor(a!) k_all, Tensor(b!) v_all, "
        "Tensor slots, Tensor? mask, int kv_len, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] meta, float[] eps, Tensor(a!) k_all, Tensor(b!) v_all, "
        "Tensor slots, Tensor? mask, int kv_len, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_step(int[] tokens, Tensor embed, Tensor embed_scale, Tensor[] weights, int[] meta, float[] eps, Tensor(a!) k_all, "
        "Tensor(b!) v_all, Tensor slots, Tensor? mask, int kv_len, Tensor cos, Tensor sin, Tensor norm, "
        "float norm_eps, Tensor head, Tensor head_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_q8", &linear_q8);
  m.impl("linear_q4", &linear_q4);
  m.impl("moe_bf16", &moe_bf16);
  m.impl("moe_q8", &moe_q8);
  m.impl("moe_q4", &moe_q4);
  m.impl("linear_ggml", &linear_ggml);
  m.impl("moe_ggml", &moe_ggml);
  m.impl("quantize_activations", &quantize_activations);
  m.impl("linear_prefill", &linear_prefill);
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("decode_step", &decode_step);
}

// ------------------------------------------------------------------------------ the Python module

static PyObject* py_variants(PyObject*, PyObject*) {  // the variants this CPU runs, best first
  PyObject* names = PyList_New(0);
  for (const Loops* v : compiled_variants())
    if (v->supported()) {
      PyObject* name = PyUnicode_FromString(v->name);
      PyList_Append(names, name);
      Py_DECREF(name);
    }
  return names;
}

static PyObject* py_variant(PyObject*, PyObject*) { return PyUnicode_FromString(active_loops()->name); }

static PyObject* py_select(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(select_variant(name));
}

static PyMethodDef methods[] = {
    {"variants", py_variants, METH_NOARGS, "The kernel variants this CPU runs, best first (isa.h)."},
    {"variant", py_variant, METH_NOARGS, "The variant in use."},
    {"select", py_select, METH_O, "Use the named variant; False where this CPU cannot run it."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "smoe's native CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
