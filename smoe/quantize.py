"""Weight-only quantization transforms. For now: 4-bit NormalFloat (NF4), the QLoRA base format.

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

from smoe.checkpoint import release_pages
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
        self.compute_dtype = linear.weight.dtype
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

    @property
    def weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())


def quantize_model_nf4(model, include_lm_head: bool = False, block: int = 64, double_quant: bool = True) -> int:
    """Swap the attention and expert linears (and optionally lm_head) for NF4Linear; the
    router, norms and embeddings stay in high precision. Returns how many were swapped."""
    count = 0
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.attn, name, NF4Linear(getattr(layer.attn, name), block, double_quant))
            count += 1
        for expert in layer.moe.experts:
            for name in ("w1", "w2", "w3"):
                setattr(expert, name, NF4Linear(getattr(expert, name), block, double_quant))
                count += 1
    if include_lm_head:
        model.lm_head = NF4Linear(model.lm_head, block, double_quant)
        count += 1
    model.requires_grad_(False)
    return count


# ---------------------------------------------------------------------------------------
# Weight-only int8 and int4 for inference (the speed issue): weights stored in 8 or 4 bits,
# activations and accumulation in the model dtype.
#
# int8: symmetric per output channel, w ≈ q · scale[n], q in [-127, 127].
# int4: asymmetric per group of G input columns (G = 32, 64, 128 or 256):
#       w ≈ (q - 8) · scale[n, g] + zero[n, g], q in [0, 15], zero = min + 8 · scale.
#
# Decode multiplies few rows: PyTorch's weight-only CPU kernels (_weight_int8pack_mm,
# _weight_int4pack_mm_for_cpu) read the small weights directly; their cost grows with every
# row. Prefill multiplies many rows: there the weight is dequantized and multiplied with a
# bf16 GEMM, a fixed cost per weight. The dequantization goes a block of output rows at a
# time (DEQUANT_BLOCK_BYTES of bf16 each), so its temporaries stay in the caches: whole-matrix
# dequantization of a Mixtral-8x7B expert projection took 230 ms (int4) and 83 ms (int8),
# ~30x the kernels' per-row cost. KERNEL_MAX_ROWS picks the crossover per kind
# (benchmarks/bench_kernels.py --rows 1,4,16,32,64,128,256).
# ---------------------------------------------------------------------------------------

KERNEL_MAX_ROWS = {8: 24, 4: 96}
DEQUANT_BLOCK_BYTES = 1 << 20
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_BLOCK_N = 64  # rows per block in the int4 layout below


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale fp32 [N]) with w ≈ q · scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q uint8 codes 0..15 [N, K], scale [N, K/G], zero [N, K/G]), fp32 scales."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)  # [N, K/G, G]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/G]
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(N, K), scale, lo + 8 * scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> bytes [N, K/2] in the layout of PyTorch's CPU int4 kernel:
    rows in blocks of 64; the block's bytes, viewed as [K, 32], hold at (k, j) row j's code
    of column k in the low nibble and row 32+j's in the high nibble. (A test checks this
    equals torch.ops.aten._convert_weight_to_int4pack_for_cpu.)"""
    N, K = q.shape
    blocks = q.view(N // INT4_BLOCK_N, 2, 32, K).to(torch.uint8)  # [N/64, half, j, K]
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [N/64, 32, K]
    return packed.transpose(1, 2).contiguous().view(N, K // 2)  # [N/64, K, 32] as [N, K/2]


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of pack_int4: bytes [N, K/2] -> codes [N, K] (uint8)."""
    N = packed.shape[0]
    b = packed.view(N // INT4_BLOCK_N, K, 32)  # [N/64, K, j]
    codes = torch.stack([b & 0x0F, b >> 4], dim=1)  # [N/64, half, K, j]
    return codes.transpose(2, 3).reshape(N, K)  # row = block*64 + half*32 + j


class Int8Linear(nn.Module):
    """A bias-free linear with int8 weights and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))  # the compute dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        q, scale = quantize_int8(linear.weight)
        m.qweight, m.scales = q, scale.to(linear.weight.dtype)
        return m

    def dequantize(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight [N, K] (or its output rows start:stop) in `dtype`."""
        return self.qweight[start:stop].to(dtype) * self.scales[start:stop].to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # [M, K]; the kernels need dense rows
        if x2.shape[0] <= KERNEL_MAX_ROWS[8] and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))
        else:
            y = blockwise_linear(x2, self, self.out_features, 1)
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A bias-free linear with 4-bit weights, a scale and a zero point per group of input columns.
    The kernel works on blocks of 64 output rows: other row counts are padded with zero rows
    (codes 8, scale 0, zero 0), whose outputs are dropped."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        padded = -(-out_features // INT4_BLOCK_N) * INT4_BLOCK_N
        self.register_buffer("qweight", torch.empty(padded, in_features // 2, dtype=torch.uint8, device=device))
        # [K/G, N, 2]: (scale, zero) per group, the kernel's layout, in the compute dtype
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, padded, 2, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.weight.dtype, linear.weight.device)
        q, scale, zero = quantize_int4(linear.weight, group_size)
        pad = m.qweight.shape[0] - linear.out_features
        q = F.pad(q, (0, 0, 0, pad), value=8)
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        m.qweight = pack_int4(q)
        m.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(linear.weight.dtype).contiguous()
        return m

    def dequantize(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight [N, K] (or its output rows start:stop; start a multiple of 64) in `dtype`."""
        K, G = self.in_features, self.group_size
        stop = self.out_features if stop is None else min(stop, self.out_features)
        padded_stop = -(-stop // INT4_BLOCK_N) * INT4_BLOCK_N
        n = stop - start
        codes = unpack_int4(self.qweight[start:padded_stop], K)[:n].view(n, K // G, G).to(dtype)  # [n, K/G, G]
        scale = self.scales_and_zeros[:, start:stop, 0].t().to(dtype)[..., None]  # [n, K/G, 1]
        zero = self.scales_and_zeros[:, start:stop, 1].t().to(dtype)[..., None]
        return ((codes - 8) * scale + zero).view(n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # [M, K]; the kernels need dense rows
        if x2.shape[0] <= KERNEL_MAX_ROWS[4] and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.qweight, self.group_size, self.scales_and_zeros.to(x.dtype))
            y = y[:, : self.out_features]
        else:
            y = blockwise_linear(x2, self, self.out_features, INT4_BLOCK_N)
        return y.reshape(*x.shape[:-1], self.out_features)


def blockwise_linear(x: torch.Tensor, layer: nn.Module, out_features: int, align: int) -> torch.Tensor:
    """x [M, K] · Wᵀ with W dequantized by `layer` a block of output rows at a time (block
    starts aligned to `align` rows), each block's temporaries small enough to stay in cache."""
    K = x.shape[1]
    if x.device.type != "cpu":  # GPUs have the memory bandwidth: one dequantization, one GEMM
        return F.linear(x, layer.dequantize(x.dtype))
    rows = max(align, DEQUANT_BLOCK_BYTES // (2 * K) // align * align)
    return torch.cat([F.linear(x, layer.dequantize(x.dtype, start, start + rows))
                      for start in range(0, out_features, rows)], dim=1)


def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise SmoeError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise SmoeError(f"int4 with group size {group_size} needs input widths divisible by it, and this model "
                        f"has a linear with {in_features} inputs; choose a group size that divides it, or int8")


def quantized_linear(linear: nn.Module, bits: int, group_size: int | None) -> nn.Module:
    """The int8 / int4 replacement of a linear; built empty when the linear is on `meta`
    (a quantized checkpoint is being loaded)."""
    if linear.weight.is_meta:
        if bits == 8:
            return Int8Linear(linear.in_features, linear.out_features, linear.weight.dtype, "meta")
        return Int4Linear(linear.in_features, linear.out_features, group_size, linear.weight.dtype, "meta")
    return Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size)


def parse_quant(spec: str) -> tuple[int, int | None]:
    """'int8' -> (8, None); 'int4' -> (4, 32); 'int4-g64' -> (4, 64)."""
    if spec == "int8":
        return 8, None
    if spec == "int4":
        return 4, 32
    if spec.startswith("int4-g") and spec[6:].isdigit() and int(spec[6:]) in INT4_GROUP_SIZES:
        return 4, int(spec[6:])
    raise SmoeError(f"unknown quantization {spec!r}; use int8, int4 or int4-g32/-g64/-g128/-g256")


def quantize_expert(expert: nn.Module, bits: int, group_size: int | None) -> nn.Module:
    """Quantize one expert's w1, w2, w3 in place (offloaded experts, as they are loaded)."""
    for name in ("w1", "w2", "w3"):
        setattr(expert, name, quantized_linear(getattr(expert, name), bits, group_size if bits == 4 else None))
    return expert


def quantize_model(model, bits: int, group_size: int | None = None, progress: bool = False) -> int:
    """Swap the attention and expert linears for Int8Linear (bits=8) or Int4Linear (bits=4,
    group_size 32/64/128/256); the router, norms, embeddings and lm_head stay in high
    precision. Records the choice in model.config.quantization. Returns how many were swapped."""
    from tqdm import tqdm

    if bits not in (4, 8):
        raise SmoeError(f"bits must be 8 or 4, got {bits}")
    if bits == 4:
        group_size = group_size or 32
        config = model.config
        for width in (config.hidden_size, config.head_dim * config.num_attention_heads, config.intermediate_size):
            check_int4_shape(width, group_size)
    else:
        group_size = None
    targets = []
    for layer in model.layers:
        targets += [(layer.attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if isinstance(layer.moe.experts, nn.ModuleList):  # offloaded experts are quantized as they load
            targets += [(expert, name) for expert in layer.moe.experts for name in ("w1", "w2", "w3")]
    meta = bool(targets) and getattr(*targets[0]).weight.is_meta
    for parent, name in tqdm(targets, desc=f"int{bits}", unit="linear", disable=not progress or meta):
        linear = getattr(parent, name)
        setattr(parent, name, quantized_linear(linear, bits, group_size))
        if not meta:
            release_pages(linear.weight)  # read once from the memory map; the codes replace it
    model.config.quantization = {"method": "smoe", "bits": bits, "group_size": group_size}
    return len(targets)
