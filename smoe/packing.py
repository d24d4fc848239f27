"""CPU inference fast path: linear weights pre-packed in oneDNN's blocked layout.

A plain bf16 ``F.linear`` matrix-vector product reads its weight at ~20-27 GB/s on our
2-core machine; the same product on a weight that oneDNN has reordered once into its
blocked layout reads at ~35 GB/s, and larger products run 1.1-2.2x faster too
(docs/BENCHMARKS.md, "Where the time goes"). Packing is a transform
(DESIGN.md): it swaps each frozen ``nn.Linear`` for a ``PackedLinear`` with the same
call, after the model is loaded; stacked experts (smoe/experts.py) hold their experts as
``PackedLinears``, each expert's gate and up projections one packed [2F, H] matrix (one
matrix-vector product instead of two per token).
The packed tensor is opaque — only oneDNN can read it — so a packed model is for
inference: training, LoRA and saving use an unpacked one.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.fsutil import release_pages

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


def pack_linears(model: nn.Module) -> int:
    """Replace every packable nn.Linear of a frozen CPU model (attention, output head; the
    experts are packed when they are stacked); returns how many linears were packed."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("pack_linears is for inference: call model.requires_grad_(False) first")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and can_pack(child.weight):
                try:
                    packed = PackedLinear(child)
                except RuntimeError:  # a oneDNN build without this dtype: keep the plain linear
                    continue
                setattr(parent, name, packed)
                release_pages(child.weight)  # the packed copy replaces the file's pages
                count += 1
    return count


def has_opaque_weights(model: nn.Module) -> bool:
    """Holds oneDNN-packed tensors, which torch.compile cannot trace through."""
    return any(isinstance(m, PackedLinear | PackedLinears) for m in model.modules())


def is_packed(model: nn.Module) -> bool:
    """Transformed for inference: packed weights or stacked experts (which no checkpoint layout names)."""
    from smoe.experts import StackedExperts
    from smoe.native import NativeInt4Linear, NativeInt8Linear, NativeLinear

    kinds = PackedLinear | StackedExperts | NativeLinear | NativeInt8Linear | NativeInt4Linear
    return any(isinstance(m, kinds) for m in model.modules())


def release_mmap(model: nn.Module) -> None:
    """Copy the tensors that still view the checkpoint's memory map (embeddings, norms,
    routers; quantized codes no backend repacked) into memory of their own, so the map — and
    the file pages it holds in the resident set — is released once packing has replaced the
    large weights."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.untyped_storage().resizable():  # a view into a buffer we did not allocate
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.layout == torch.strided and not b.untyped_storage().resizable():
                setattr(module, name, b.clone())
    if getattr(model.config, "tie_word_embeddings", False) and not isinstance(model.lm_head, PackedLinear):
        model.lm_head.weight = model.embed_tokens.weight
