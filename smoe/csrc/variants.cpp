// The variants compiled into this library, which one runs, and the activation rows every
// variant reads (torch-free: selftest.cpp builds it alone).

#include "isa.h"

namespace {

const std::vector<const Loops*>& compiled_variants() {  // best first
  static const std::vector<const Loops*> all = {
#if defined(__x86_64__)
      &avx512::loops, &avx2_vnni::loops, &avx2::loops,
#endif
#if defined(__aarch64__)
      &neon::loops,
#endif
      &portable::loops,
  };
  return all;
}

const Loops*& active_loops() {  // the best variant this CPU runs, until select_variant says otherwise
  static const Loops* active = [] {
    for (const Loops* v : compiled_variants())
      if (v->supported()) return v;
    return &portable::loops;
  }();
  return active;
}

bool select_variant(const char* name) {
  for (const Loops* v : compiled_variants())
    if (std::strcmp(v->name, name) == 0 && v->supported()) {
      active_loops() = v;
      return true;
    }
  return false;
}

void quantize_rows(const uint16_t* x, int64_t R, int64_t K, Kind kind, int64_t G, QRows& out) {
  if (kind == kGgml) {  // as llama.cpp quantizes them (ggml.h); G: the formats the call's types read
    quantize_act_rows(x, R, K, G, out.blocks);
    return;
  }
  const int64_t step = chunk_of(kind);
  out.K = K;
  out.Kp = (K + step - 1) / step * step;
  out.G = G;
  out.ng = kind == kQ8 ? 1 : K / G;
  out.q.assign(R * out.Kp, 0);
  out.sv.assign(R * (out.Kp / step) * 16, 0.f);
  out.gs.assign(R * out.ng, 0.f);
  for (int64_t r = 0; r < R; ++r)
    quantize_row(x + r * K, K, kind, G, out.q.data() + r * out.Kp, out.sv.data() + r * (out.Kp / step) * 16,
                 out.gs.data() + r * out.ng);
}

}  // namespace
