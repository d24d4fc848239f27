"""LoRA (Hu et al. 2021): a frozen linear W plus a trainable low-rank update B·A.

    y = W·x + (alpha / r) · B·(A·dropout(x)),   A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

B starts at zero, so a fresh adapter leaves the model unchanged. `apply_lora` is a
transform (DESIGN.md): it wraps the chosen linears of a built model — attention
projections `q_proj`, `k_proj`, `v_proj`, `o_proj` and, unlike peft on transformers' fused
experts, each expert's `w1`, `w2`, `w3` — and freezes everything else.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads attention adapters.
Expert adapters use the same scheme with the hub's per-expert names
(`...block_sparse_moe.experts.E.w1.lora_A.weight`): a documented extension that smoe
reads and peft does not (transformers v5 stores experts as fused 3-D tensors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from smoe.errors import SmoeError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise SmoeError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        self.adapter_dtype = dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft initialises A
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.adapter_dtype)))  # [..., out]
        return y + (update * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update as a dense matrix [out, in]: (alpha / r) · B·A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise SmoeError("only adapters over a plain (unquantized, unpacked) linear can be merged")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def _targets(model, targets) -> list[tuple[str, nn.Module, str]]:
    """(our module path, parent module, attribute) for each linear to wrap."""
    unknown = set(targets) - set(ATTENTION_TARGETS) - set(EXPERT_TARGETS)
    if unknown:
        raise SmoeError(f"unknown LoRA target(s) {sorted(unknown)}; choose from "
                        f"{', '.join(ATTENTION_TARGETS + EXPERT_TARGETS)}")
    found = []
    for i, layer in enumerate(model.layers):
        for name in ATTENTION_TARGETS:
            if name in targets:
                found.append((f"layers.{i}.attn.{name}", layer.attn, name))
        for e, expert in enumerate(layer.moe.experts):
            for name in EXPERT_TARGETS:
                if name in targets:
                    found.append((f"layers.{i}.moe.experts.{e}.{name}", expert, name))
    return found


def apply_lora(model, targets=("q_proj", "v_proj"), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Wrap the target linears in LoRALinear, freeze all else; returns the wrapped paths."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    wrapped = []
    for path, parent, attr in _targets(model, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
        wrapped.append(path)
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets)}
    return wrapped


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model, unwrap: bool = False) -> None:
    """Fold every adapter into its base weight; with unwrap, put the plain base linears back
    in place of the wrappers (a model that saves like any other)."""
    for m in lora_modules(model).values():
        m.merge()
    if unwrap:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.base)


def unmerge_lora(model) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def _peft_key(ours: str) -> str:
    """layers.3.attn.q_proj -> base_model.model.model.layers.3.self_attn.q_proj (PEFT's key prefix)."""
    parts = ours.split(".")
    i = parts[1]
    if parts[2] == "attn":
        return f"base_model.model.model.layers.{i}.self_attn.{parts[3]}"
    return f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{parts[4]}.{parts[5]}"


def save_adapter(model, path: str | Path, base_model: str | None = None) -> None:
    from safetensors.torch import save_file

    from smoe.checkpoint import atomic_write

    modules = lora_modules(model)
    if not modules:
        raise SmoeError("the model has no LoRA adapters to save")
    path = Path(path)
    tensors = {}
    for name, m in modules.items():
        key = _peft_key(name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    cfg = model.lora_config
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": cfg["target_modules"], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    experts = sorted(set(cfg["target_modules"]) & set(EXPERT_TARGETS))
    if experts:  # smoe's extension: peft cannot place these on transformers' fused experts
        config["smoe_expert_targets"] = experts
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), {"format": "pt"}))
    atomic_write(path / "adapter_config.json", lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))


def load_adapter(model, path: str | Path) -> None:
    """Apply a PEFT-format LoRA adapter directory to a (plain, unpacked) model."""
    from smoe.checkpoint import read_safetensors

    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise SmoeError(f"{path}: no adapter_config.json; is this a LoRA adapter directory?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise SmoeError(f"{config_file}: not valid JSON ({e.msg})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise SmoeError(f"{config_file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise SmoeError(f"{config_file}: target_modules as a regex is not supported; list the module names")
    apply_lora(model, targets, rank=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])))
    stored = read_safetensors(path / "adapter_model.safetensors")
    for name, m in lora_modules(model).items():
        key = _peft_key(name)
        for part in ("lora_A", "lora_B"):
            t = stored.get(f"{key}.{part}.weight")
            if t is None:
                raise SmoeError(f"{path / 'adapter_model.safetensors'}: missing tensor '{key}.{part}.weight'")
            target = getattr(m, part).weight
            if tuple(t.shape) != tuple(target.shape):
                raise SmoeError(f"{path / 'adapter_model.safetensors'}: tensor '{key}.{part}.weight' has shape "
                                f"{list(t.shape)}, expected {list(target.shape)}")
            with torch.no_grad():
                target.copy_(t.tensor.to(target.dtype))
