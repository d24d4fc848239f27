"""The native CPU kernels (smoe/csrc/, the ops in smoe/kernels/ops.py) as a backend: the weight
kinds that call them, each format's repacking into their layout, and the registration.

The kernels multiply a few token rows (decode) by bf16, int8 or int4 weights with the CPU's
dot-product instructions (one variant per instruction set: ops.py, smoe/csrc/isa.h), reading
each weight once; int8 and int4 quantize the activations
to 8 bits in blocks of 32 once per call, shared by every expert of the layer. One op,
`smoe::moe_*`, runs all chosen experts of a MoE layer (gate/up, SiLU·up, down, weighted sum).
Many rows (prefill) go to PyTorch's GEMMs, which are faster there: in bf16 where the kernels are
AVX-512's (the CPU has AVX-512 BF16, which PyTorch's bf16 GEMMs use), else through
`smoe::linear_prefill`, each block of weight rows widened to fp32 for fp32 GEMMs (`many_rows`):
without AVX-512 BF16 PyTorch's bf16 GEMM has no fast path and its fp32 GEMM is several times
faster. Whole decoder layers of a
decode step run as one call: smoe/kernels/decode.py. docs/KERNELS.md has the layouts, the
arithmetic and the measurements.

The layouts: bf16 weights stay as stored ([N, K], stacked [E, N, K]); int8 keeps its codes
and takes fp32 scales; int4 is repacked at load into blocks of 32 columns, 16 bytes each
(column j in the low nibble, j + 16 in the high one) with a bf16 scale s and offset m per
group (w = code·s + m), so a block unpacks with one shift and one mask.

Each kind names, in `decode_tensors`, the (weight, scale) attributes smoe::decode_layer reads.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import SmoeError
from smoe.experts import stack_rows
from smoe.fsutil import huge_page_copy
from smoe.ggml import TYPE_IDS, GGMLLinear, StackedGGML
from smoe.kernels.decode import plan_decode
from smoe.kernels.ops import (
    MAX_ROWS,
    available,
    few_rows,
    isa_problem,
    note_fallback,
    unavailable_reason,
    variant,
    variants,
)
from smoe.kernels.registry import Backend, Target
from smoe.quantize import Int8Linear, blockwise_linear, concat_codes, dequantize_int8

__all__ = ["MAX_ROWS", "available", "unavailable_reason", "note_fallback", "few_rows", "BACKEND"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def many_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, group_size: int,
              dequantize=None) -> torch.Tensor:
    """x [M, K] · Wᵀ for many token rows (a prompt). Where the kernels are AVX-512's: PyTorch's bf16
    GEMMs (the CPU has AVX-512 BF16), over W rebuilt by `dequantize(dtype, start, stop)` a block of
    rows at a time (bf16 weights as they are). Elsewhere smoe::linear_prefill: the same blocks
    widened to fp32, fp32 GEMMs, rounded once (PyTorch's bf16 GEMM has no fast path there)."""
    if variant() != "avx512":
        return torch.ops.smoe.linear_prefill(x, weight, scale, group_size)
    if dequantize is None:
        return F.linear(x, weight)
    return blockwise_linear(x, partial(dequantize, x.dtype), weight.shape[0])


# --------------------------------------------------------------------------- int4 in the kernels' layout


def int4_native_layout(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..15), scales and mins [N, K/G] (the stored format's w = code·scale + min,
    smoe/quantize.py) -> (bytes [N, K/2]: per block of 32 columns, column j low nibble, j + 16
    high; sm [N, 2, K/G]: scale, then min)."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).view(N, K // 32, 2, 16)
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)
    return packed.contiguous(), torch.stack([scales, mins], dim=1).to(dtype).contiguous()


def dequantize_int4_native(codes: torch.Tensor, sm: torch.Tensor, group_size: int, dtype: torch.dtype,
                           start: int = 0, stop: int | None = None) -> torch.Tensor:
    """bytes [N, K/2], sm [N, 2, K/G] -> the weight [N, K] (or its rows start:stop) in `dtype`."""
    b = codes[start:stop]
    n, K = b.shape[0], 2 * b.shape[1]
    q = torch.stack([b.view(n, K // 32, 16) & 0x0F, b.view(n, K // 32, 16) >> 4], dim=2).view(n, K // group_size,
                                                                                            group_size)
    s, m = sm[start:stop, 0].to(dtype)[..., None], sm[start:stop, 1].to(dtype)[..., None]  # [n, K/G, 1]
    return (q.to(dtype) * s + m).view(n, K)


# --------------------------------------------------------------------------- single linears (attention, head)


class NativeLinear(nn.Module):
    """A frozen bias-free bf16 linear: the native kernel for few rows, F.linear for many."""

    decode_tensors = ("weight", None)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # in huge pages (fsutil.huge_page_copy); a head tied to the embedding is tied again by release_mmap
        self.weight = nn.Parameter(huge_page_copy(linear.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            return torch.ops.smoe.linear_bf16(rows, self.weight).view(*x.shape[:-1], self.out_features)
        return many_rows(rows, self.weight, None, 0).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native"


class NativeInt8Linear(Int8Linear):
    """An Int8Linear whose few-row products run natively (with an fp32 copy of its scales)."""

    decode_tensors = ("qweight", "scales32")

    @classmethod
    def from_int8(cls, linear: Int8Linear) -> NativeInt8Linear:
        native = cls(linear.in_features, linear.out_features, linear.scales.dtype, "meta")
        # scales copied too: a view would keep the checkpoint's whole memory map alive
        native.qweight, native.scales = huge_page_copy(linear.qweight), linear.scales.clone()
        native.register_buffer("scales32", linear.scales.float(), persistent=False)
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            y = torch.ops.smoe.linear_q8(rows, self.qweight, self.scales32)
        else:
            y = many_rows(rows, self.qweight, self.scales32, 0, partial(dequantize_int8, self.qweight, self.scales))
        return y.view(*x.shape[:-1], self.out_features)


class NativeInt4Linear(nn.Module):
    """An int4 linear in the kernels' layout (see int4_native_layout)."""

    decode_tensors = ("codes", "sm")

    def __init__(self, codes: torch.Tensor, sm: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("codes", huge_page_copy(codes))
        self.register_buffer("sm", sm)
        self.out_features, self.in_features, self.group_size = codes.shape[0], 2 * codes.shape[1], group_size

    @classmethod
    def from_int4(cls, linear) -> NativeInt4Linear:
        return cls(*int4_native_layout(*linear.codes(), linear.scales.dtype), linear.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if few_rows(rows):
            y = torch.ops.smoe.linear_q4(rows, self.codes, self.sm, self.group_size)
        else:
            y = many_rows(rows, self.codes, self.sm, self.group_size,
                          partial(dequantize_int4_native, self.codes, self.sm, self.group_size))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                "native")


def native_linear(linear: nn.Module) -> nn.Module | None:
    """A frozen bias-free bf16 nn.Linear, or an Int8Linear / Int4Linear with bf16 scales, on the
    CPU, as the native kernels' module; None for anything else."""
    if type(linear) is GGMLLinear:
        return NativeGGMLLinear(linear) if linear.blocks.device.type == "cpu" else None
    if type(linear) is nn.Linear:
        if linear.bias is None and linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu":
            return NativeLinear(linear)
        return None
    if linear.scales.dtype != torch.bfloat16 or linear.scales.device.type != "cpu":
        return None
    return NativeInt8Linear.from_int8(linear) if type(linear) is Int8Linear else NativeInt4Linear.from_int4(linear)


# --------------------------------------------------------------------------- stacked experts


class _Fused:
    """A stacked kind with smoe::moe_* (StackedExperts' 'fused' path) for the rows it takes."""

    @staticmethod
    def takes_fused(x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and few_rows(x)


class NativeStackedLinear(_Fused, nn.Module):
    """E bf16 linears [E, out, in] (as StackedLinear) with the native decode kernels."""

    decode_tensors = ("weight", None)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_bf16(x.contiguous(), self.weight[e])
        return many_rows(x.contiguous(), self.weight[e], None, 0)

    def fused_moe(self, down: NativeStackedLinear, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_bf16(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                       self.weight, down.weight)

    def extra_repr(self) -> str:
        E, out_features, in_features = self.weight.shape
        return f"experts={E}, in_features={in_features}, out_features={out_features}, native"


class NativeStackedInt8(_Fused, nn.Module):
    """E int8 linears: qweight [E, N, K], scales [E, N] (compute dtype) and their fp32 copy."""

    decode_tensors = ("qweight", "scales32")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales32", scales.float(), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_q8(x.contiguous(), self.qweight[e], self.scales32[e])
        dequantize = partial(dequantize_int8, self.qweight[e], self.scales[e])
        return many_rows(x.contiguous(), self.qweight[e], self.scales32[e], 0, dequantize)

    def fused_moe(self, down: NativeStackedInt8, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_q8(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                     self.qweight, self.scales32, down.qweight, down.scales32)


class NativeStackedInt4(_Fused, nn.Module):
    """E int4 linears in the kernels' layout: codes [E, N, K/2], sm [E, N, 2, K/G]."""

    decode_tensors = ("codes", "sm")

    def __init__(self, codes: torch.Tensor, sm: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("sm", sm)
        self.group_size = group_size
        self.out_features, self.in_features = codes.shape[1], 2 * codes.shape[2]

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x):
            return torch.ops.smoe.linear_q4(x.contiguous(), self.codes[e], self.sm[e], self.group_size)
        dequantize = partial(dequantize_int4_native, self.codes[e], self.sm[e], self.group_size)
        return many_rows(x.contiguous(), self.codes[e], self.sm[e], self.group_size, dequantize)

    def fused_moe(self, down: NativeStackedInt4, x, expert_indices, expert_weights) -> torch.Tensor:
        return torch.ops.smoe.moe_q4(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                     self.codes, self.sm, down.codes, down.sm, self.group_size)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, native")


def native_stack(rows: list[list[nn.Module]]) -> nn.Module | None:
    """E experts' linears (bf16 nn.Linear, Int8Linear / Int4Linear with bf16 scales, or GGMLLinear,
    on the CPU) in the native stacked kind; None where the kernels cannot read them."""
    first = rows[0][0]
    if type(first) is GGMLLinear:  # single GGUF experts (offloaded ones, as each loads): stacked here
        return native_restack(StackedGGML.stack(rows))
    if type(first) is nn.Linear:
        if first.weight.dtype != torch.bfloat16 or first.weight.device.type != "cpu":
            return None
        return NativeStackedLinear(huge_page_copy(stack_rows(rows, "weight")))
    if first.scales.dtype != torch.bfloat16 or first.qweight.device.type != "cpu":
        return None
    if type(first) is Int8Linear:
        return NativeStackedInt8(huge_page_copy(stack_rows(rows, "qweight")), stack_rows(rows, "scales"))
    layouts = [int4_native_layout(*concat_codes(row)) for row in rows]
    return NativeStackedInt4(huge_page_copy(torch.stack([codes for codes, _ in layouts])),
                             torch.stack([sm for _, sm in layouts]), first.group_size)


# --------------------------------------------------------------------------- GGML blocks (GGUF files, in place)


def _type_ids(kinds: list[str]) -> torch.Tensor:
    """The int32 GGML type ids the kernels are told a weight's blocks are in (smoe/csrc/ggml.h)."""
    return torch.tensor([TYPE_IDS[kind] for kind in kinds], dtype=torch.int32)


def _ggml_product(x: torch.Tensor, blocks: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """x [M, K] · Wᵀ for W in GGML blocks: few bf16 rows by smoe::linear_ggml (activations quantized
    as llama.cpp does), many by smoe::linear_prefill (a block of rows dequantized at a time: to bf16
    for bf16 GEMMs where the kernels are AVX-512's, as many_rows, else to fp32 for fp32 GEMMs);
    fp32 rows, any number, by smoe::linear_ggml in fp32: llama.cpp's arithmetic throughout."""
    if x.dtype == torch.float32 or few_rows(x):
        return torch.ops.smoe.linear_ggml(x, blocks, info)
    return torch.ops.smoe.linear_prefill(x, blocks, info, 0, variant() == "avx512")


class NativeGGMLLinear(nn.Module):
    """A GGMLLinear the native kernels run: its blocks as they are (on the CPU a view of the GGUF
    file's memory map: nothing copied, nothing repacked) and their type id."""

    decode_tensors = ("blocks", "info")
    in_place = True  # its tensors view the file: the decode plan gathers nothing into huge pages

    def __init__(self, linear: GGMLLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, linear.kind
        self.register_buffer("blocks", linear.blocks)
        self.register_buffer("info", _type_ids([linear.kind]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ggml_product(_rows(x), self.blocks, self.info).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, native"


class NativeStackedGGML(_Fused, nn.Module):
    """A StackedGGML the native kernels run, its blocks as they are: `blocks0` (and `blocks1`: a
    GGUF file's experts keep gate and up in two tensors, each of its own type) and their type ids;
    `fused_moe` is smoe::moe_ggml."""

    decode_tensors = ("blocks0", "info")
    in_place = True

    def __init__(self, stacked: StackedGGML) -> None:
        super().__init__()
        self.in_features, self.kinds, self.outs = stacked.in_features, list(stacked.kinds), list(stacked.outs)
        for i in range(len(self.kinds)):
            self.register_buffer(f"blocks{i}", getattr(stacked, f"blocks{i}"))
        self.register_buffer("info", _type_ids(self.kinds), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.blocks0.shape[0]

    @property
    def decode_up(self) -> torch.Tensor | None:
        """The second part's blocks (GGUF's up), which smoe::decode_layer takes after the others."""
        return self.blocks1 if len(self.kinds) == 2 else None

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ys = [_ggml_product(x, getattr(self, f"blocks{i}")[e], self.info[i : i + 1]) for i in range(len(self.kinds))]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def fused_moe(self, down: NativeStackedGGML, x, expert_indices, expert_weights) -> torch.Tensor:
        up = self.decode_up
        return torch.ops.smoe.moe_ggml(x.contiguous(), expert_indices.contiguous(), expert_weights.contiguous(),
                                       self.blocks0, up if up is not None else _NO_UP, self.info, down.blocks0,
                                       down.info)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, "
                f"parts={list(zip(self.kinds, self.outs, strict=True))}, native")


_NO_UP = torch.empty(0, dtype=torch.uint8)


def native_restack(stacked: nn.Module) -> nn.Module | None:
    """GGUF's stacked experts (StackedGGML on the CPU) as the native kind, blocks as they are."""
    if type(stacked) is StackedGGML and stacked.blocks0.device.type == "cpu":
        return NativeStackedGGML(stacked)
    return None


def refuses(target: Target) -> str | None:
    if target.device != "cpu":
        return f"CPU kernels; the model is on {target.device}"
    if isa_problem() is not None:  # the user asked for a variant: say it cannot be had, not run another
        raise SmoeError(f"{isa_problem()}; unset SMOE_ISA for the best variant this CPU runs")
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if target.dtype != torch.bfloat16 and not (target.gguf and target.dtype == torch.float32):
        return f"the kernels compute in bf16; the model is {str(target.dtype).removeprefix('torch.')}"
    return None  # (fp32 GGUF blocks in place: their products as llama.cpp computes them, fp32 around them)


def describe() -> str:
    """The variant in use and the others this CPU runs (`smoe info --kernels`)."""
    others = [name for name in variants() if name != variant()]
    return (f"the {variant()} kernels" + (f" (this CPU also runs {', '.join(others)}: SMOE_ISA=NAME picks one)"
                                          if others else ""))


BACKEND = Backend("native", ("plain", "smoe-int8", "smoe-int4", "gguf-blocks"), refuses, linear=native_linear,
                  stack=native_stack, restack=native_restack,
                  kinds=(NativeLinear, NativeInt8Linear, NativeInt4Linear, NativeStackedLinear, NativeStackedInt8,
                         NativeStackedInt4, NativeGGMLLinear, NativeStackedGGML), decode=plan_decode, detail=describe)
