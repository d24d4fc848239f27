"""ModelConfig: one dataclass for every Mixtral-architecture checkpoint.

It reads, 1:1, the two config formats Mixtral checkpoints ship with:

- Hugging Face ``config.json`` (``model_type: "mixtral"``), as written by
  transformers v4 (top-level ``rope_theta``) and v5 (``rope_parameters``,
  ``head_dim: null``);
- Mistral ``params.json`` (``dim``, ``n_layers``, ... with a ``moe`` section).

Field names follow the Hugging Face config, because that is the layout most
checkpoints use and the one smoe writes back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smoe.errors import ConfigError

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_NOT_HF_FIELDS = ("extra", "torch_dtype", "rope_theta", "quantization")  # written under other names, or only if set


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.001
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if it says
    # weight-only quantization of a smoe quantized checkpoint: {"method": "smoe", "bits": 8 | 4, "group_size": G,
    # "head": "int8" (or absent), "format": {"name": "smoe-int4", "version": 1} (absent: before format 1)}
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # fields we keep but do not use

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_local_experts",
            "num_experts_per_tok", "head_dim", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ConfigError(f"sliding_window must be null or a positive integer, got {self.sliding_window!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.quantization is not None:
            q = self.quantization
            # smoe's int8 / int4, or another registered weight format (smoe/weights.py) named by its
            # `format`, whose own spec_from_config reads the rest of the entry
            other = isinstance(q, dict) and isinstance(q.get("method"), str) and q.get("method") != "smoe" \
                and isinstance(q.get("format"), dict)
            if not other and (not isinstance(q, dict) or q.get("method") != "smoe" or q.get("bits") not in (4, 8)):
                raise ConfigError(f"quantization must be {{\"method\": \"smoe\", \"bits\": 8 or 4, ...}}, "
                                  f"got {q!r}; smoe reads the quantized checkpoints that `smoe quantize` writes")
            fmt = q.get("format", {"name": "", "version": 0})
            if not isinstance(fmt, dict) or not isinstance(fmt.get("name"), str) or type(fmt.get("version")) is not int:
                raise ConfigError(f"quantization.format must be {{\"name\": ..., \"version\": N}} or absent, "
                                  f"got {fmt!r}")
            if not other and q.get("head") not in (None, "int8"):
                raise ConfigError(f"quantization.head must be \"int8\" or absent, got {q.get('head')!r}")
            if not other and q["bits"] == 4 and q.get("group_size") not in (32, 64, 128, 256):
                raise ConfigError(f"quantization.group_size must be 32, 64, 128 or 256 for 4 bits, "
                                  f"got {q.get('group_size')!r}")

    # ----------------------------------------------------------------- derived
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in total and those one token touches (2 of 8 experts for Mixtral)."""
        H, F, D = self.hidden_size, self.intermediate_size, self.head_dim
        attn = H * D * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        expert = 3 * H * F
        router = H * self.num_local_experts
        norms = 2 * H
        per_layer_dense = attn + router + norms
        embed = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        L = self.num_hidden_layers
        total = L * (per_layer_dense + self.num_local_experts * expert) + embed + head + H
        # an embedding lookup reads one row (none extra when tied to the head); the head reads all
        embed_row = 0 if self.tie_word_embeddings else H
        active = L * (per_layer_dense + self.num_experts_per_tok * expert) + H + embed_row + self.vocab_size * H
        return {"total": total, "active": active, "experts": L * self.num_local_experts * expert}

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "mixtral":
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; smoe runs 'mixtral' checkpoints"
            )
        required = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_local_experts", "num_experts_per_tok",
        ]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s): {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")

        # RoPE: v4 writes rope_theta (+ rope_scaling) at top level, v5 writes rope_parameters.
        rope_params = d.get("rope_parameters")
        top_theta = d.get("rope_theta")
        if rope_params is not None:
            if not isinstance(rope_params, dict):
                raise ConfigError(f"{source}: rope_parameters must be an object")
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            theta = rope_params.get("rope_theta", top_theta)
            if top_theta is not None and theta is not None and float(top_theta) != float(theta):
                raise ConfigError(
                    f"{source}: rope_theta ({top_theta}) contradicts rope_parameters.rope_theta ({theta})"
                )
        else:
            scaling = d.get("rope_scaling") or {}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            theta = top_theta
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
        if theta is None:
            theta = 1e6  # transformers' MixtralConfig default

        num_heads = d["num_attention_heads"]
        known = {f for f in cls.__dataclass_fields__} | {
            "rope_parameters", "rope_scaling", "hidden_act", "model_type", "dtype",
        }
        cfg = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            num_local_experts=d["num_local_experts"],
            num_experts_per_tok=d["num_experts_per_tok"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 4096 * 32),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            sliding_window=d.get("sliding_window"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            router_jitter_noise=float(d.get("router_jitter_noise", 0.0)),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            torch_dtype=d.get("dtype", d.get("torch_dtype")),
            quantization=d.get("quantization"),
            extra={k: v for k, v in d.items() if k not in known},
        )
        return cfg

    @classmethod
    def from_mistral_dict(cls, d: dict[str, Any], source: str = "params.json") -> ModelConfig:
        required = ["dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s): {', '.join(missing)}")
        moe = d.get("moe")
        if not isinstance(moe, dict) or "num_experts" not in moe or "num_experts_per_tok" not in moe:
            raise ConfigError(
                f"{source}: no 'moe' section with num_experts and num_experts_per_tok; "
                "smoe runs mixture-of-experts (Mixtral) checkpoints"
            )
        n_heads = d["n_heads"]
        head_dim = d.get("head_dim")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["dim"],
            intermediate_size=d["hidden_dim"],
            num_hidden_layers=d["n_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("n_kv_heads") or n_heads,
            num_local_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"],
            head_dim=head_dim,
            max_position_embeddings=d.get("max_seq_len") or 32768,
            rms_norm_eps=float(d.get("norm_eps", 1e-5)),
            # the first Mistral releases omit rope_theta and use the RoPE paper's 10000
            rope_theta=float(d.get("rope_theta") or 1e4),
            sliding_window=d.get("sliding_window"),
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (HF) or, failing that, ``params.json`` (Mistral)."""
        path = Path(path)
        for name, reader in (("config.json", cls.from_hf_dict), ("params.json", cls.from_mistral_dict)):
            file = path / name
            if file.exists():
                return reader(_read_json(file), source=str(file))
        raise ConfigError(f"{path}: no config.json or params.json found; is this a checkpoint directory?")

    # ----------------------------------------------------------------- writers
    def to_hf_dict(self) -> dict[str, Any]:
        d = {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **{k: v for k, v in asdict(self).items() if k not in _NOT_HF_FIELDS},
            "hidden_act": "silu",
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        }
        if self.torch_dtype:
            d["dtype"] = self.torch_dtype
        if self.quantization:
            d["quantization"] = dict(self.quantization)
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def describe(self) -> dict:
        """Sizes a user plans by: parameters (total, active per token), and per dtype the
        weights' bytes, the bytes one decode step reads and the KV cache per token."""
        counts = self.parameter_counts()
        kv_per_token = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
        memory = {dtype: {"weights_bytes": counts["total"] * size,
                          "bytes_read_per_token": self.bytes_per_token(dtype),
                          "kv_cache_bytes_per_token": kv_per_token * size}
                  for dtype, size in _DTYPE_BYTES.items()}
        return {
            "config": {k: v for k, v in self.to_hf_dict().items() if k != "architectures"},
            "parameters": counts["total"],
            "active_parameters_per_token": counts["active"],
            "expert_parameters": counts["experts"],
            "memory": memory,
        }

    def bytes_per_token(self, dtype: str) -> int:
        """Weight bytes one decode step reads at batch 1 (active parameters)."""
        return self.parameter_counts()["active"] * _DTYPE_BYTES[dtype]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return data
