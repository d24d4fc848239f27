"""How each weight is multiplied: the backends, asked in the order registered below, and the
plain PyTorch reference of each weight format (smoe/weights.py) last.

    registry.py  Backend, Target, Kernels (the backends one load uses; which ran what, and why not)
    ops.py       the native extension's ops: availability, fake implementations
    native.py    the native kernels' weight kinds (bf16, int8, int4) and their repacking
    decode.py    the decode-step plan: a decode step's layers as native calls
    aten.py      aten's weight-only int4 CPU kernel, its layout made at load
    onednn.py    oneDNN-packed bf16 / fp32 linears

A backend is added by its module and one line here; the loader asks `for_load(target)`.
"""

from __future__ import annotations

from smoe.kernels import aten, native, onednn
from smoe.kernels.registry import PLAIN, Backend, Kernels, Target, backends, in_inference_layout, register_backend

__all__ = ["PLAIN", "Backend", "Kernels", "Target", "backends", "for_load", "in_inference_layout",
           "register_backend"]

# the order each weight is offered to them: the native kernels where this CPU runs them, then
# aten's int4 kernel, then oneDNN; a weight none of them takes runs its format's plain reference
register_backend(native.BACKEND)
register_backend(aten.BACKEND)
register_backend(onednn.BACKEND)


def for_load(target: Target) -> Kernels:
    """The backends a load with this target uses, each asked in order."""
    return Kernels(target)
