"""A toy weight format, added the way any new one is: this module and one registration line,
nothing else in smoe touched (tests/test_weight_formats.py runs it through smoe.load, stacking,
offloading and the server).

"int8 with a bias": per output channel n, w ≈ q · scale[n] + offset[n] with q int8 in
[-127, 127] — asymmetric int8, the row's midpoint as its offset. It has only the plain PyTorch
reference: no backend names it, so it runs as that everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.experts import stack_rows
from smoe.weights import WeightFormat, register_format

NAME = "toy-int8-offset"


@dataclass(frozen=True)
class ToySpec:
    """What smoe.load(quant=...) takes for this format (duck-typed like options.QuantSpec)."""

    head: bool = False
    format_name: str = NAME

    def to_config(self) -> dict:
        return {"method": "toy"}

    @classmethod
    def from_config(cls, quantization: dict) -> ToySpec:
        return cls()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale [N], offset [N]), fp32, w ≈ q · scale + offset."""
    w = weight.detach().float()
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    offset, scale = (hi + lo) / 2, ((hi - lo) / 254).clamp_min(1e-12)
    q = torch.round((w - offset[:, None]) / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale, offset


class ToyLinear(nn.Module):
    """qweight int8 [N, K], scales and offsets [N] in the model dtype; forward: the reference."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.empty(out_features, dtype=dtype, device=device))

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None] + self.offsets.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_in(x.dtype))


def from_linear(linear: nn.Linear, spec: ToySpec) -> ToyLinear:
    dtype = linear.weight.dtype
    m = ToyLinear(linear.in_features, linear.out_features, dtype, "meta" if linear.weight.is_meta else None)
    if not linear.weight.is_meta:
        q, scale, offset = quantize_rows(linear.weight)
        m.qweight, m.scales, m.offsets = q, scale.to(dtype), offset.to(dtype)
    return m


class StackedToy(nn.Module):
    """E toy linears: qweight [E, N, K], scales and offsets [E, N]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)

    @staticmethod
    def stack(rows: list[list[ToyLinear]]) -> StackedToy:
        return StackedToy(*(stack_rows(rows, name) for name in ("qweight", "scales", "offsets")))

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    def weight_in(self, index, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight[index].to(dtype) * self.scales[index].to(dtype)[..., None] \
            + self.offsets[index].to(dtype)[..., None]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_in(e, x.dtype))

    def gathered(self, expert_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight_in(expert_indices, x.dtype), x[..., None])[..., 0]


TOY = register_format(WeightFormat(NAME, 1, ToyLinear, StackedToy.stack, quantize=from_linear,
                                   spec_from_config=ToySpec.from_config, default_spec=ToySpec))
