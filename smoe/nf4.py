"""4-bit NormalFloat (NF4), the QLoRA base format (training); int8 / int4 for inference are in quantize.py.

NF4 (Dettmers et al. 2023, QLoRA, section 3): each block of 64 weights is divided by its
absolute maximum and every value is replaced by the nearest of 16 levels placed at
quantiles of a standard normal (so each level is equally used by normally distributed
weights), 4 bits per weight, two per byte (first value in the high nibble, as
bitsandbytes packs them).

Double quantization: the fp32 absmax of each 64-block would cost 0.5 bit per weight; it is
stored instead as 8 bits per block: minus its mean, scaled per group of 256 blocks by that
group's largest magnitude into int8 (127 levels each side). bitsandbytes quantizes the same
constants with its 8-bit "dynamic" float code; both cost 8 bits per block and a little
error on the scale (tests/test_quantize.py compares ours with bitsandbytes').

`NF4Linear` dequantizes its weight on the fly in every forward (and so in every backward
through the input), which is what QLoRA needs: a frozen 4-bit base under trainable adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import SmoeError

# The 16 NF4 levels as published with QLoRA / bitsandbytes.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def nf4_codes(normalized: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for values in [-1, 1]: compare with the 15 midpoints."""
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # [15]
    return torch.bucketize(normalized, midpoints.to(normalized.device), right=False).to(torch.uint8)


def quantize_nf4(weight: torch.Tensor, block: int = 64, double_quant: bool = True,
                 dq_block: int = 256) -> dict[str, torch.Tensor]:
    """weight (any shape, numel divisible by block) -> packed codes and scales."""
    w = weight.detach().float().reshape(-1)
    if w.numel() % block or block % 2:
        raise SmoeError(f"NF4 needs a weight whose size ({w.numel()}) is a multiple of the block ({block})")
    blocks = w.view(-1, block)  # [n_blocks, block]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = nf4_codes(normalized).view(-1, 2)  # [numel/2, 2]
    packed = (codes[:, 0] << 4) | codes[:, 1]  # [numel/2] uint8, first value in the high nibble
    out = {"packed": packed, "shape": torch.tensor(list(weight.shape)), "block": torch.tensor(block)}
    if not double_quant:
        out["absmax"] = absmax
        return out
    offset = absmax.mean()
    centered = absmax - offset
    pad = (-len(centered)) % dq_block
    groups = F.pad(centered, (0, pad)).view(-1, dq_block)  # [n_groups, dq_block]
    scale = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [n_groups]
    q = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: len(centered)]
    out.update({"absmax_q": q, "absmax_scale": scale, "absmax_offset": offset.reshape(1),
                "dq_block": torch.tensor(dq_block)})
    return out


def nf4_absmax(q: dict[str, torch.Tensor]) -> torch.Tensor:
    if "absmax" in q:
        return q["absmax"]
    dq_block = int(q["dq_block"])
    scale = q["absmax_scale"].repeat_interleave(dq_block)[: len(q["absmax_q"])]
    return q["absmax_q"].float() * scale + q["absmax_offset"]


def dequantize_nf4(q: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    packed = q["packed"]
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()  # [numel]
    block = int(q["block"])
    values = NF4_LEVELS.to(packed.device)[codes].view(-1, block) * nf4_absmax(q)[:, None]
    return values.view(*q["shape"].tolist()).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x · dequant(W)ᵀ that rebuilds W again in backward instead of keeping it: the frozen
    base then costs its 4-bit storage, not a full-precision copy per layer, while training."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: NF4Linear, dtype: torch.dtype) -> torch.Tensor:
        ctx.module, ctx.dtype = module, dtype
        return F.linear(x.to(dtype), dequantize_nf4(module.quantized(), dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = dequantize_nf4(ctx.module.quantized(), grad_out.dtype)  # [out, in]
        return grad_out @ weight, None, None


class NF4Linear(nn.Module):
    """A frozen bias-free linear stored in NF4; the weight is rebuilt for each forward."""

    def __init__(self, linear: nn.Linear, block: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        if linear.bias is not None:
            raise SmoeError("NF4Linear quantizes bias-free linears only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, t in quantize_nf4(linear.weight, block, double_quant).items():
            self.register_buffer(name, t.to(linear.weight.device))

    def quantized(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast (QLoRA training in bf16) rebuild the weight directly in the compute dtype
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4Matmul.apply(x, self, dtype)
        return F.linear(x.to(dtype), dequantize_nf4(self.quantized(), dtype))  # [out, in], rebuilt each call


def _nf4_expert(expert: nn.Module, block: int, double_quant: bool) -> nn.Module:
    for name in ("w1", "w2", "w3"):
        setattr(expert, name, NF4Linear(getattr(expert, name), block, double_quant))
    return expert


def quantize_model_nf4(model, include_lm_head: bool = False, block: int = 64, double_quant: bool = True) -> int:
    """Swap the attention and expert linears (and optionally lm_head) for NF4Linear; the
    router, norms and embeddings stay in high precision. Returns how many were swapped."""
    count = 0
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.attn, name, NF4Linear(getattr(layer.attn, name), block, double_quant))
            count += 1
        layer.moe.experts.map_experts(lambda expert: _nf4_expert(expert, block, double_quant))
        count += 3 * len(layer.moe.experts)
    if include_lm_head:
        model.lm_head = NF4Linear(model.lm_head, block, double_quant)
        count += 1
    model.requires_grad_(False)
    return count
