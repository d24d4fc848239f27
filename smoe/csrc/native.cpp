// smoe's native CPU kernels, built as ONE translation unit from the files below (setup.py
// compiles this file only): every function is internal to it (an anonymous namespace), so GCC
// specializes and inlines across the families as it sees fit. Compiled as separate objects with
// external linkage the same code decoded 15 % slower on the benchmark checkpoint (bf16, 2
// threads, Xeon SPR: smoe::decode_layers 28.9 -> 34.7 ms a step), so the files are parts of one
// unit for the compiler and one topic each for the reader (kernels.h and isa.h list them).

#include <Python.h>  // first, as Python asks (module.cpp defines the module)

#include "kernels.h"

// the inner loops, one file per instruction set, then the table that picks one (isa.h)
#include "portable.cpp"
#include "avx512.cpp"
#include "avx2.cpp"
#include "neon.cpp"
#include "variants.cpp"

// the families
#include "activations.cpp"
#include "common.cpp"
#include "decode_layer.cpp"
#include "linear.cpp"
#include "moe.cpp"
#include "prefill.cpp"
#include "module.cpp"
