"""GGUF in: llama.cpp's files (Mixtral and Llama family) read into a smoe checkpoint directory.

gguf_file.py reads the container (header, metadata, tensor table, memory-mapped data); the
rest is here: the dequantization of each block format (below, tested against `gguf`'s own
reference), the names and the rotary layout back to Hugging Face's (llama.cpp's converter
interleaves the q/k rows of each head, as Mistral's consolidated files do), the config from
the metadata, and the tokenizer rebuilt from the vocabulary the file carries.

    smoe convert --from model.Q4_K_M.gguf --out Mixtral-from-gguf/      # once
    smoe generate --model model.Q4_K_M.gguf --prompt "..."             # converted on the fly, cached

The block formats themselves (their layouts and dequantization) are smoe/ggml.py's, in the
weights layer; `dequantize` and `DEQUANTIZERS` are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from smoe.checkpoint import interleaved_to_half
from smoe.errors import CheckpointError
from smoe.formats.gguf_file import GGUFFile
from smoe.ggml import DEQUANTIZERS, GGMLEmbedding, GGMLLinear, dequantize

# ------------------------------------------------------------------------- reading a file


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def read_config(reader, path: Path) -> dict:
    """The Hugging Face Mixtral config.json that the GGUF metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "mixtral"):
        raise CheckpointError(f"{path}: a GGUF of architecture {arch!r}; smoe reads the Llama/Mixtral family")

    def key(name, default=None, required=True):
        value = _field(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = key("vocab_size", None, required=False) or (len(tokens) if tokens else None) or \
        (embed.shape[0] if embed is not None else None)
    experts = int(key("expert_count", 0, required=False) or 0)
    head_dim = key("attention.key_length", None, required=False) or key("rope.dimension_count", None,
                                                                           required=False) or hidden // heads
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": int(vocab), "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads, required=False)),
        "head_dim": int(head_dim), "num_local_experts": max(experts, 1),
        "num_experts_per_tok": int(key("expert_used_count", 1, required=False) or 1) if experts else 1,
        "max_position_embeddings": int(key("context_length", 4096, required=False)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        "rope_theta": float(key("rope.freq_base", 10000.0, required=False)),
        "sliding_window": None,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "router_jitter_noise": 0.0, "hidden_act": "silu",
    }


FIXED_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
               "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
               "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "ffn_gate_inp.weight": "block_sparse_moe.gate.weight"}
EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}


def check_types(reader, path: Path) -> None:
    """Every tensor in a type smoe reads, before anything is written: one line naming the first
    that is not."""
    for t in reader.tensors:
        kind = t.kind
        if kind not in NATURAL and kind not in DEQUANTIZERS:
            raise CheckpointError(
                f"{path}: tensor {t.name} is {kind}, which smoe cannot read (it reads "
                f"{', '.join([*NATURAL, *DEQUANTIZERS])}; the other IQ types need their lattice tables and are not "
                "supported yet); requantize the file to one of those with llama.cpp's llama-quantize, e.g. "
                "Q4_K_M or Q3_K_M")


def hf_tensors(reader, config: dict, dtype: torch.dtype | None, done=lambda: None):
    """Yield (Hugging Face name, tensor) for every tensor of the file, dequantized to `dtype`
    (None: each in the type it has in the file, quantized ones in bf16); done() after each of
    the file's tensors."""
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    dense = not any("exps" in t.name or "ffn_gate_inp" in t.name for t in reader.tensors)
    for t in reader.tensors:
        kind = t.kind
        value = torch.from_numpy(dequantize(t.data, kind, t.shape)).to(dtype or NATURAL.get(kind, torch.bfloat16))
        yield from _hf_names(t.name, value, heads, dense)
        done()


def _hf_names(name: str, value: torch.Tensor, heads: dict[str, int], dense: bool):
    if name in FIXED_NAMES:
        yield FIXED_NAMES[name], value
        return
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) < 4 or not parts[1].isdigit():
        raise CheckpointError(f"GGUF tensor {name!r} is not part of a Llama/Mixtral model")
    prefix, rest = f"model.layers.{int(parts[1])}.", ".".join(parts[2:])
    if rest in heads:
        value = interleaved_to_half(value, heads[rest])  # llama.cpp's rotary pairs back to halves
    if rest in LAYER_NAMES:
        yield prefix + LAYER_NAMES[rest], value
    elif rest.endswith("_exps.weight") and rest.removesuffix("_exps.weight") in EXPERT_NAMES:  # [E, out, in]
        w = EXPERT_NAMES[rest.removesuffix("_exps.weight")]
        for e in range(value.shape[0]):
            yield f"{prefix}block_sparse_moe.experts.{e}.{w}.weight", value[e].clone()
    elif len(parts) == 5 and parts[2] in EXPERT_NAMES and parts[3].isdigit():  # older files: blk.i.ffn_gate.e.weight
        yield f"{prefix}block_sparse_moe.experts.{int(parts[3])}.{EXPERT_NAMES[parts[2]]}.weight", value
    elif dense and rest.removesuffix(".weight") in EXPERT_NAMES:  # a Llama: one expert, always chosen
        yield f"{prefix}block_sparse_moe.experts.0.{EXPERT_NAMES[rest.removesuffix('.weight')]}.weight", value
        if rest == "ffn_gate.weight":
            yield f"{prefix}block_sparse_moe.gate.weight", torch.zeros(1, value.shape[1], dtype=value.dtype)
    else:
        raise CheckpointError(f"GGUF tensor {name!r} has no place in a Mixtral checkpoint")


# ------------------------------------------------------------------------------ in place


def open_in_place(path: Path) -> tuple[object, dict]:
    """(reader, Hugging Face config dict) of a GGUF file whose tensors a model will use in place
    (loader.build_gguf_model): checked as convert checks it, and of the layout in-place loading
    reads — stacked experts (`ffn_*_exps`) of one block format each."""
    reader = GGUFFile.open(path, mode="c")  # copy-on-write: tensors viewing it are writable in name
    check_types(reader, path)
    config = read_config(reader, path)
    names = {t.name for t in reader.tensors}
    for i in range(config["num_hidden_layers"]):
        missing = [f"blk.{i}.{n}_exps.weight" for n in EXPERT_NAMES if f"blk.{i}.{n}_exps.weight" not in names]
        if missing:
            raise CheckpointError(f"{path}: tensor {missing[0]} is missing: in-place loading reads experts stacked "
                                  "as llama.cpp's converter writes them now; convert the file instead (smoe convert)")
    return reader, config


def tensor_kinds(reader) -> dict[str, str]:
    """GGUF tensor name -> its type name."""
    return {t.name: t.kind for t in reader.tensors}


def _float(t, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(dequantize(t.data, t.kind, t.shape)).to(dtype)


def _blocks(t) -> torch.Tensor:
    """A quantized tensor's bytes [.., rows, row bytes] as a view of the file's map (no copy)."""
    return torch.from_numpy(np.asarray(t.data))


def assign_in_place(model: torch.nn.Module, reader, path: Path, dtype: torch.dtype) -> None:
    """Every tensor of the file into the model loader.build_gguf_model built for it: a quantized
    matrix's blocks as a view of the file — q/k too when the model's RoPE runs over llama.cpp's
    adjacent pairs (model.rope.pairs), else their rows reordered to halves, a copy of those two —
    a quantized embedding's too (GGMLEmbedding), float tensors (norms, routers, an F16 / F32
    embedding) in `dtype`."""
    config = model.config
    heads = {} if model.rope.pairs else {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    attention = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
    seen = set()

    def put(module, name, t, heads: int | None = None) -> None:
        target = getattr(module, name)
        if tuple(target.shape) != t.shape:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {list(t.shape)}, the model expects "
                                  f"{list(target.shape)} (its metadata and tensors disagree)")
        value = _float(t, dtype)
        if heads is not None:  # q/k: llama.cpp's rotary pairs back to halves
            value = interleaved_to_half(value, heads)
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value

    def put_blocks(module, name, t, heads: int | None = None) -> None:
        blocks = _blocks(t)
        if tuple(blocks.shape) != tuple(getattr(module, name).shape):
            raise CheckpointError(f"{path}: tensor {t.name} has {tuple(blocks.shape)} bytes of blocks, the model "
                                  f"expects {tuple(getattr(module, name).shape)} (its metadata and tensors disagree)")
        if heads is not None:  # q/k: llama.cpp's rotary pairs back to halves
            blocks = interleaved_to_half(blocks, heads).contiguous()
        setattr(module, name, blocks)

    for t in reader.tensors:
        name = t.name
        seen.add(name)
        if name == "token_embd.weight" and isinstance(model.embed_tokens, GGMLEmbedding):
            put_blocks(model.embed_tokens, "blocks", t)
        elif name == "token_embd.weight":
            put(model.embed_tokens, "weight", t)
        elif name == "output_norm.weight":
            put(model.norm, "weight", t)
        elif name == "output.weight":
            linear = model.lm_head
            if isinstance(linear, GGMLLinear):
                put_blocks(linear, "blocks", t)
            else:
                put(linear, "weight", t)
        elif name.startswith("blk."):
            i, rest = int(name.split(".")[1]), name.split(".", 2)[2].removesuffix(".weight")
            layer = model.layers[i]
            if rest == "attn_norm":
                put(layer.attn_norm, "weight", t)
            elif rest == "ffn_norm":
                put(layer.ffn_norm, "weight", t)
            elif rest == "ffn_gate_inp":
                put(layer.moe.router, "weight", t)
            elif rest in attention:
                linear = getattr(layer.attn, attention[rest])
                if not isinstance(linear, GGMLLinear):
                    put(linear, "weight", t, heads.get(rest))
                else:  # with halves, whole rows of q/k's blocks reordered: a copy
                    put_blocks(linear, "blocks", t, heads.get(rest))
            elif rest.endswith("_exps") and rest.removesuffix("_exps") in EXPERT_NAMES:
                experts = layer.moe.experts
                stacked = experts.down if rest == "ffn_down_exps" else experts.gate_up
                part = 1 if rest == "ffn_up_exps" else 0
                put_blocks(stacked, f"blocks{part}", t)
            else:
                raise CheckpointError(f"{path}: tensor {name!r} has no place in a Mixtral model")
        else:
            raise CheckpointError(f"{path}: tensor {name!r} is not part of a Llama/Mixtral model")
    if "token_embd.weight" not in seen:
        raise CheckpointError(f"{path}: the file has no token_embd.weight")


# ------------------------------------------------------------------------------ tokenizer


def write_tokenizer(reader, out: Path) -> bool:
    """Rebuild the tokenizer from the file's vocabulary: a SentencePiece model for
    `tokenizer.ggml.model = llama`, a byte-level BPE tokenizer.json for `gpt2`. -> written?"""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return False
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if kind == "llama":
        _write_sentencepiece(reader, tokens, out / "tokenizer.model")
    elif kind == "gpt2":
        _write_byte_bpe(reader, tokens, out / "tokenizer.json")
    else:
        print(f"smoe: the GGUF's tokenizer ({kind}) is not rebuilt; the model loads without a tokenizer",
              file=sys.stderr)
        return False
    config = {"bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if eos is not None else None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return True


def _write_sentencepiece(reader, tokens: list[str], path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    # GGUF token types (llama.cpp's llama_token_type) -> SentencePiece piece types
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = any(t == 6 for t in types)
    m.trainer_spec.unk_id = next((i for i, t in enumerate(types) if t == 2), 0)
    m.trainer_spec.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id", -1))
    m.trainer_spec.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id", -1))
    m.trainer_spec.pad_id = int(_field(reader, "tokenizer.ggml.padding_token_id", -1))
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for text, score, kind in zip(tokens, scores, types, strict=True):
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), kinds.get(int(kind), kinds[1])
    path.write_bytes(m.SerializeToString())


def _write_byte_bpe(reader, tokens: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    special = [t for t, kind in zip(tokens, types, strict=False) if int(kind) == 3]
    if special:
        tok.add_special_tokens(special)
    tok.save(str(path))


# ------------------------------------------------------------------------------ conversion


def convert(path: Path, out: Path, *, dtype: torch.dtype | None = None, progress: bool = True,
            shard_bytes: int = 4 << 30) -> Path:
    """Write the GGUF file at `path` as a Hugging Face-layout checkpoint directory `out`
    (config.json, model*.safetensors, tokenizer files), atomically. dtype None keeps each
    tensor's own float type (F32 norms and routers stay fp32) and writes quantized ones in bf16;
    the config's dtype is that of the bulk weights (natural_dtype)."""
    path, out = Path(path), Path(out)
    reader = GGUFFile.open(path)
    check_types(reader, path)
    config = read_config(reader, path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    need = converted_bytes(reader, dtype)
    if config["tie_word_embeddings"]:  # the head is written as a tensor of its own
        embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
        need += int(embed.n_elements) * (dtype or NATURAL.get(embed.kind, torch.bfloat16)).itemsize
    free = shutil.disk_usage(tmp).free
    if need > free:
        tmp.rmdir()
        kind = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype or natural_dtype(reader)]
        raise CheckpointError(
            f"{path}: converting it needs {need / 1e9:.1f} GB in {out.parent} and {free / 1e9:.1f} GB are free "
            f"(smoe converts a GGUF file's quantized tensors to {kind}; it does not run them in place yet): free "
            "some space, or point SMOE_CACHE / --out at a larger disk")
    try:
        _write_checkpoint(reader, path, config, tmp, dtype, progress, shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_checkpoint(reader, path: Path, config: dict, tmp: Path, dtype: torch.dtype | None, progress: bool,
                      shard_bytes: int) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    bar = tqdm(total=len(reader.tensors), desc=f"reading {path.name}", unit="tensor", disable=not progress,
               file=sys.stderr, delay=1.0)
    for name, value in hf_tensors(reader, config, dtype, done=lambda: bar.update(1)):
        if size + value.nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = value.contiguous()
        size += value.nbytes
    bar.close()
    if config["tie_word_embeddings"]:
        config["tie_word_embeddings"] = False  # smoe's layouts keep the head as its own tensor
        embed = next(s["model.embed_tokens.weight"] for s in shards if "model.embed_tokens.weight" in s)
        shards[-1]["lm_head.weight"] = embed.clone()
    config["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                       torch.float32: "float32"}[dtype or natural_dtype(reader)]
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(reader, tmp)


NATURAL = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def converted_bytes(reader, dtype: torch.dtype | None) -> int:
    """The bytes `convert` writes for this file (its tensors in the dtypes hf_tensors gives them)."""
    total = 0
    for t in reader.tensors:
        kind = t.kind
        out = dtype or NATURAL.get(kind, torch.bfloat16)
        total += int(t.n_elements) * out.itemsize
    return total


def natural_dtype(reader) -> torch.dtype:
    """The dtype of the file's bulk weights (all but norms and routers): F16 -> fp16, BF16 ->
    bf16, F32 -> fp32; quantized or mixed -> bf16 (dequantized values d·q then round to bf16)."""
    kinds = {t.kind for t in reader.tensors if len(t.shape) > 1 and "ffn_gate_inp" not in t.name}
    return NATURAL[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in NATURAL else torch.bfloat16


def cache_dir() -> Path:
    return Path(os.environ.get("SMOE_CACHE", Path.home() / ".cache" / "smoe")) / "gguf"


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def tokenizer_dir(path: Path, reader) -> Path | None:
    """The tokenizer a GGUF file carries, rebuilt once into smoe's cache (as conversion writes
    it) for a model that uses the file in place; None where the file has none."""
    out = cache_dir() / f"{path.stem}-{_cache_key(path)}-tokenizer"
    if not (out / "tokenizer_config.json").exists():
        # a directory of this process's own (ranks of --parallel load the same file at once), renamed
        # into place whole; where another process got there first, its copy is kept
        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not write_tokenizer(reader, tmp):
            shutil.rmtree(tmp)
            return None
        try:
            tmp.rename(out)
        except OSError:  # it exists: complete (another process's) or a stale incomplete one
            if (out / "tokenizer_config.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    return out


def cached_conversion(path: Path) -> Path:
    """`--model file.gguf`: the file converted once (natural_dtype) into smoe's cache, keyed by
    its path, size and modification time; later runs reuse it."""
    out = cache_dir() / f"{path.stem}-{_cache_key(path)}"
    if (out / "config.json").exists():
        return out
    print(f"smoe: converting {path} for smoe (once; cached in {out})", file=sys.stderr)
    return convert(path, out)
