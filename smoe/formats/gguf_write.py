"""GGUF out: a checkpoint written as llama.cpp's converter writes a Mixtral, its weights quantized
by smoe's own block quantizers (smoe/formats/ggml_quantize.py) into the per-tensor type mix of
llama.cpp's presets (`smoe quantize --model DIR --type Q4_K_M --out model.gguf`).

    preset   experts (gate, up | down)   attention q | k, v | output   token_embd   output
    Q8_0     Q8_0                        Q8_0                          Q8_0         Q8_0
    Q4_0     Q4_0                        Q4_0 | Q8_0 | Q4_0            Q4_0         Q6_K
    Q4_K_M   Q4_K | Q6_K in the layers   Q4_K | Q8_0 | Q5_K            Q4_K         Q6_K
                    use_more_bits picks,
                    else Q4_K
    Q3_K_M   Q3_K | Q5_K in the first    Q3_K | Q8_0 | Q5_K            Q3_K         Q6_K
                    sixteenth, else Q4_K
    Q3_K_S   Q3_K                        Q3_K | Q8_0 | Q5_K            Q3_K         Q6_K
    Q2_K     Q2_K | Q3_K                 Q2_K | Q8_0 | Q5_K            Q2_K         Q6_K

That table is for 8 experts (Mixtral), where llama.cpp spends ~128 MB more on attn_k / attn_v
(Q8_0) and attn_output (Q5_K); other expert counts get llama.cpp's dense-model rules (attn_v one
or two steps up, attn_output Q3_K / Q4_K in Q2_K / Q3_K_M). Facts from llama.cpp's
`llama_tensor_get_type`. A matrix whose rows are not whole 256-value blocks takes llama.cpp's
fallback (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0), one not of whole 32-value
blocks F16; norms and routers stay F32, as the converter writes them.

The 32-value quantizers equal `gguf`'s reference quantizer bit for bit; the K-quants fit scales
and mins by weighted least squares as llama.cpp's reference quantizer does (its blocks equal ours
but for fp32 rounding in ~0.1-3 % of blocks; tests/test_ggml_quantize.py). Names and metadata are
the converter's (`general.architecture = llama`, `blk.N.ffn_{gate,up,down}_exps` stacked
[E, out, in], q/k rows interleaved as rotary pairs per head — what gguf.py's reader undoes), and the
tokenizer goes in as the file's vocabulary: a SentencePiece model as `tokenizer.ggml.model = llama`
(pieces, scores, types), a byte-level BPE tokenizer.json as `gpt2` (tokens, merges). The tensor
table is written first, then each tensor is read, quantized and written in turn: memory holds one
tensor (one layer's stacked experts) at a time.
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
from smoe.formats.ggml_quantize import quantize
from smoe.ggml import BLOCKS

PRESETS = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K"}
"""preset -> its base type (what a tensor no rule names gets)"""
TYPES = tuple(PRESETS)
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q4_K_M": 15}  # llama_ftype
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""K-quant -> what llama.cpp writes instead for rows that are not whole 256-value blocks"""


# ------------------------------------------------------------------------------ layout


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(preset: str, role: str, columns: int, layer: int = 0, layers: int = 1, experts: int = 8,
                gqa: int = 1) -> str:
    """The GGML type llama.cpp's `preset` gives a tensor of `role` (its GGUF name without blk.N. and
    .weight) in layer `layer` of `layers`, with rows of `columns` values, in a model of `experts`
    experts and `gqa` query heads per kv head."""
    if role in ("attn_norm", "ffn_norm", "output_norm", "ffn_gate_inp"):
        return "F32"
    kind = PRESETS[preset]
    moe8 = experts == 8
    if role == "output":
        kind = "Q8_0" if preset == "Q8_0" else "Q6_K"
    elif role == "attn_k" and moe8:
        kind = "Q8_0"
    elif role == "attn_v":
        if moe8:
            kind = "Q8_0"
        elif preset == "Q2_K":
            kind = "Q4_K" if gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            kind = "Q5_K" if layer < 2 else "Q4_K"
        elif preset == "Q4_K_M" and use_more_bits(layer, layers):
            kind = "Q6_K"
    elif role == "attn_output":
        if moe8 and preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"):
            kind = "Q5_K"
        elif not moe8:
            kind = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(preset, kind)
    elif role == "ffn_down_exps":
        if preset == "Q2_K":
            kind = "Q3_K"
        elif preset == "Q3_K_M":
            kind = "Q5_K" if layer < layers // 16 else "Q4_K"
        elif preset == "Q4_K_M" and use_more_bits(layer, layers):
            kind = "Q6_K"
    if columns % BLOCKS[kind][0]:
        kind = FALLBACK.get(kind, kind)
    return "F16" if columns % BLOCKS[kind][0] else kind


def _plan(model):
    """(GGUF name, role, layer, shape [.., out, in], a function reading the tensor as fp32 numpy) in
    the converter's order; nothing is read until its function is called (q/k rows interleaved then)."""
    cfg = model.config

    def of(t: torch.Tensor, heads: int | None = None):
        def values() -> np.ndarray:
            w = t.detach()
            return (half_to_interleaved(w, heads) if heads else w).float().numpy()
        return tuple(t.shape), values

    def stacked(linears: list[nn.Linear]):
        return (len(linears), *linears[0].weight.shape), lambda: np.stack([of(lin.weight)[1]() for lin in linears])

    yield "token_embd.weight", "token_embd", 0, *of(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        attn, moe = layer.attn, layer.moe
        yield f"blk.{i}.attn_norm.weight", "attn_norm", i, *of(layer.attn_norm.weight)
        yield f"blk.{i}.attn_q.weight", "attn_q", i, *of(attn.q_proj.weight, cfg.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", "attn_k", i, *of(attn.k_proj.weight, cfg.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", "attn_v", i, *of(attn.v_proj.weight)
        yield f"blk.{i}.attn_output.weight", "attn_output", i, *of(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", "ffn_norm", i, *of(layer.ffn_norm.weight)
        yield f"blk.{i}.ffn_gate_inp.weight", "ffn_gate_inp", i, *of(moe.router.weight)
        for name, attr in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            yield f"blk.{i}.{name}.weight", name, i, *stacked([getattr(e, attr) for e in moe.experts])
    yield "output_norm.weight", "output_norm", 0, *of(model.norm.weight)
    yield "output.weight", "output", 0, *of(model.lm_head.weight)


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
        raise SmoeError(f"--type {preset}: smoe writes GGUF files as llama.cpp's presets {', '.join(TYPES)}")


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
    shape_of = dict(experts=cfg.num_local_experts, gqa=cfg.num_attention_heads // cfg.num_key_value_heads,
                    layers=cfg.num_hidden_layers)
    for name, role, layer, shape, _ in plan:
        kind = tensor_type(preset, role, shape[-1], layer, **shape_of)
        kinds.append(kind)
        counts[kind] = counts.get(kind, 0) + 1
        if kind in BLOCKS:
            elems, nbytes = BLOCKS[kind]
            byte_shape = (*shape[:-1], shape[-1] // elems * nbytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, _, _, _, values), kind in tqdm(list(zip(plan, kinds, strict=True)), desc=f"writing {out.name}",
                                               unit="tensor", disable=not progress, file=sys.stderr, delay=1.0):
            w = values()
            data = quantize(w, kind) if kind in BLOCKS else w.astype(np.float32 if kind == "F32" else np.float16)
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
