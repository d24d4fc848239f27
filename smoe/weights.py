"""Weight formats: what a checkpoint stores for one linear, and its plain PyTorch reference.

A format is a module type that holds the stored tensors (`nn.Linear`'s weight; int8's qweight
and scales; int4's qweight, scales and mins) and whose forward is the straightforward PyTorch
computation every faster backend is tested against, plus the stacked kind that holds E
experts' linears in the same format (also plain PyTorch). What is stored belongs to no kernel
and no CPU: a backend (smoe/kernels/) repacks a format once at load into whatever its
instructions want, and the plain reference is what runs where no backend takes it.

    register_format(WeightFormat("smoe-int8", 1, Int8Linear, StackedInt8Linear.stack,
                                 quantize=quantize_int8_linear, spec_from_config=QuantSpec.from_config))

is all a new format needs (smoe/quantize.py registers int8 and int4; tests/toy_format.py a
format of its own): quantization (`quantize_model` with a spec whose `format_name` names it),
stacking, offloading, saving and loading, and the server then take it through the same calls.

Shape legend: E experts, N output features, K input features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from smoe.errors import SmoeError
from smoe.experts import StackedLinear
from smoe.options import QuantSpec

Rows = list[list[nn.Module]]  # per expert, the linears whose outputs are concatenated (gate and up: [w1, w3])


@dataclass(frozen=True)
class WeightFormat:
    """One stored weight format.

    name, version: what config.json's `quantization.format` records for a checkpoint in it.
    linear: the module type holding one linear's stored tensors; its forward is the reference.
    stack: E experts' linears of this type -> the plain stacked kind (a module with
        `num_experts`, `one(e, x)` and `gathered(expert_indices, x)`: smoe/experts.py).
    quantize: (a full-precision nn.Linear, spec) -> a module of `linear`'s type, built empty
        when the linear is on `meta` (a checkpoint in this format is being loaded); None for the
        full-precision format itself.
    resolve: (spec, model config) -> the spec with what it left open chosen for that model.
    spec_from_config: config.json's `quantization` entry -> the spec it records.
    default_spec: () -> the spec a user gets by naming the format (smoe.load(quant=NAME), --quant
        NAME); None where the format has names of its own (int8 / int4: options.QuantSpec.parse)."""

    name: str
    version: int
    linear: type[nn.Module]
    stack: Callable[[Rows], nn.Module]
    quantize: Callable[[nn.Module, Any], nn.Module] | None = None
    resolve: Callable[[Any, Any], Any] | None = None
    spec_from_config: Callable[[dict], Any] | None = None
    default_spec: Callable[[], Any] | None = None


_BY_TYPE: dict[type, WeightFormat] = {}
_BY_NAME: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Make a format known: its linears can then be quantized to, stacked, repacked by the
    backends that name it, saved and loaded."""
    if fmt.name in _BY_NAME and _BY_NAME[fmt.name] != fmt:
        raise ValueError(f"a weight format named {fmt.name!r} is already registered")
    _BY_TYPE[fmt.linear] = _BY_NAME[fmt.name] = fmt
    return fmt


def format_of(module: nn.Module) -> WeightFormat | None:
    """The format whose linear `module` is (by its exact type: a subclass is a backend's, or an
    adapter's, and is not stored as the format), or None."""
    return _BY_TYPE.get(type(module))


def format_named(name: str) -> WeightFormat | None:
    return _BY_NAME.get(name)


def formats() -> list[WeightFormat]:
    return list(_BY_NAME.values())


def parse_quant(text: str) -> Any:
    """A quantization named by a user: 'int8', 'int4', 'int4-g32+keephead', ... (QuantSpec.parse),
    or the name of a registered weight format with a default spec."""
    fmt = _BY_NAME.get(text)
    if fmt is not None and fmt.default_spec is not None:
        return fmt.default_spec()
    try:
        return QuantSpec.parse(text)
    except SmoeError as error:
        named = [f.name for f in _BY_NAME.values() if f.default_spec is not None]
        if not named:
            raise
        raise SmoeError(f"{error}, or a registered weight format: {', '.join(named)}") from None


# full precision (fp32, bf16, fp16): nn.Linear; its stacked kind is experts.StackedLinear
PLAIN = register_format(WeightFormat("plain", 1, nn.Linear, StackedLinear.stack))
