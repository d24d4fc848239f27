"""Checkpoints: safetensors files (single or sharded), three name layouts, strict validation.

Layouts, one declarative name table each (`_names_for`):

- ``hf``: the Hugging Face hub layout, one tensor per expert projection
  (``model.layers.N.block_sparse_moe.experts.E.w1.weight``);
- ``hf_fused``: what transformers v5 holds in memory and can save, all experts of a layer
  in two 3-D tensors (``model.layers.N.mlp.experts.gate_up_proj`` [E, 2F, H] = w1 then w3
  along dim 1, ``...down_proj`` [E, H, F]);
- ``mistral``: Mistral's ``consolidated.safetensors`` + ``params.json``, whose q/k rows
  pair rotary dimensions (2i, 2i+1) where the HF layout pairs (i, i + D/2).

This module reads, validates and assigns; it never builds or transforms a model. The loader
(smoe/loader.py's build_model) builds the model on the ``meta`` device; `load_state` maps
every file and assigns the mapped tensors to its parameters (`load_state_dict(assign=True)`):
a tensor already in the wanted dtype is never copied, so weights are not held twice.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from smoe.config import ModelConfig
from smoe.errors import CheckpointError, ConfigError
from smoe.fsutil import atomic_write, release_pages
from smoe.kernels import in_inference_layout
from smoe.options import DTYPE_NAMES, parse_dtype
from smoe.quantize import STORED_FORMATS, legacy_int4_mins, legacy_int4_qweight, legacy_int4_scales
from smoe.weights import WeightFormat, format_named, formats

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
WEIGHT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# --------------------------------------------------------------------------- safetensors


@dataclass
class StoredTensor:
    """A tensor in a file: where it is, and a zero-copy view of it once mapped."""

    file: Path
    name: str
    dtype_name: str
    shape: tuple[int, ...]
    tensor: torch.Tensor  # a view into the file's memory map


def read_safetensors(path: Path) -> dict[str, StoredTensor]:
    """Memory-map one .safetensors file and return views of its tensors, checking the header
    against the file size so a truncated or corrupt file fails here, by name."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes); re-download or re-save it")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header; re-download the file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download the file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file")
        data_start = 8 + header_len
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else b""
    data = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {dtype_name}, which smoe does not read; "
                "convert the checkpoint to bf16, fp16 or fp32"
            )
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * dtype.itemsize or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: corrupt header: tensor '{name}' offsets do not match its shape")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor '{name}' ends at byte {data_start + end} "
                f"but the file has {size} bytes; re-download or re-save it"
            )
        raw = data[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # unaligned: a view cannot be reinterpreted, copy this one
        tensors[name] = StoredTensor(path, name, dtype_name, shape, raw.view(dtype).view(shape))
    return tensors


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    """The files holding the weights, and their kind ('safetensors' or 'pickle')."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (expected a 'weight_map' object)") from None
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            if not (path / shard).exists():
                raise CheckpointError(f"{index}: shard '{shard}' is missing from {path}; download it again")
            files.append(path / shard)
        return files, "safetensors"
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: weights are pickle files ({', '.join(p.name for p in pickles)}), which can run code "
                "when loaded; smoe reads safetensors. Convert them once with\n"
                "  python -c \"import torch, safetensors.torch as st; "
                f"st.save_file(torch.load('{pickles[0]}', weights_only=True), '{path}/model.safetensors')\"\n"
                "or, if you trust the files, pass --allow-pickle (smoe.load(..., allow_pickle=True)); "
                "they are then read with torch.load(weights_only=True)"
            )
        return pickles, "pickle"
    raise CheckpointError(f"{path}: no weights found (*.safetensors, or pickle *.bin/*.pt/*.pth)")


def open_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, StoredTensor]:
    files, kind = _weight_files(path, allow_pickle)
    stored: dict[str, StoredTensor] = {}
    for file in files:
        if kind == "safetensors":
            found = read_safetensors(file)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(f"{file}: cannot be read as weights-only pickle ({e})") from None
            found = {
                name: StoredTensor(file, name, str(t.dtype), tuple(t.shape), t) for name, t in state.items()
            }
        for name, t in found.items():
            if name in stored:
                raise CheckpointError(f"tensor '{name}' appears in both {stored[name].file} and {file}")
            stored[name] = t
    return stored


# --------------------------------------------------------------------------- name tables

# For each of our parameter names: (checkpoint tensor name, how to get our tensor from it,
# how to turn ours back into the checkpoint's when saving).
Take = Callable[[torch.Tensor], torch.Tensor]
NameTable = dict[str, tuple[str, Take, Take]]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral q/k rows [n_heads * D, H] with rotary pairs (2i, 2i+1) -> HF pairs (i, i + D/2)."""
    rows, cols = w.shape
    D = rows // n_heads
    return w.view(n_heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    D = rows // n_heads
    return w.view(n_heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)


def _names_for(config: ModelConfig, layout: str) -> NameTable:
    table: NameTable = {}
    E, F = config.num_local_experts, config.intermediate_size

    def add(ours: str, theirs: str, take: Take = _identity, give: Take = _identity) -> None:
        table[ours] = (theirs, take, give)

    if layout in ("hf", "hf_fused"):
        add("embed_tokens.weight", "model.embed_tokens.weight")
        add("norm.weight", "model.norm.weight")
        if not config.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight")
        moe = "block_sparse_moe" if layout == "hf" else "mlp"
        for i in range(config.num_hidden_layers):
            src, dst = f"model.layers.{i}", f"layers.{i}"
            add(f"{dst}.attn_norm.weight", f"{src}.input_layernorm.weight")
            add(f"{dst}.ffn_norm.weight", f"{src}.post_attention_layernorm.weight")
            for p in "qkvo":
                add(f"{dst}.attn.{p}_proj.weight", f"{src}.self_attn.{p}_proj.weight")
            add(f"{dst}.moe.router.weight", f"{src}.{moe}.gate.weight")
            for e in range(E):
                ours = f"{dst}.moe.experts.{e}"
                if layout == "hf":
                    for w in ("w1", "w2", "w3"):
                        add(f"{ours}.{w}.weight", f"{src}.{moe}.experts.{e}.{w}.weight")
                else:  # slices of the fused tensors: views, no copies
                    add(f"{ours}.w1.weight", f"{src}.mlp.experts.gate_up_proj", lambda t, e=e: t[e, :F])
                    add(f"{ours}.w3.weight", f"{src}.mlp.experts.gate_up_proj", lambda t, e=e: t[e, F:])
                    add(f"{ours}.w2.weight", f"{src}.mlp.experts.down_proj", lambda t, e=e: t[e])
    elif layout == "mistral":
        add("embed_tokens.weight", "tok_embeddings.weight")
        add("norm.weight", "norm.weight")
        add("lm_head.weight", "output.weight")
        Q, G = config.num_attention_heads, config.num_key_value_heads
        for i in range(config.num_hidden_layers):
            src, dst = f"layers.{i}", f"layers.{i}"
            add(f"{dst}.attn_norm.weight", f"{src}.attention_norm.weight")
            add(f"{dst}.ffn_norm.weight", f"{src}.ffn_norm.weight")
            add(f"{dst}.attn.q_proj.weight", f"{src}.attention.wq.weight",
                lambda t: interleaved_to_half(t, Q), lambda t: half_to_interleaved(t, Q))
            add(f"{dst}.attn.k_proj.weight", f"{src}.attention.wk.weight",
                lambda t: interleaved_to_half(t, G), lambda t: half_to_interleaved(t, G))
            add(f"{dst}.attn.v_proj.weight", f"{src}.attention.wv.weight")
            add(f"{dst}.attn.o_proj.weight", f"{src}.attention.wo.weight")
            add(f"{dst}.moe.router.weight", f"{src}.feed_forward.gate.weight")
            for e in range(E):
                for w in ("w1", "w2", "w3"):
                    add(f"{dst}.moe.experts.{e}.{w}.weight", f"{src}.feed_forward.experts.{e}.{w}.weight")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return table


def _with_quantized(table: NameTable, ours_names: set[str], where: Path | str) -> NameTable:
    """The table with each quantized linear's `X.weight` entry replaced by its stored parts
    (`X.qweight` and `X.scales`, and int4's `X.mins`) under the same checkpoint prefix."""
    out: NameTable = {}
    for ours, (theirs, take, give) in table.items():
        if ours in ours_names or not ours.endswith(".weight"):
            out[ours] = (theirs, take, give)
            continue
        prefix, their_prefix = ours[: -len("weight")], theirs[: -len("weight")]
        parts = [n for n in ours_names if n.startswith(prefix) and "." not in n[len(prefix):]]
        if not parts or take is not _identity:
            raise CheckpointError(f"{where}: quantized checkpoints use the HF per-expert layout; "
                                  f"cannot place '{ours}'")
        for name in parts:
            out[name] = (their_prefix + name[len(prefix):], _identity, _identity)
    return out


def _int4_before_format_1(table: NameTable, expected: dict[str, tuple[int, ...]]) -> NameTable:
    """The table for an int4 checkpoint written before format 1 (no `format` in its
    quantization): each int4 linear's qweight, scales and mins are converted at load from
    what it stored, aten's AVX-512 `qweight` [N_pad, K/2] and `scales_and_zeros` [K/G, N_pad, 2]
    (smoe/quantize.py's legacy_int4_*). Loading only: a model saves in the current format."""
    def refuse(t: torch.Tensor) -> torch.Tensor:
        raise CheckpointError("a checkpoint is written in the current int4 format only")

    out = dict(table)
    for ours, (theirs, _, _) in table.items():
        if ours.endswith(".mins"):
            prefix, their_prefix, n = ours[: -len("mins")], theirs[: -len("mins")], expected[ours][0]
            out[prefix + "qweight"] = (their_prefix + "qweight", partial(legacy_int4_qweight, out_features=n), refuse)
            for name, convert in (("scales", legacy_int4_scales), ("mins", legacy_int4_mins)):
                out[prefix + name] = (their_prefix + "scales_and_zeros", partial(convert, out_features=n), refuse)
    return out


def stored_format(config: ModelConfig, where: Path | str) -> tuple[WeightFormat, int]:
    """The weight format (smoe/weights.py) a quantized checkpoint is stored in, and its version:
    smoe's int8 / int4 (STORED_FORMATS; version 0 for a checkpoint written before formats were
    recorded) or any other registered format by its name. A newer version than this smoe reads,
    or a format it does not have, is an error."""
    q = config.quantization
    if q.get("method") != "smoe":  # another registered format, by name
        fmt, version = format_named(q["format"]["name"]), q["format"]["version"]
        if fmt is None or fmt.spec_from_config is None or not 0 < version <= fmt.version:
            have = ", ".join(f"{f.name} v{f.version}" for f in formats() if f.spec_from_config)
            raise ConfigError(f"{where}: quantization.format is {q['format']!r}, a weight format this smoe does not "
                              f"have (it has {have}): register it before loading (smoe.weights.register_format), "
                              "or upgrade smoe")
        return fmt, version
    known = STORED_FORMATS[q["bits"]]
    if "format" not in q:
        return format_named(known["name"]), 0
    name, version = q["format"].get("name"), q["format"].get("version")
    if name != known["name"] or not isinstance(version, int) or not 0 < version <= known["version"]:
        raise ConfigError(f"{where}: quantization.format is {q['format']!r}; this smoe reads {known['name']} "
                          f"versions 1..{known['version']} for {q['bits']} bits: upgrade smoe, or quantize the "
                          "original checkpoint again with this one (smoe quantize)")
    return format_named(name), version


def detect_layout(names: set[str], where: Path) -> str:
    if any(".block_sparse_moe." in n for n in names):
        return "hf"
    if any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
        return "hf_fused"
    if "tok_embeddings.weight" in names or any(".feed_forward." in n for n in names):
        return "mistral"
    raise CheckpointError(
        f"{where}: tensor names match no known Mixtral layout (HF block_sparse_moe, HF fused mlp.experts, "
        f"or Mistral consolidated); first names: {sorted(names)[:3]}"
    )


def _expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}


def _check_config_matches(config: ModelConfig, stored: dict[str, StoredTensor], layout: str, where: Path) -> None:
    """Catch a config.json that belongs to another model before per-tensor shape errors."""
    embed = "tok_embeddings.weight" if layout == "mistral" else "model.embed_tokens.weight"
    if embed in stored:
        expected = (config.vocab_size, config.hidden_size)
        if stored[embed].shape != expected:
            raise ConfigError(
                f"{where}: the config does not match the weights: it says vocab_size={config.vocab_size}, "
                f"hidden_size={config.hidden_size}, but '{embed}' in {stored[embed].file.name} has shape "
                f"{list(stored[embed].shape)}"
            )
    layer_ids = {int(m.group(1)) for n in stored if (m := re.search(r"layers\.(\d+)\.", n))}
    if layer_ids and max(layer_ids) + 1 != config.num_hidden_layers:
        raise ConfigError(
            f"{where}: the config does not match the weights: it says num_hidden_layers="
            f"{config.num_hidden_layers}, but the weights have {max(layer_ids) + 1} layers"
        )
    if layout != "hf_fused":
        expert_ids = {int(m.group(1)) for n in stored if (m := re.search(r"experts\.(\d+)\.", n))}
        if expert_ids and max(expert_ids) + 1 != config.num_local_experts:
            raise ConfigError(
                f"{where}: the config does not match the weights: it says num_local_experts="
                f"{config.num_local_experts}, but the weights have {max(expert_ids) + 1} experts per layer"
            )


def load_state(
    model: torch.nn.Module,
    config: ModelConfig,
    stored: dict[str, StoredTensor],
    where: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    defer: Callable[[str], bool] | None = None,
    stored_version: int | None = None,
) -> dict[str, torch.Tensor]:
    """Map, validate and assign checkpoint tensors to a model built on the meta device;
    a quantized checkpoint's tensors are in format `stored_version` (stored_format).

    Parameters for which `defer(name)` is true are validated but not assigned: they are
    returned as views of the file (their stored dtype, unaligned, nothing read yet) and
    stay on `meta` in the model — the expert store of smoe/offload.py reads them later."""
    layout = detect_layout(set(stored), where)
    _check_config_matches(config, stored, layout, where)
    expected = _expected_shapes(model)
    table = _names_for(config, layout)
    if config.quantization:
        table = _with_quantized(table, set(expected), where)
        if config.quantization.get("bits") == 4 and stored_version == 0:
            table = _int4_before_format_1(table, expected)
    used = {theirs for theirs, _, _ in table.values()}
    missing = sorted(used - set(stored))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'{more} for the {layout} layout")
    # some older checkpoints carry RoPE's inverse frequencies, which the model recomputes from the config
    unexpected = sorted(n for n in set(stored) - used if not n.endswith("rotary_emb.inv_freq"))
    if config.tie_word_embeddings and layout != "mistral":
        unexpected = [n for n in unexpected if n != "lm_head.weight"]  # tied: a saved copy is redundant
    if unexpected:
        file = stored[unexpected[0]].file
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{file}: unexpected tensor '{unexpected[0]}'{more}: it is not part of a Mixtral model with this config"
        )
    quantized_parts = {theirs for ours, (theirs, _, _) in table.items() if ours.endswith(".qweight")}
    for theirs in used:
        t = stored[theirs]
        if theirs in quantized_parts:
            if t.tensor.dtype not in (torch.int8, torch.uint8):
                raise CheckpointError(f"{t.file}: quantized tensor '{theirs}' has dtype {t.dtype_name}; "
                                      "expected I8 or U8")
        elif t.tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"{t.file}: tensor '{theirs}' has unsupported dtype {t.dtype_name}; "
                "weights must be F32, F16 or BF16"
            )

    state, deferred = {}, {}
    for ours, (theirs, take, _) in table.items():
        t = stored[theirs]
        try:
            value = take(t.tensor)
        except RuntimeError:
            value = None
        if value is None or tuple(value.shape) != expected[ours]:
            raise CheckpointError(
                f"{t.file}: tensor '{theirs}' has shape {list(t.shape)}, which does not fit "
                f"'{ours}' of shape {list(expected[ours])} for this config"
            )
        if defer is not None and defer(ours):
            deferred[ours] = value
            continue
        if not value.is_floating_point() and value.data_ptr() % 64:
            # quantized codes: the int8/int4 CPU kernels fault on rows that are not 64-byte aligned,
            # and safetensors packs tensors back to back, so give misaligned ones memory of their own
            source, value = value, value.clone()
            release_pages(source)
        state[ours] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != set(deferred) or unexpected:  # the name table covers the model exactly
        raise CheckpointError(f"{where}: cannot place {sorted(set(missing) - set(deferred) or unexpected)[:3]}")
    return deferred


# --------------------------------------------------------------------------- save


def hf_state_dict(model: torch.nn.Module, layout: str = "hf") -> dict[str, torch.Tensor]:
    """Our parameters under the names of a checkpoint layout ('hf', 'hf_fused' or 'mistral')."""
    config: ModelConfig = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    table = _names_for(config, layout)
    if config.quantization:
        if layout != "hf":
            raise CheckpointError("a quantized model saves in the 'hf' layout only")
        table = _with_quantized(table, set(ours), "the model")
    out: dict[str, torch.Tensor] = {}
    E = config.num_local_experts
    for name, (theirs, _, give) in table.items():
        if layout == "hf_fused" and ".moe.experts." in name:
            continue  # many of ours make one fused tensor: stacked below
        out[theirs] = give(ours[name]).contiguous()
    if layout == "hf_fused":
        for i in range(config.num_hidden_layers):
            experts = [f"layers.{i}.moe.experts.{e}" for e in range(E)]
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([ours[f"{x}.w1.weight"], ours[f"{x}.w3.weight"]], dim=0) for x in experts]
            )
            out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([ours[f"{x}.w2.weight"] for x in experts])
    return out


def save_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    *,
    layout: str = "hf",
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Save config and weights (safetensors; sharded with an index above max_shard_bytes)."""
    from safetensors.torch import save_file

    if in_inference_layout(model):
        raise CheckpointError("this model's weights are packed for CPU inference; load it with pack=False to save it")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype)
    config: ModelConfig = model.config
    tensors = hf_state_dict(model, layout)
    if dtype is not None:  # quantized codes stay integers
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    stored_dtype = next(v.dtype for v in tensors.values() if v.is_floating_point())
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[stored_dtype]

    if layout == "mistral":
        params = {
            "dim": config.hidden_size, "n_layers": config.num_hidden_layers, "head_dim": config.head_dim,
            "hidden_dim": config.intermediate_size, "n_heads": config.num_attention_heads,
            "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps,
            "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
            "sliding_window": config.sliding_window, "max_seq_len": config.max_position_embeddings,
            "moe": {"num_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok},
        }
        atomic_write(path / "params.json", lambda p: p.write_text(json.dumps(params, indent=2) + "\n"))
        atomic_write(path / "consolidated.safetensors", lambda p: save_file(tensors, str(p)))
        return

    hf = config.to_hf_dict()
    hf["dtype"] = dtype_name
    atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size + t.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda p: save_file(shards[0], str(p), {"format": "pt"}))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(path / name, lambda p, s=shard: save_file(s, str(p), {"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    atomic_write(path / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))


# --------------------------------------------------------------------------- load


def read_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[ModelConfig, dict[str, StoredTensor]]:
    """A checkpoint directory's config and its tensors, memory-mapped: nothing read yet."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory, not a file")
    return ModelConfig.from_dir(path), open_checkpoint(path, allow_pickle)


def is_expert_weight(name: str) -> bool:
    return ".moe.experts." in name


def stored_dtype(config: ModelConfig, stored: dict[str, StoredTensor]) -> torch.dtype:
    """The checkpoint's own dtype: what config.json says, else what most weights are in."""
    if config.torch_dtype in DTYPE_NAMES:
        return DTYPE_NAMES[config.torch_dtype]
    counts: dict[torch.dtype, int] = {}
    for t in stored.values():
        if t.tensor.dtype in WEIGHT_DTYPES:
            counts[t.tensor.dtype] = counts.get(t.tensor.dtype, 0) + t.tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32
