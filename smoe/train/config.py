"""TrainConfig: one dataclass for a training or fine-tuning run, read 1:1 from JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from smoe.errors import SmoeError
from smoe.options import LoraSpec


@dataclass
class TrainConfig:
    out: str
    model: dict | None = None  # HF config.json fields of a new model ...
    init_from: str | None = None  # ... or a checkpoint directory to continue from
    train_data: str = "data/corpus/train.jsonl"
    heldout_data: str | None = "data/corpus/heldout.jsonl"
    tokenizer: str | None = "data/corpus/tokenizer.json"  # None: the init_from model's own
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02
    aux_loss_per_layer: bool = True  # False = transformers' pooled formulation (see load_balancing_loss)
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    autocast: str = "bf16"  # "bf16" (CPU autocast) or "none" (fp32)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250  # 0: five evaluations over the run
    eval_tokens: int = 8192  # held-out tokens per domain
    save_every: int = 250  # 0: five checkpoints over the run
    keep_checkpoints: int = 2
    threads: int | None = None
    epochs: float | None = None  # when set, max_steps = epochs over the training data
    chat: bool = False  # train_data holds {"messages": [...]} conversations: learn assistant tokens only
    gradient_checkpointing: bool = False
    # LoRA fine-tuning: {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", ...], "quantize": "nf4" | None}
    # (missing fields take LoraSpec's defaults: rank 8, alpha 2 x rank, the attention projections)
    lora: dict | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SmoeError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise SmoeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SmoeError(f"{path}: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
        if "out" not in data:
            raise SmoeError(f"{path}: missing field 'out' (the run directory)")
        cfg = cls(**data)
        if (cfg.model is None) == (cfg.init_from is None):
            raise SmoeError(f"{path}: give exactly one of 'model' (a new model's config) or 'init_from'")
        try:
            cfg.validate()
        except SmoeError as e:
            raise SmoeError(f"{path}: {e}") from None
        return cfg

    def validate(self) -> None:
        if self.autocast not in ("bf16", "none"):
            raise SmoeError("autocast must be 'bf16' or 'none'")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise SmoeError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SmoeError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise SmoeError(f"epochs must be positive, got {self.epochs}")
        if self.lora is not None:
            if self.init_from is None:
                raise SmoeError("LoRA fine-tuning needs a base model: set 'init_from'")
            known = {"rank", "alpha", "dropout", "targets", "quantize"}
            unknown = sorted(set(self.lora) - known)
            if unknown:
                raise SmoeError(f"lora: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
            if self.lora.get("quantize") not in (None, "nf4"):
                raise SmoeError(f"lora.quantize must be 'nf4' or null, got {self.lora['quantize']!r}")
            try:
                self.lora_spec()
            except SmoeError as e:
                raise SmoeError(f"lora: {e}") from None

    def lora_spec(self) -> LoraSpec:
        """The adapters of a LoRA run (lora.quantize is the base's format, not the adapters')."""
        fields_ = {k: v for k, v in self.lora.items() if k != "quantize"}
        if isinstance(fields_.get("targets"), list):
            fields_["targets"] = tuple(fields_["targets"])
        return LoraSpec(**fields_)
