"""LoRA (Hu et al. 2021): a frozen linear W plus a trainable low-rank update B·A.

    y = W·x + (alpha / r) · B·(A·dropout(x)),   A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

B starts at zero, so a fresh adapter leaves the model unchanged. `apply_lora` is a
transform (DESIGN.md): it wraps the chosen linears of a built model — attention
projections `q_proj`, `k_proj`, `v_proj`, `o_proj`; unlike peft on transformers' fused
experts, each expert's `w1`, `w2`, `w3`; and optionally the `router` (its logits get the
low-rank update before the softmax) — and freezes everything else. The base may be a
plain linear or a quantized one (NF4Linear): LoRA over a frozen 4-bit base is QLoRA.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads attention adapters.
Expert and router adapters use the same key scheme with the hub's per-expert names —
`...block_sparse_moe.experts.E.w1.lora_A.weight`, `...block_sparse_moe.gate.lora_A.weight` —
a documented extension that smoe reads and peft does not place (transformers v5 stores
experts as fused 3-D tensors): they are listed in `smoe_expert_targets` and
`smoe_router` in adapter_config.json, and kept out of `target_modules`, so peft loads
the attention part of such an adapter and ignores the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smoe.checkpoint import atomic_write, read_safetensors
from smoe.errors import SmoeError
from smoe.options import ATTENTION_TARGETS, EXPERT_TARGETS, PEFT_DEFAULT_ALPHA, ROUTER_TARGET, LoraSpec


def _dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (nn.Linear, NF4Linear, Router)."""
    if hasattr(base, "in_features"):
        return base.in_features, base.out_features
    out_features, in_features = base.weight.shape
    return in_features, out_features


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise SmoeError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = _dims(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # adapters train in the base's precision when it is a float weight, else (NF4) in fp32
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        dtype = adapter_dtype or dtype
        self.adapter_dtype = dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # as peft initialises A
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) · B·A·dropout(x), in the adapter's precision: [..., out]."""
        return self.lora_B(self.lora_A(self.dropout(x).to(self.adapter_dtype))) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.update(x).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update as a dense matrix [out, in]: (alpha / r) · B·A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        if not isinstance(getattr(self.base, "weight", None), nn.Parameter):
            raise SmoeError("only adapters over a plain (unquantized, unpacked) weight can be merged")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


class LoRARouter(LoRALinear):
    """LoRA on the router's logits: route(x·Wgᵀ + (alpha / r)·B·A·x), then softmax -> top-k as before."""

    def forward(self, x: torch.Tensor):
        router_logits = F.linear(x, self.base.weight)  # [N, E]
        if not self.merged:
            router_logits = router_logits + self.update(x).to(router_logits.dtype)
        return self.base.route(router_logits)


def _targets(model, targets: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(our module path, parent module, attribute) for each linear to wrap; targets as parse_targets gives them."""
    found = []
    for i, layer in enumerate(model.layers):
        for name in ATTENTION_TARGETS:
            if name in targets:
                found.append((f"layers.{i}.attn.{name}", layer.attn, name))
        if ROUTER_TARGET in targets:
            found.append((f"layers.{i}.moe.router", layer.moe, "router"))
        if not any(name in targets for name in EXPERT_TARGETS):
            continue
        first = getattr(layer.moe.experts, "first", 0)  # a rank's share of the experts (parallel.py) starts there
        for e, expert in enumerate(layer.moe.experts, first):  # the ExpertList: LoRA goes on before stacking
            for name in EXPERT_TARGETS:
                if name in targets:
                    found.append((f"layers.{i}.moe.experts.{e}.{name}", expert, name))
    return found


def apply_lora(model, spec: LoraSpec, seed: int = 0, adapter_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the spec's target linears in LoRALinear (the router in LoRARouter), freeze all else;
    returns the wrapped paths. `seed` fixes the random A matrices (the global RNG is untouched);
    adapter_dtype: the adapters' precision (default: the base weight's, fp32 over quantized bases)."""
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    wrapped = []
    for path, parent, attr in _targets(model, spec.targets):
        kind = LoRARouter if attr == "router" else LoRALinear
        setattr(parent, attr, kind(getattr(parent, attr), spec.rank, spec.alpha, spec.dropout, generator,
                                   adapter_dtype))
        wrapped.append(path)
    model.lora_spec = spec
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
    """Our module path -> PEFT's key prefix (hub names):
    layers.3.attn.q_proj        -> base_model.model.model.layers.3.self_attn.q_proj
    layers.3.moe.router         -> base_model.model.model.layers.3.block_sparse_moe.gate
    layers.3.moe.experts.5.w1   -> base_model.model.model.layers.3.block_sparse_moe.experts.5.w1"""
    parts = ours.split(".")
    i = parts[1]
    if parts[2] == "attn":
        return f"base_model.model.model.layers.{i}.self_attn.{parts[3]}"
    if parts[3] == "router":
        return f"base_model.model.model.layers.{i}.block_sparse_moe.gate"
    return f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{parts[4]}.{parts[5]}"


def save_adapter(model, path: str | Path, base_model: str | None = None) -> None:
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise SmoeError("the model has no LoRA adapters to save")
    path = Path(path)
    tensors = {}
    for name, m in modules.items():
        key = _peft_key(name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    spec: LoraSpec = model.lora_spec
    targets = spec.targets
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": [t for t in ATTENTION_TARGETS if t in targets], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    # smoe's extension: peft cannot place these on transformers' fused experts and router
    experts = [t for t in EXPERT_TARGETS if t in targets]
    if experts:
        config["smoe_expert_targets"] = experts
    if ROUTER_TARGET in targets:
        config["smoe_router"] = True
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), {"format": "pt"}))
    atomic_write(path / "adapter_config.json", lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))


def read_adapter_config(path: str | Path) -> LoraSpec:
    """adapter_config.json -> the LoraSpec it describes (smoe target names; a missing
    lora_alpha means what it means to peft, PEFT_DEFAULT_ALPHA)."""
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
    if "r" not in config:
        raise SmoeError(f"{config_file}: missing field 'r' (the LoRA rank)")
    # "gate" is the router's hub name, as peft on transformers v4 wrote it
    targets = [ROUTER_TARGET if t == "gate" else t for t in targets] + list(config.get("smoe_expert_targets", []))
    if config.get("smoe_router"):
        targets.append(ROUTER_TARGET)
    try:
        return LoraSpec(rank=int(config["r"]), alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
                        dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(targets))
    except (SmoeError, TypeError, ValueError) as e:
        raise SmoeError(f"{config_file}: {e}") from None


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy a saved adapter's A and B matrices into a model that already carries the same adapters."""

    file = Path(path) / "adapter_model.safetensors"
    stored = read_safetensors(file)
    for name, m in lora_modules(model).items():
        key = _peft_key(name)
        for part in ("lora_A", "lora_B"):
            t = stored.get(f"{key}.{part}.weight")
            if t is None:
                raise SmoeError(f"{file}: missing tensor '{key}.{part}.weight'")
            target = getattr(m, part).weight
            if tuple(t.shape) != tuple(target.shape):
                raise SmoeError(f"{file}: tensor '{key}.{part}.weight' has shape "
                                f"{list(t.shape)}, expected {list(target.shape)}")
            with torch.no_grad():
                target.copy_(t.tensor.to(target.dtype))


def load_adapter(model, path: str | Path) -> None:
    """Apply a PEFT-format LoRA adapter directory to a (plain or quantized, unpacked) model."""
    apply_lora(model, read_adapter_config(path))
    load_adapter_weights(model, path)
