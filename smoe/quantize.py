"""Weight-only int8 and int4 for inference: weights stored in 8 or 4 bits, activations and
accumulation in the model dtype. (NF4, the QLoRA training format, is in nf4.py.)

int8: symmetric per output channel, w ≈ q · scale[n], q in [-127, 127].
int4: asymmetric per group of G input columns (G = 32, 64, 128 or 256):
      w ≈ q · scale[n, g] + min[n, g], q in [0, 15], min the group's smallest weight.

What is stored belongs to no kernel and no CPU (STORED_FORMATS, recorded in config.json):
int8 codes [N, K] and scales [N]; int4 codes in the checkpoint's row order, unpadded, two per
byte (join_nibbles: column 2i low nibble, 2i+1 high), scales and mins [N, K/G]. Each backend
repacks once at load (smoe/kernels/): the native kernels into their blocks, aten's int4 CPU
kernel into the layout it picks from the CPU capability it runs with (kernels/aten.py), and
the plain PyTorch twin (Int4Linear's forward, StackedInt4Linear) reads the stored format.
Checkpoints written before format 1 held aten's AVX-512 layout: checkpoint.py converts them
at load (legacy_int4_*).

Decode multiplies few rows: PyTorch's weight-only CPU kernels (_weight_int8pack_mm,
_weight_int4pack_mm_for_cpu) read the small weights directly. Prefill multiplies many rows:
for int8 (and the plain int4 twin) the weight is dequantized and multiplied with a GEMM, a
fixed cost per weight, a block of output rows at a time (DEQUANT_BLOCK_BYTES of bf16 each), so
its temporaries stay in the caches: whole-matrix dequantization of a Mixtral-8x7B expert
projection took 230 ms (int4) and 83 ms (int8), ~30x the kernels' per-row cost.
KERNEL_MAX_ROWS is int8's crossover (benchmarks/bench_kernels.py --rows 1,4,16,32,64,128,256).

Each format is a pair of functions over plain tensors (`int8_linear`, `int4_linear`) that
both the single linears (attention, `Int8Linear` / `Int4Linear`) and the stacked experts
(`StackedInt8Linear` / `StackedInt4Linear`, one slice per expert) call.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from smoe.errors import SmoeError
from smoe.experts import stack_rows
from smoe.fsutil import release_module_pages, release_pages
from smoe.options import DEFAULT_INT4_GROUP_SIZE, FALLBACK_INT4_GROUP_SIZE, INT4_GROUP_SIZES, QuantSpec
from smoe.weights import WeightFormat, format_named, register_format

KERNEL_MAX_ROWS = {8: 24}
DEQUANT_BLOCK_BYTES = 1 << 20
ATEN_INT4_BLOCK_N = 64  # aten's int4 CPU kernel works on blocks of 64 output rows


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale fp32 [N]) with w ≈ q · scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (codes uint8 0..15 [N, K], scale [N, K/G], min [N, K/G]), fp32, with
    w ≈ code · scale + min: each group's range split into 15 steps from its smallest weight."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)  # [N, K/G, G]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/G]
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(N, K), scale, lo


def join_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> bytes [N, K/2] in the stored int4 format: byte i of a row holds
    column 2i in its low nibble and column 2i+1 in its high nibble (a row of codes 1, 2, 3, 4
    is the bytes 0x21, 0x43). The checkpoint's rows, in its order, unpadded."""
    pairs = codes.to(torch.uint8).view(*codes.shape[:-1], -1, 2)  # [..., K/2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of join_nibbles: bytes [..., K/2] -> codes [..., K] (uint8)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


# --------------------------------------------------------------------------- the two formats as functions


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, start: int = 0,
                    stop: int | None = None) -> torch.Tensor:
    """qweight int8 [N, K], scales [N] -> the weight [N, K] (or its output rows start:stop) in `dtype`."""
    return qweight[start:stop].to(dtype) * scales[start:stop].to(dtype)[:, None]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The stored int4 format -> the weight [..., N, K] (or its output rows start:stop of the first
    dim) in `dtype`: qweight uint8 [..., N, K/2] (join_nibbles), scales and mins [..., N, K/G],
    w = code · scale + min. Leading dims: the chosen experts' weights, gathered."""
    codes = split_nibbles(qweight[start:stop])  # [..., n, K]
    *lead, K = codes.shape
    scale = scales[start:stop].to(dtype)[..., None]  # [..., n, K/G, 1]
    low = mins[start:stop].to(dtype)[..., None]
    return (codes.view(*lead, K // group_size, group_size).to(dtype) * scale + low).view(*lead, K)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ for int8 W [N, K]: the kernel for few rows, blockwise dequantization for many."""
    N, K = qweight.shape
    x2 = x.reshape(-1, K).contiguous()  # [M, K]; the kernels need dense rows
    if x2.shape[0] <= KERNEL_MAX_ROWS[8] and x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    else:
        y = blockwise_linear(x2, partial(dequantize_int8, qweight, scales, x.dtype), N)
    return y.view(*x.shape[:-1], N)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ for W in the stored int4 format (the plain PyTorch twin every
    int4 backend is tested against): blockwise dequantization."""
    K, N = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    y = blockwise_linear(x2, partial(dequantize_int4, qweight, scales, mins, group_size, x.dtype), N)
    return y.reshape(*x.shape[:-1], N)


def blockwise_linear(x: torch.Tensor, dequantize, out_features: int) -> torch.Tensor:
    """x [M, K] · Wᵀ with W rebuilt by `dequantize(start, stop)` a block of output rows at a
    time, each block's temporaries small enough to stay in cache."""
    K = x.shape[1]
    if x.device.type != "cpu":  # GPUs have the memory bandwidth: one dequantization, one GEMM
        return F.linear(x, dequantize(0, out_features))
    rows = max(1, DEQUANT_BLOCK_BYTES // (2 * K))
    return torch.cat([F.linear(x, dequantize(start, start + rows)) for start in range(0, out_features, rows)], dim=1)


# --------------------------------------------------------------------------- int4 before format 1


def legacy_int4_qweight(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Codes as checkpoints before format 1 stored them — aten's AVX-512 int4pack layout, rows
    padded to blocks of 64, each block's bytes viewed as [K, 32] holding at (k, j) row j's code
    of column k in the low nibble and row 32 + j's in the high one — -> qweight [N, K/2] (join_nibbles)."""
    padded, K = packed.shape[0], 2 * packed.shape[1]
    blocks = packed.reshape(padded // ATEN_INT4_BLOCK_N, K, 32)  # [N_pad/64, K, j]
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=1)  # [N_pad/64, half, K, j]
    return join_nibbles(codes.transpose(2, 3).reshape(padded, K)[:out_features])  # row = block*64 + half*32 + j


def legacy_int4_scales(scales_and_zeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """Before format 1: scales_and_zeros [K/G, N_pad, 2] of (scale, zero) -> scales [N, K/G]."""
    return scales_and_zeros[:, :out_features, 0].t().contiguous()


def legacy_int4_mins(scales_and_zeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """Before format 1, w = (q - 8)·scale + zero -> mins [N, K/G] = zero - 8·scale, in fp32 (the
    loader rounds it to the model dtype: the very offsets the native kernels computed from it)."""
    pairs = scales_and_zeros[:, :out_features].float()  # [K/G, N, 2]
    return (pairs[..., 1] - 8 * pairs[..., 0]).t().contiguous()


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
    """A bias-free linear with 4-bit weights and a scale and min per group of G input columns,
    in the stored int4 format (STORED_FORMATS[4]): qweight uint8 [N, K/2] (join_nibbles), scales and
    mins [N, K/G] in the compute dtype, w = code · scale + min. Its forward is the plain
    PyTorch twin; the inference layout repacks it for a backend (smoe/kernels/: AtenInt4Linear,
    NativeInt4Linear)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.weight.dtype, linear.weight.device)
        codes, scale, low = quantize_int4(linear.weight, group_size)
        dtype = linear.weight.dtype
        m.qweight, m.scales, m.mins = join_nibbles(codes), scale.to(dtype), low.to(dtype)
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [N, K], scales [N, K/G], mins [N, K/G]) in the stored dtype."""
        return split_nibbles(self.qweight), self.scales, self.mins

    def dequantize(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size, dtype, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scales, self.mins, self.group_size)


def concat_codes(row: list[Int4Linear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K], scales, mins [N, K/G]) of int4 linears concatenated along their outputs (an
    expert's gate and up): what a backend repacks a stacked row from."""
    return tuple(torch.cat(part) for part in zip(*(lin.codes() for lin in row), strict=True))


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
    def stack(rows: list[list[Int8Linear]]) -> StackedInt8Linear:
        stacked = StackedInt8Linear(stack_rows(rows, "qweight"), stack_rows(rows, "scales"))
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
    """E int4 linears of one shape in the stored format: qweight [E, N, K/2], scales and mins
    [E, N, K/G]. The plain PyTorch twin (and the kind off the CPU: it gathers)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.group_size = group_size
        self.out_features, self.in_features = qweight.shape[1], 2 * qweight.shape[2]

    @staticmethod
    def stack(rows: list[list[Int4Linear]]) -> StackedInt4Linear:
        stacked = StackedInt4Linear(*(stack_rows(rows, name) for name in ("qweight", "scales", "mins")),
                                    rows[0][0].group_size)
        release_module_pages(lin for row in rows for lin in row)  # the stacked copy replaces the file's pages
        return stacked

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight[e], self.scales[e], self.mins[e], self.group_size)

    def gathered(self, expert_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """indices [N, K], x [N, K, in] -> [N, K, out], dequantizing only the chosen experts."""
        weight = dequantize_int4(self.qweight[expert_indices], self.scales[expert_indices],
                                 self.mins[expert_indices], self.group_size, x.dtype)  # [N, K, out, in]
        return torch.matmul(weight, x[..., None])[..., 0]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")


def int8_from_linear(linear: nn.Module, spec: QuantSpec) -> Int8Linear:
    """The int8 replacement of a linear; built empty when the linear is on `meta` (a quantized
    checkpoint is being loaded)."""
    if linear.weight.is_meta:
        return Int8Linear(linear.in_features, linear.out_features, linear.weight.dtype, "meta")
    return Int8Linear.from_linear(linear)


def int4_from_linear(linear: nn.Module, spec: QuantSpec) -> Int4Linear:
    """The int4 replacement of a linear (groups of spec.group_size); built empty on `meta`."""
    if linear.weight.is_meta:
        return Int4Linear(linear.in_features, linear.out_features, spec.group_size, linear.weight.dtype, "meta")
    return Int4Linear.from_linear(linear, spec.group_size)


# --------------------------------------------------------------------------- the transform


def quantized_linear(linear: nn.Module, spec) -> nn.Module:
    """The replacement of a linear in the format `spec.format_name` names (smoe/weights.py)."""
    return spec_format(spec).quantize(linear, spec)


def spec_format(spec) -> WeightFormat:
    fmt = format_named(spec.format_name)
    if fmt is None or fmt.quantize is None:
        raise SmoeError(f"no weight format named {spec.format_name!r} to quantize to")
    return fmt


def quantize_expert(expert: nn.Module, spec) -> nn.Module:
    """Quantize one expert's w1, w2, w3 in place (read once from the memory map, pages given back)."""
    for name in ("w1", "w2", "w3"):
        linear = getattr(expert, name)
        setattr(expert, name, quantized_linear(linear, spec))
        if not linear.weight.is_meta:
            release_pages(linear.weight)
    return expert


def resolve_quant(spec: QuantSpec, config) -> QuantSpec:
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


def quantize_model(model, spec, progress: bool = False) -> int:
    """Swap the attention and expert linears for the format `spec` names (Int8Linear /
    Int4Linear for a QuantSpec; any registered format's for a spec with its `format_name`), and
    with `spec.head` (by default where the head is untied) the output head for an Int8Linear;
    the router, norms and embeddings stay in high precision. Offloaded experts are quantized as
    they load. Records the choice, resolved for this model (the format's `resolve`), in
    model.config.quantization with the format's name and version; returns how many linears it
    covers."""
    config = model.config
    fmt = spec_format(spec)
    if fmt.resolve is not None:
        spec = fmt.resolve(spec, config)
    meta = model.layers[0].attn.q_proj.weight.is_meta
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in tqdm(model.layers, desc=fmt.name, unit="layer", disable=not progress or meta, delay=1.0):
        for name in names:
            linear = getattr(layer.attn, name)
            setattr(layer.attn, name, quantized_linear(linear, spec))
            if not meta:
                release_pages(linear.weight)
        layer.moe.experts = layer.moe.experts.map_experts(partial(quantize_expert, spec=spec))
    if getattr(spec, "head", False):
        head = model.lm_head
        model.lm_head = INT8.quantize(head, QuantSpec(8))
        if not meta:
            release_pages(head.weight)
    config.quantization = {**spec.to_config(), "format": {"name": fmt.name, "version": fmt.version}}
    return len(model.layers) * (len(names) + 3 * config.num_local_experts) + int(bool(getattr(spec, "head", False)))


INT8 = register_format(WeightFormat("smoe-int8", 1, Int8Linear, StackedInt8Linear.stack, quantize=int8_from_linear,
                                    resolve=resolve_quant, spec_from_config=QuantSpec.from_config))
INT4 = register_format(WeightFormat("smoe-int4", 1, Int4Linear, StackedInt4Linear.stack, quantize=int4_from_linear,
                                    resolve=resolve_quant, spec_from_config=QuantSpec.from_config))
# the stored layouts, by bits: config.json's quantization.format names one; a checkpoint without
# it was written before version 1 (int8: the same layout; int4: aten's AVX-512 int4pack)
STORED_FORMATS = {fmt_bits: {"name": fmt.name, "version": fmt.version} for fmt_bits, fmt in ((8, INT8), (4, INT4))}
