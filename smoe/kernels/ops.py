"""smoe's native CPU ops (the extension `smoe._native`, built from smoe/csrc/ by setup.py):
whether they run here, and their fake implementations for torch.compile and meta tensors.

The ops are `torch.library` ops in the `smoe` namespace, found by name (`torch.ops.smoe.*`):
linear_bf16 / _q8 / _q4 / _ggml (few rows by one weight; _ggml: GGUF's block formats),
linear_prefill (many rows: fp32 GEMMs over weight blocks widened to fp32, or bf16 GEMMs over them
rounded to bf16), moe_bf16 / _q8 / _q4 / _ggml (all chosen experts of a MoE layer),
quantize_activations, rms_norm, decode_layer / decode_layers (whole decoder layers of a decode
step), decode_step (a whole decode step: token ids to logits and greedy tokens). docs/KERNELS.md
has their layouts, arithmetic and measurements.

The kernels come in one variant per instruction set (smoe/csrc/isa.h: avx512, avx2-vnni, avx2,
neon, portable); the best this CPU runs is used unless SMOE_ISA names another it runs (to test
a lower one, or to compare them). `available()` is true when the extension was built (`make
install`), SMOE_NATIVE is not 0 and SMOE_ISA, if set, names a variant this CPU runs: the
portable variant runs on every CPU, so the native kernels are never off for want of
instructions.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

MAX_ROWS = 16  # token rows up to which the native kernels run; above, PyTorch's GEMMs

try:  # optional: built by `make install` where a compiler is (imported by name: it is not a Python module)
    _native = importlib.import_module("smoe._native")
except ImportError as error:  # not built: no compiler, or installed without torch at build time
    _native, _IMPORT_ERROR = None, str(error)
else:
    _IMPORT_ERROR = None

_noted = False
_ISA_ENV = "SMOE_ISA"
KNOWN_VARIANTS = ("avx512", "avx2-vnni", "avx2", "neon", "portable")


def variants() -> list[str]:
    """The kernel variants this CPU runs, best first (empty without the extension)."""
    return list(_native.variants()) if _native is not None else []


def variant() -> str | None:
    """The variant the kernels run now, or None where they do not run."""
    return _native.variant() if available() else None


def select(name: str) -> None:
    """Run the named variant from now on (tests compare every variant this CPU runs)."""
    if _native is None or not _native.select(name):
        runs = ", ".join(variants()) or "none"
        raise ValueError(f"kernel variant {name!r} does not run here (this CPU runs: {runs})")


def _select_from_env() -> str | None:
    """Select the variant SMOE_ISA names (once, at import); why it cannot be, or None."""
    name = os.environ.get(_ISA_ENV)
    if not name or _native is None:
        return None
    if name not in KNOWN_VARIANTS:
        return f"{_ISA_ENV}={name} is not a kernel variant (one of: {', '.join(KNOWN_VARIANTS)})"
    if not _native.select(name):
        return f"{_ISA_ENV}={name}: this CPU runs only {', '.join(variants())}"
    return None


_ISA_REASON = _select_from_env()


def isa_problem() -> str | None:
    """Why the variant SMOE_ISA names cannot run (not a variant, or not on this CPU), or None."""
    return _ISA_REASON


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    if _native is None:
        return f"the native extension is not built ({_IMPORT_ERROR}); `make install` builds it"
    if os.environ.get("SMOE_NATIVE", "1") == "0":
        return "SMOE_NATIVE=0"
    return _ISA_REASON


def available() -> bool:
    return unavailable_reason() is None


def note_fallback() -> None:
    """Say once per process that the PyTorch kernels run instead, and why."""
    global _noted
    reason = unavailable_reason()
    if reason is not None and not _noted:
        _noted = True
        print(f"smoe: native CPU kernels off ({reason}); using PyTorch's kernels", file=sys.stderr)


def few_rows(x: torch.Tensor) -> bool:
    """Rows the native kernels take: at most MAX_ROWS, bf16, not being differentiated."""
    return x.shape[0] <= MAX_ROWS and x.dtype == torch.bfloat16 and not x.requires_grad


if _native is not None:  # fake implementations: shapes only, for torch.compile and meta tensors
    def _rows_by(x, out_features):
        return x.new_empty(x.shape[0], out_features)

    def _like_x(x, *args):
        return torch.empty_like(x)

    torch.library.register_fake("smoe::linear_bf16")(lambda x, w: _rows_by(x, w.shape[0]))
    torch.library.register_fake("smoe::linear_q8")(lambda x, w, scale: _rows_by(x, w.shape[0]))
    torch.library.register_fake("smoe::linear_q4")(lambda x, codes, sm, group_size: _rows_by(x, codes.shape[0]))
    torch.library.register_fake("smoe::linear_ggml")(lambda x, blocks, info: _rows_by(x, blocks.shape[0]))
    for _op in ("moe_bf16", "moe_q8", "moe_q4", "moe_ggml", "rms_norm", "decode_layer", "decode_layers"):
        torch.library.register_fake(f"smoe::{_op}")(_like_x)
    torch.library.register_fake("smoe::linear_prefill")(
        lambda x, w, scale, group_size, bf16_gemm=False: _rows_by(x, w.shape[0]))
    torch.library.register_fake("smoe::quantize_activations")(
        lambda x, group_size: x.new_empty(x.shape, dtype=torch.float32))

    def _step(tokens, embed, *args):  # (logits [B, V], greedy tokens [B]); V is the head's rows
        head = args[-2]
        return embed.new_empty(len(tokens), head.shape[0]), embed.new_empty(len(tokens), dtype=torch.long)

    torch.library.register_fake("smoe::decode_step")(_step)
