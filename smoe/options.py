"""What a user asks of a load, typed once at the edge (CLI flags, `smoe.load` keywords) and
passed down as these small dataclasses; every default lives here and nowhere else.

    QuantSpec(bits=4)                      --quant int4, or quant="int4": groups of 64, output head int8
    QuantSpec(4, 32, head=False)           --quant int4 --group-size 32 --no-quant-head, or "int4-g32+keephead"
    OffloadSpec(max_memory=6 * 2**30)      --max-memory 6GiB [--cache-policy lfu] [--expert-profile F]
    LoraSpec(rank=16)                      smoe finetune --lora-rank 16 (alpha defaults to 2 x rank)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smoe.errors import SmoeError

INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64  # 4.5 bits per weight: llama.cpp Q4_0's size, mlx-lm's default group
FALLBACK_INT4_GROUP_SIZE = 32  # the default where a model's width is not a multiple of 64
CACHE_POLICIES = ("lru", "lfu")
DEFAULT_CACHE_POLICY = "lru"
DEFAULT_LORA_RANK = 8
PEFT_DEFAULT_ALPHA = 8.0  # what peft assumes when an adapter_config.json has no lora_alpha
DEMO_MODEL = Path(__file__).parent / "assets" / "demo"  # what loads when no model is given

# the names a dtype may be given by (--dtype, smoe.load(dtype=...))
DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# the linears LoRA can wrap, by their module names, and the groups a user may name instead
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")
ROUTER_TARGET = "router"
ALL_TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS + (ROUTER_TARGET,)
TARGET_GROUPS = {"attention": ATTENTION_TARGETS, "experts": EXPERT_TARGETS, "all": ALL_TARGETS}


def parse_targets(spec: str | list[str]) -> list[str]:
    """'q_proj,v_proj' or 'attention,router' -> module names; groups: attention, experts, all."""
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in names:
        for t in TARGET_GROUPS.get(name, (name,)):
            if t not in ALL_TARGETS:
                raise SmoeError(f"unknown LoRA target {t!r}; choose from {', '.join(ALL_TARGETS)} "
                                f"or the groups {', '.join(TARGET_GROUPS)}")
            if t not in out:
                out.append(t)
    if not out:
        raise SmoeError("no LoRA targets given")
    return out
DEFAULT_LORA_TARGETS = ATTENTION_TARGETS

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def parse_size(text: str | int | float) -> int:
    """'6GiB', '512MiB', '1.5GB', '800M', 1234 -> bytes."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise SmoeError(f"cannot read the memory size {text!r}; write it like 6GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of the attention and expert linears for inference: int8 per
    output channel, or int4 with a scale and zero per group of input columns; the output head
    int8 per channel. What is not given is chosen per model by `resolve` (smoe/quantize.py):
    groups of 64 (32 where a width is not a multiple of 64), and the head quantized unless it is
    tied to the token embeddings — what llama.cpp's Q4_0 / Q8_0 and mlx-lm's default do."""

    bits: int
    group_size: int | None = None  # int4 only; None: DEFAULT_INT4_GROUP_SIZE, or FALLBACK_ where needed
    head: bool | None = None  # the output head int8 too; None: yes where the head is untied

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SmoeError(f"bits must be 8 or 4, got {self.bits}")
        if self.bits == 8 and self.group_size is not None:
            raise SmoeError(f"int8 is per output channel: a group size ({self.group_size}) is for int4 only")
        if self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise SmoeError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                            f"got {self.group_size}")

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """'int8' | 'int4' | 'int4-g32' (-g64, -g128, -g256), optionally '+head' (the output head
        int8, an error where it is tied) or '+keephead' (the head in the model's precision)."""
        base, _, suffix = text.partition("+")
        head = {"": None, "head": True, "keephead": False}.get(suffix, "?")
        group = base[6:] if base.startswith("int4-g") else ""
        if head != "?" and (base in ("int8", "int4") or group.isdigit() and int(group) in INT4_GROUP_SIZES):
            return cls(8 if base == "int8" else 4, int(group) if group else None, head=head)
        raise SmoeError(f"unknown quantization {text!r}; use int8, int4 or int4-g32/-g64/-g128/-g256, "
                        "optionally with +head or +keephead")

    @classmethod
    def from_config(cls, quantization: dict) -> QuantSpec:
        """The `quantization` entry of a smoe quantized checkpoint's config.json."""
        bits = quantization["bits"]
        return cls(bits, quantization.get("group_size") if bits == 4 else None, head=quantization.get("head") == "int8")

    @property
    def format_name(self) -> str:
        """The stored weight format this spec quantizes to (smoe/weights.py, smoe/quantize.py)."""
        return "smoe-int8" if self.bits == 8 else "smoe-int4"

    def to_config(self) -> dict:
        if self.head is None or self.bits == 4 and self.group_size is None:
            raise ValueError("resolve the spec for its model first (smoe.quantize.resolve_quant)")
        config = {"method": "smoe", "bits": self.bits, "group_size": self.group_size}
        if self.head:
            config["head"] = "int8"
        return config

    def describe(self) -> str:
        group = self.group_size or f"{DEFAULT_INT4_GROUP_SIZE} (or {FALLBACK_INT4_GROUP_SIZE})"
        kind = "int8 per output channel" if self.bits == 8 else f"int4 in groups of {group} columns"
        head = {True: ", output head int8", False: "", None: ", output head int8 where untied"}[self.head]
        return kind + head


@dataclass(frozen=True)
class OffloadSpec:
    """Experts served from a byte-budgeted store instead of all held in memory (offload.py)."""

    max_memory: int  # bytes of experts on the compute device
    policy: str = DEFAULT_CACHE_POLICY
    profile: Path | None = None  # a `smoe profile` file whose hottest experts are pinned
    prefetch: bool = True
    max_cpu_memory: int = 0  # a RAM tier under a GPU's cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_memory", parse_size(self.max_memory))
        object.__setattr__(self, "max_cpu_memory", parse_size(self.max_cpu_memory))
        if self.policy not in CACHE_POLICIES:
            raise SmoeError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(CACHE_POLICIES)}")
        if self.profile is not None:
            object.__setattr__(self, "profile", Path(self.profile))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters to train: y = W·x + (alpha / rank)·B·A·x on the target linears."""

    rank: int = DEFAULT_LORA_RANK
    alpha: float | None = None  # None: 2 x rank
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SmoeError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise SmoeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "alpha", float(2 * self.rank if self.alpha is None else self.alpha))
        object.__setattr__(self, "targets", tuple(parse_targets(self.targets)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
