"""GGUF out: a checkpoint written as llama.cpp's converter writes a Mixtral, its weights quantized
by smoe's own block quantizers (`smoe quantize --model DIR --type Q8_0 --out model.gguf`).

    type    what each tensor becomes
    Q8_0    every matrix Q8_0 (32 weights: fp16 d = max|w|/127, q = round(w/d))
    Q4_0    every matrix Q4_0 (32 weights: d = the largest-magnitude weight / −8, q = trunc(w/d + 8.5)
            clipped to 0..15), the output head Q8_0 (llama.cpp gives it more bits: Q6_K there)

Norms and routers stay F32, as the converter writes them; a matrix whose rows are not whole
blocks of 32 is written F16. The quantizers follow ggml's reference ones (round half away from
zero for Q8_0; truncation after +8.5 for Q4_0; the fp32 arithmetic in the same order), so their
blocks equal `gguf`'s reference quantizer's bit for bit (tests/test_formats_gguf.py). Names and
metadata are the converter's (`general.architecture = llama`, `blk.N.ffn_{gate,up,down}_exps`
stacked [E, out, in], q/k rows interleaved as rotary pairs per head — what gguf.py's reader
undoes), and the tokenizer goes in as the file's vocabulary: a SentencePiece model as
`tokenizer.ggml.model = llama` (pieces, scores, types), a byte-level BPE tokenizer.json as `gpt2`
(tokens, merges). The tensor table is written first, then each tensor is read, quantized and
written in turn: memory holds one tensor (one layer's stacked experts) at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smoe.checkpoint import half_to_interleaved
from smoe.errors import CheckpointError, SmoeError

TYPES = ("Q8_0", "Q4_0")
BLOCK = 32
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype: MOSTLY_Q8_0, MOSTLY_Q4_0


# ------------------------------------------------------------------------- quantizers


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """roundf: halves away from zero (np.round rounds them to even)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """fp32 [..., K] (K a multiple of 32) -> Q8_0 blocks as bytes [..., K / 32 · 34]."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, BLOCK)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _round_half_away(x * inv).astype(np.int8)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * 34)


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """fp32 [..., K] (K a multiple of 32) -> Q4_0 blocks as bytes [..., K / 32 · 18]: the first 16
    values in the low nibbles, the next 16 in the high ones."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, BLOCK)
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)  # signed; the first largest
    d = peak / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc(x * inv + np.float32(8.5)).astype(np.uint8), 15)
    packed = q[:, :16] | (q[:, 16:] << 4)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * 18)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}


# ------------------------------------------------------------------------------ layout


def tensor_type(preset: str, role: str, columns: int) -> str:
    if role in ("attn_norm", "ffn_norm", "output_norm", "ffn_gate_inp"):
        return "F32"
    if columns % BLOCK:
        return "F16"
    return "Q8_0" if role == "output" else preset


def _plan(model):
    """(GGUF name, role, shape [.., out, in], a function reading the tensor as fp32 numpy) in the
    converter's order; nothing is read until its function is called (q/k rows interleaved then)."""
    cfg = model.config

    def of(t: torch.Tensor, heads: int | None = None):
        def values() -> np.ndarray:
            w = t.detach()
            return (half_to_interleaved(w, heads) if heads else w).float().numpy()
        return tuple(t.shape), values

    def stacked(linears: list[nn.Linear]):
        return (len(linears), *linears[0].weight.shape), lambda: np.stack([of(lin.weight)[1]() for lin in linears])

    yield "token_embd.weight", "token_embd", *of(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        attn, moe = layer.attn, layer.moe
        yield f"blk.{i}.attn_norm.weight", "attn_norm", *of(layer.attn_norm.weight)
        yield f"blk.{i}.attn_q.weight", "attn_q", *of(attn.q_proj.weight, cfg.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", "attn_k", *of(attn.k_proj.weight, cfg.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", "attn_v", *of(attn.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", "attn_output", *of(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", "ffn_norm", *of(layer.ffn_norm.weight)
        yield f"blk.{i}.ffn_gate_inp.weight", "ffn_gate_inp", *of(moe.router.weight)
        for name, attr in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            yield f"blk.{i}.{name}.weight", name, *stacked([getattr(e, attr) for e in moe.experts])
    yield "output_norm.weight", "output_norm", *of(model.norm.weight)
    yield "output.weight", "output", *of(model.lm_head.weight)


# ------------------------------------------------------------------------------ tokenizer


def _add_tokenizer(writer, source: Path, bos: int | None, eos: int | None) -> str | None:
    """The checkpoint's tokenizer as the file's vocabulary (bos, eos: as smoe's tokenizer reads
    them, for a tokenizer.json); -> its GGUF model name, or None."""
    if (source / "tokenizer.model").exists():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
        n = sp.vocab_size()
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
        writer.add_token_scores([sp.get_score(i) for i in range(n)])
        writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                                else 6 if sp.is_byte(i) else 1 for i in range(n)])
        bos, eos, kind = sp.bos_id(), sp.eos_id(), "llama"
    elif (source / "tokenizer.json").exists():
        spec = json.loads((source / "tokenizer.json").read_text())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            print(f"smoe: {source / 'tokenizer.json'} is not a BPE tokenizer; the GGUF has no vocabulary",
                  file=sys.stderr)
            return None
        vocab = dict(model["vocab"])
        for added in spec.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
        tokens = [None] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which llama.cpp names so
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in special else 1 for t in tokens])
        writer.add_token_merges(merges)
        kind = "gpt2"
    else:
        return None
    if bos is not None and bos >= 0:  # smoe starts every prompt with it: so should llama.cpp
        writer.add_bos_token_id(int(bos))
        writer.add_add_bos_token(True)
    if eos is not None and eos >= 0:
        writer.add_eos_token_id(int(eos))
    return kind


# ------------------------------------------------------------------------------ the file


def check_type(preset: str) -> None:
    if preset not in TYPES:
        raise SmoeError(f"--type {preset}: smoe writes GGUF files in {', '.join(TYPES)} so far "
                        "(the K-quant presets Q4_K_M / Q3_K_M / Q2_K come with their quantizers)")


def write_gguf(model, source: Path, out: Path, preset: str, *, bos_id: int | None = None, eos_id: int | None = None,
               progress: bool = True) -> dict[str, int]:
    """Write `model` (built from the checkpoint directory `source`, its weights memory-mapped: each
    is read when its tensor is written; the tokenizer files are read from `source`, with BOS / EOS
    as smoe's tokenizer reads them) as a GGUF file `out` of `preset` (TYPES); returns how many
    tensors went in each type. Written to `out.partial` and renamed when complete."""
    import gguf
    from tqdm import tqdm

    check_type(preset)
    cfg = model.config
    if cfg.quantization:
        raise SmoeError(f"{source}: is quantized ({cfg.quantization.get('bits')} bits); write a GGUF file from the "
                        "unquantized checkpoint")
    if type(model.layers[0].moe.experts).__name__ != "ExpertList":
        raise SmoeError(f"{source}: its experts are not plain linears here; write a GGUF file from a plain checkpoint")
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(source.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[preset])
    _add_tokenizer(writer, source, bos_id, eos_id)
    plan = list(_plan(model))
    counts: dict[str, int] = {}
    kinds = []
    for name, role, shape, _ in plan:
        kind = tensor_type(preset, role, shape[-1])
        kinds.append(kind)
        counts[kind] = counts.get(kind, 0) + 1
        if kind in QUANTIZERS:
            byte_shape = (*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES[kind])
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, _, _, values), kind in tqdm(list(zip(plan, kinds, strict=True)), desc=f"writing {out.name}",
                                            unit="tensor", disable=not progress, file=sys.stderr, delay=1.0):
            w = values()
            data = QUANTIZERS[kind](w) if kind in QUANTIZERS else w.astype(np.float32 if kind == "F32" else np.float16)
            writer.write_tensor_data(np.ascontiguousarray(data))
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return counts


def check_writable(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise CheckpointError(f"{out}: is a directory; --out names the .gguf file to write")
    if out.suffix != ".gguf":
        raise SmoeError(f"--out {out}: a GGUF file's name ends in .gguf")
