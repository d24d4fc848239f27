"""The oneDNN backend: linear weights packed once at load in oneDNN's blocked layout.

A plain bf16 ``F.linear`` matrix-vector product reads its weight at ~20-27 GB/s on our
2-core machine; the same product on a weight that oneDNN has reordered once into its
blocked layout reads at ~35 GB/s, and larger products run 1.1-2.2x faster too
(docs/BENCHMARKS.md, "Where the time goes"). The backend (registered
below, asked after the native kernels) swaps each frozen bias-free ``nn.Linear`` for a
``PackedLinear`` with the same call; stacked experts (smoe/experts.py) hold their experts as
``PackedLinears``, each expert's gate and up projections one packed [2F, H] matrix (one
matrix-vector product instead of two per token).
The packed tensor is opaque — only oneDNN can read it — so a packed model is for
inference: training, LoRA and saving use an unpacked one.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.fsutil import release_pages
from smoe.kernels.registry import Backend, Target

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """y = x·Wᵀ for a frozen W stored in oneDNN's layout (no bias: Mixtral has none)."""

    opaque_to_compile = True  # torch.compile cannot trace through a oneDNN-packed tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free linears only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        # batch-size hint 1: tuned for decode; measured as fast as the default for prefill too
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [N, in]
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, None, "none", [], "")  # [N, out]
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class PackedLinears(nn.Module):
    """The stacked-experts kind for oneDNN: one packed matrix per expert (the packed layout is
    opaque, so the experts cannot share one tensor); CPU only, so no gathered path. The decode
    path calls oneDNN directly on `weights[e]`, without a module call per expert."""

    opaque_to_compile = True

    def __init__(self, weights: list[torch.Tensor], in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for e, w in enumerate(weights):
            self.register_buffer(f"packed_{e}", w, persistent=False)
        self.weights = weights  # the same tensors, by expert index (packed models never move devices)

    @staticmethod
    def stack(rows: list[list[nn.Linear]]) -> PackedLinears:
        packed = []
        for row in rows:
            weight = torch.cat([lin.weight.detach() for lin in row]) if len(row) > 1 else row[0].weight.detach()
            packed.append(torch.ops.mkldnn._reorder_linear_weight(weight, 1))  # batch-size hint 1, as PackedLinear
            for lin in row:
                release_pages(lin.weight)  # the packed copy replaces the file's pages
        return PackedLinears(packed, weight.shape[1], weight.shape[0])

    @property
    def num_experts(self) -> int:
        return len(self.weights)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's product for rows x [n, in] -> [n, out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weights[e], None, "none", [], "")

    def extra_repr(self) -> str:
        return f"experts={len(self.weights)}, in_features={self.in_features}, out_features={self.out_features}"


def onednn_linear(linear: nn.Linear) -> PackedLinear | None:
    """A frozen bias-free linear in oneDNN's layout, or None where oneDNN cannot take it."""
    if linear.bias is not None or linear.weight.requires_grad or not can_pack(linear.weight):
        return None
    try:
        return PackedLinear(linear)
    except RuntimeError:  # a oneDNN build without this dtype: keep the plain linear
        return None


def onednn_stack(rows: list[list[nn.Linear]]) -> PackedLinears | None:
    if not can_pack(rows[0][0].weight):
        return None
    try:
        return PackedLinears.stack(rows)
    except RuntimeError:  # a oneDNN build without this dtype: keep the plain layout
        return None


def refuses(target: Target) -> str | None:
    if target.device != "cpu":
        return f"oneDNN packs CPU weights; the model is on {target.device}"
    if target.compile:
        return "a compiled decode step packs its frozen weights itself (inductor)"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch has no oneDNN"
    return None


BACKEND = Backend("onednn", ("plain",), refuses, linear=onednn_linear, stack=onednn_stack,
                  kinds=(PackedLinear, PackedLinears))
