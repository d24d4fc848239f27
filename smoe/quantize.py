"""Weight-only int8 and int4 for inference: weights stored in 8 or 4 bits, activations and
accumulation in the model dtype. (NF4, the QLoRA training format, is in nf4.py.)

int8: symmetric per output channel, w ≈ q · scale[n], q in [-127, 127].
int4: asymmetric per group of G input columns (G = 32, 64, 128 or 256):
      w ≈ (q - 8) · scale[n, g] + zero[n, g], q in [0, 15], zero = min + 8 · scale.

Decode multiplies few rows: PyTorch's weight-only CPU kernels (_weight_int8pack_mm,
_weight_int4pack_mm_for_cpu) read the small weights directly; their cost grows with every
row. Prefill multiplies many rows: there the weight is dequantized and multiplied with a
bf16 GEMM, a fixed cost per weight. The dequantization goes a block of output rows at a
time (DEQUANT_BLOCK_BYTES of bf16 each), so its temporaries stay in the caches: whole-matrix
dequantization of a Mixtral-8x7B expert projection took 230 ms (int4) and 83 ms (int8),
~30x the kernels' per-row cost. KERNEL_MAX_ROWS picks the crossover per kind
(benchmarks/bench_kernels.py --rows 1,4,16,32,64,128,256).

Each format is a pair of functions over plain tensors (`int8_linear`, `int4_linear`) that
both the single linears (attention, `Int8Linear` / `Int4Linear`) and the stacked experts
(`StackedInt8Linear` / `StackedInt4Linear`, one slice per expert) call.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import SmoeError
from smoe.experts import register_stacked_kind
from smoe.fsutil import release_module_pages, release_pages
from smoe.options import DEFAULT_INT4_GROUP_SIZE, FALLBACK_INT4_GROUP_SIZE, INT4_GROUP_SIZES, QuantSpec

KERNEL_MAX_ROWS = {8: 24, 4: 96}
DEQUANT_BLOCK_BYTES = 1 << 20
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


def _padded(n: int) -> int:
    return -(-n // INT4_BLOCK_N) * INT4_BLOCK_N


# --------------------------------------------------------------------------- the two formats as functions


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, start: int = 0,
                    stop: int | None = None) -> torch.Tensor:
    """qweight int8 [N, K], scales [N] -> the weight [N, K] (or its output rows start:stop) in `dtype`."""
    return qweight[start:stop].to(dtype) * scales[start:stop].to(dtype)[:, None]


def dequantize_int4(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int,
                    group_size: int, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """qweight uint8 [N_pad, K/2], scales_and_zeros [K/G, N_pad, 2] -> the weight [N, K] (or its
    output rows start:stop; start a multiple of 64) in `dtype`."""
    K, G = in_features, group_size
    stop = out_features if stop is None else min(stop, out_features)
    n = stop - start
    codes = unpack_int4(qweight[start:_padded(stop)], K)[:n].view(n, K // G, G).to(dtype)  # [n, K/G, G]
    scale = scales_and_zeros[:, start:stop, 0].t().to(dtype)[..., None]  # [n, K/G, 1]
    zero = scales_and_zeros[:, start:stop, 1].t().to(dtype)[..., None]
    return ((codes - 8) * scale + zero).view(n, K)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ for int8 W [N, K]: the kernel for few rows, blockwise dequantization for many."""
    N, K = qweight.shape
    x2 = x.reshape(-1, K).contiguous()  # [M, K]; the kernels need dense rows
    if x2.shape[0] <= KERNEL_MAX_ROWS[8] and x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    else:
        y = blockwise_linear(x2, partial(dequantize_int8, qweight, scales, x.dtype), N, 1)
    return y.view(*x.shape[:-1], N)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                group_size: int) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ for int4 W [N, K] in the kernel's layout (rows padded to 64)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    if x2.shape[0] <= KERNEL_MAX_ROWS[4] and x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, qweight, group_size, scales_and_zeros.to(x.dtype))
        y = y[:, :out_features]
    else:
        dequantize = partial(dequantize_int4, qweight, scales_and_zeros, out_features, K, group_size, x.dtype)
        y = blockwise_linear(x2, dequantize, out_features, INT4_BLOCK_N)
    return y.reshape(*x.shape[:-1], out_features)


def blockwise_linear(x: torch.Tensor, dequantize, out_features: int, align: int) -> torch.Tensor:
    """x [M, K] · Wᵀ with W rebuilt by `dequantize(start, stop)` a block of output rows at a
    time (block starts aligned to `align` rows), each block's temporaries small enough to stay in cache."""
    K = x.shape[1]
    if x.device.type != "cpu":  # GPUs have the memory bandwidth: one dequantization, one GEMM
        return F.linear(x, dequantize(0, out_features))
    rows = max(align, DEQUANT_BLOCK_BYTES // (2 * K) // align * align)
    return torch.cat([F.linear(x, dequantize(start, start + rows)) for start in range(0, out_features, rows)], dim=1)


# --------------------------------------------------------------------------- single linears


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
        return dequantize_int8(self.qweight, self.scales, dtype, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales)


class Int4Linear(nn.Module):
    """A bias-free linear with 4-bit weights, a scale and a zero point per group of input columns.
    The kernel works on blocks of 64 output rows: other row counts are padded with zero rows
    (codes 8, scale 0, zero 0), whose outputs are dropped."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        padded = _padded(out_features)
        self.register_buffer("qweight", torch.empty(padded, in_features // 2, dtype=torch.uint8, device=device))
        # [K/G, N, 2]: (scale, zero) per group, the kernel's layout, in the compute dtype
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, padded, 2, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.weight.dtype, linear.weight.device)
        q, scale, zero = quantize_int4(linear.weight, group_size)
        m.qweight, m.scales_and_zeros = _int4_layout(q, scale, zero, linear.weight.dtype)
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpadded (codes [N, K], scale [N, K/G], zero [N, K/G]) in the stored dtype."""
        N = self.out_features
        q = unpack_int4(self.qweight, self.in_features)[:N]
        return q, self.scales_and_zeros[:, :N, 0].t(), self.scales_and_zeros[:, :N, 1].t()

    def dequantize(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales_and_zeros, self.out_features, self.in_features,
                               self.group_size, dtype, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scales_and_zeros, self.out_features, self.group_size)


def _int4_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K], scale and zero [N, K/G] -> (qweight [N_pad, K/2], scales_and_zeros [K/G, N_pad, 2])."""
    pad = _padded(q.shape[0]) - q.shape[0]
    q = F.pad(q, (0, 0, 0, pad), value=8)
    scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    return pack_int4(q), torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise SmoeError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise SmoeError(f"int4 with group size {group_size} needs input widths divisible by it, and this model "
                        f"has a linear with {in_features} inputs; choose a group size that divides it, or int8")


# --------------------------------------------------------------------------- stacked experts


class StackedInt8Linear(nn.Module):
    """E int8 linears of one shape: qweight [E, N, K], scales [E, N]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @staticmethod
    def stack(rows: list[list[Int8Linear]], pack: bool) -> nn.Module:
        if pack:
            from smoe.native import stack_int8

            native = stack_int8(rows)  # the native kernels' kind where this CPU runs them
            if native is not None:
                release_module_pages(lin for row in rows for lin in row)
                return native
        stacked = StackedInt8Linear(torch.stack([torch.cat([lin.qweight for lin in row]) for row in rows]),
                                    torch.stack([torch.cat([lin.scales for lin in row]) for row in rows]))
        release_module_pages(lin for row in rows for lin in row)  # the stacked copy replaces the file's pages
        return stacked

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight[e], self.scales[e])

    def gathered(self, expert_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """indices [N, K], x [N, K, in] -> [N, K, out], dequantizing only the chosen experts."""
        weight = self.qweight[expert_indices].to(x.dtype) * self.scales[expert_indices].to(x.dtype)[..., None]
        return torch.matmul(weight, x[..., None])[..., 0]


class StackedInt4Linear(nn.Module):
    """E int4 linears of one shape: qweight [E, N_pad, K/2], scales_and_zeros [E, K/G, N_pad, 2]."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                 in_features: int, group_size: int) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size

    @staticmethod
    def stack(rows: list[list[Int4Linear]], pack: bool) -> nn.Module:
        """Concatenating int4 linears goes through their codes: each is padded to 64 rows on its own."""
        if pack:
            from smoe.native import stack_int4

            native = stack_int4(rows)  # the native kernels' kind (and layout) where this CPU runs them
            if native is not None:
                release_module_pages(lin for row in rows for lin in row)
                return native
        first = rows[0][0]
        qweights, scales_and_zeros = [], []
        for row in rows:
            if len(row) == 1:
                q, sz = row[0].qweight, row[0].scales_and_zeros
            else:
                parts = [lin.codes() for lin in row]
                q, sz = _int4_layout(*(torch.cat(p) for p in zip(*parts, strict=True)), first.scales_and_zeros.dtype)
            qweights.append(q)
            scales_and_zeros.append(sz)
        out_features = sum(lin.out_features for lin in rows[0])
        stacked = StackedInt4Linear(torch.stack(qweights), torch.stack(scales_and_zeros), out_features,
                                    first.in_features, first.group_size)
        release_module_pages(lin for row in rows for lin in row)  # the stacked copy replaces the file's pages
        return stacked

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight[e], self.scales_and_zeros[e], self.out_features, self.group_size)

    def gathered(self, expert_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """indices [N, K], x [N, K, in] -> [N, K, out], dequantizing only the chosen experts."""
        N, K = expert_indices.shape
        P, K_in, G = self.qweight.shape[1], self.in_features, self.group_size  # P: rows padded to 64
        q = self.qweight[expert_indices].reshape(N * K * P, K_in // 2)  # each expert's padded rows in turn
        codes = unpack_int4(q, K_in).view(N, K, P, K_in // G, G).to(x.dtype)
        sz = self.scales_and_zeros[expert_indices].to(x.dtype)  # [N, K, K_in/G, P, 2]
        scale = sz[..., 0].transpose(-1, -2)[..., None]  # [N, K, P, K_in/G, 1]
        zero = sz[..., 1].transpose(-1, -2)[..., None]
        weight = ((codes - 8) * scale + zero).view(N, K, P, K_in)[:, :, : self.out_features]
        return torch.matmul(weight, x[..., None])[..., 0]


register_stacked_kind(Int8Linear, StackedInt8Linear.stack)
register_stacked_kind(Int4Linear, StackedInt4Linear.stack)


# --------------------------------------------------------------------------- the transform


def quantized_linear(linear: nn.Module, spec: QuantSpec) -> nn.Module:
    """The int8 / int4 replacement of a linear; built empty when the linear is on `meta`
    (a quantized checkpoint is being loaded)."""
    if linear.weight.is_meta:
        if spec.bits == 8:
            return Int8Linear(linear.in_features, linear.out_features, linear.weight.dtype, "meta")
        return Int4Linear(linear.in_features, linear.out_features, spec.group_size, linear.weight.dtype, "meta")
    return Int8Linear.from_linear(linear) if spec.bits == 8 else Int4Linear.from_linear(linear, spec.group_size)


def quantize_expert(expert: nn.Module, spec: QuantSpec) -> nn.Module:
    """Quantize one expert's w1, w2, w3 in place (read once from the memory map, pages given back)."""
    for name in ("w1", "w2", "w3"):
        linear = getattr(expert, name)
        setattr(expert, name, quantized_linear(linear, spec))
        if not linear.weight.is_meta:
            release_pages(linear.weight)
    return expert


def resolve(spec: QuantSpec, config) -> QuantSpec:
    """The spec with what it leaves open chosen for this model: int4 groups of 64, or 32 where a
    linear's input width is not a multiple of 64; the output head int8 unless it is tied to the
    token embeddings. Checks that the group size divides every width."""
    widths = (config.hidden_size, config.head_dim * config.num_attention_heads, config.intermediate_size)
    group = spec.group_size
    if spec.bits == 4 and group is None:
        group = DEFAULT_INT4_GROUP_SIZE if all(w % DEFAULT_INT4_GROUP_SIZE == 0 for w in widths) \
            else FALLBACK_INT4_GROUP_SIZE
    if spec.bits == 4:
        for width in widths:
            check_int4_shape(width, group)
    head = spec.head
    if head is None:
        head = not config.tie_word_embeddings
    elif head and config.tie_word_embeddings:
        raise SmoeError("the output head is tied to the token embeddings; quantizing the head needs an "
                        "untied head (drop +head / --quant-head)")
    return QuantSpec(spec.bits, group, head=head)


def quantize_model(model, spec: QuantSpec, progress: bool = False) -> int:
    """Swap the attention and expert linears for Int8Linear / Int4Linear, and with `spec.head`
    (by default where the head is untied) the output head for an Int8Linear; the router, norms
    and embeddings stay in high precision. Offloaded experts are quantized as they load. Records
    the choice, resolved for this model (`resolve`), in model.config.quantization; returns how
    many linears it covers."""
    from tqdm import tqdm

    config = model.config
    spec = resolve(spec, config)
    meta = model.layers[0].attn.q_proj.weight.is_meta
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in tqdm(model.layers, desc=f"int{spec.bits}", unit="layer", disable=not progress or meta, delay=1.0):
        for name in names:
            linear = getattr(layer.attn, name)
            setattr(layer.attn, name, quantized_linear(linear, spec))
            if not meta:
                release_pages(linear.weight)
        layer.moe.experts = layer.moe.experts.map_experts(partial(quantize_expert, spec=spec))
    if spec.head:
        head = model.lm_head
        model.lm_head = quantized_linear(head, QuantSpec(8))
        if not meta:
            release_pages(head.weight)
    config.quantization = spec.to_config()
    return len(model.layers) * (len(names) + 3 * config.num_local_experts) + int(spec.head)
