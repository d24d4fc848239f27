"""aten's weight-only int4 CPU kernel as a backend for the stored int4 format (smoe/quantize.py):
the CPU path where the native kernels do not run (smoe/kernels/native.py).

aten's kernel reads its private `_weight_int4pack` layout, whose byte order depends on the
CPU capability aten runs with (ATEN_CPU_CAPABILITY: default, avx2 and avx512 differ), so it is
made here, at load, by aten itself (`aten_int4_layout`), and never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.kernels.registry import Backend, Target
from smoe.quantize import ATEN_INT4_BLOCK_N, Int4Linear, concat_codes


def aten_int4_layout(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] (0..15), scales and mins [N, K/G] -> what aten._weight_int4pack_mm_for_cpu
    reads in THIS process: (packed [N_pad, K/2], scales_and_zeros [K/G, N_pad, 2]) with rows padded
    to 64 (codes 8, scale 0, zero 0: outputs dropped) and aten's formula w = (q - 8)·scale + zero,
    so zero = min + 8·scale. aten picks the packed layout from the CPU capability it runs with
    (ATEN_CPU_CAPABILITY: default, avx2 and avx512 give three different byte orders), so it is
    made here, at load, by aten itself, and never stored."""
    N = codes.shape[0]
    pad = -N % ATEN_INT4_BLOCK_N
    codes = F.pad(codes, (0, 0, 0, pad), value=8)
    scale, zero = scales.float(), mins.float() + 8 * scales.float()
    scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed, torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def aten_int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                     group_size: int) -> torch.Tensor:
    """x [..., K] · Wᵀ through aten's weight-only int4 CPU kernel (every row count: without the
    stored codes there is no blockwise dequantization, and on CPUs without AVX-512 BF16 the
    kernel beats dequantize + bf16 GEMM at every size measured, 16-512 rows)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros.to(x.dtype))
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)


class AtenInt4Linear(nn.Module):
    """An Int4Linear repacked at load for aten's CPU int4 kernel (aten_int4_layout), for the
    capability this process runs with: the CPU backend where the native kernels do not run."""

    def __init__(self, linear: Int4Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = linear.group_size
        packed, scales_and_zeros = aten_int4_layout(*linear.codes(), linear.scales.dtype)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aten_int4_linear(x, self.packed, self.scales_and_zeros, self.out_features, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                "aten int4pack")


class AtenStackedInt4(nn.Module):
    """E int4 linears repacked for aten's CPU int4 kernel in this process (aten_int4_layout):
    packed [E, N_pad, K/2], scales_and_zeros [E, K/G, N_pad, 2]. CPU only: no gathered path."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                 group_size: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.out_features, self.group_size = out_features, group_size

    @staticmethod
    def stack(rows: list[list[Int4Linear]]) -> AtenStackedInt4 | None:
        if rows[0][0].qweight.device.type != "cpu":
            return None
        layouts = [aten_int4_layout(*concat_codes(row), row[0].scales.dtype) for row in rows]
        return AtenStackedInt4(torch.stack([p for p, _ in layouts]), torch.stack([sz for _, sz in layouts]),
                               sum(lin.out_features for lin in rows[0]), rows[0][0].group_size)

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return aten_int4_linear(x, self.packed[e], self.scales_and_zeros[e], self.out_features, self.group_size)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, out_features={self.out_features}, group_size={self.group_size}, "
                "aten int4pack")


def aten_linear(linear: Int4Linear) -> AtenInt4Linear | None:
    return AtenInt4Linear(linear) if linear.qweight.device.type == "cpu" else None


def refuses(target: Target) -> str | None:
    if target.device != "cpu":
        return f"aten's int4 kernel used here is its CPU one; the model is on {target.device}"
    if target.compile:
        return "a compiled decode step traces the stored format's plain twin"
    return None


BACKEND = Backend("aten-int4", ("smoe-int4",), refuses, linear=aten_linear, stack=AtenStackedInt4.stack,
                  kinds=(AtenInt4Linear, AtenStackedInt4))
