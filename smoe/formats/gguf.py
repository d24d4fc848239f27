"""GGUF in: llama.cpp's files (Mixtral and Llama family) read into a smoe checkpoint directory.

The `gguf` package parses the file (header, metadata, tensor table, memory-mapped data); the
rest is here: the dequantization of each block format (below, tested against `gguf`'s own
reference), the names and the rotary layout back to Hugging Face's (llama.cpp's converter
interleaves the q/k rows of each head, as Mistral's consolidated files do), the config from
the metadata, and the tokenizer rebuilt from the vocabulary the file carries.

    smoe convert --from model.Q4_K_M.gguf --out Mixtral-from-gguf/      # once
    smoe generate --model model.Q4_K_M.gguf --prompt "..."             # converted on the fly, cached

Block formats (ggml's, little-endian; d/dmin fp16; values in each block in order):

    type   elems  bytes  layout                                       value
    Q8_0    32     34    d, int8 q[32]                                d·q
    Q4_0    32     18    d, q[16]: low nibbles 0..15, high 16..31     d·(q − 8)
    Q4_1    32     20    d, m, q[16]                                  d·q + m
    Q5_0    32     22    d, qh (32 bits: the fifth bit of each), q[16] d·(q + 16·h − 16)
    Q5_1    32     24    d, m, qh, q[16]                              d·(q + 16·h) + m
    Q2_K   256     84    scales[16], q[64], d, dmin                   d·sc_j·q − dmin·m_j (4-bit sc, m)
    Q3_K   256    110    hmask[32], q[64], scales[12], d              d·(sc_j − 32)·(q + 4·h − 4)
    Q4_K   256    144    d, dmin, scales[12], q[128]                  d·sc_j·q − dmin·m_j
    Q5_K   256    176    d, dmin, scales[12], qh[32], q[128]          d·sc_j·(q + 16·h) − dmin·m_j
    Q6_K   256    210    ql[128], qh[64], int8 sc[16], d              d·sc_j·(q − 32)

K-quants split 256 values into sub-blocks (8 of 32 for Q4_K/Q5_K, 16 of 16 for Q2_K/Q3_K/Q6_K), each with
its own 6- or 8-bit scale (and min). Q4_K/Q5_K pack eight 6-bit scales and mins into 12 bytes:
sub-block j < 4 keeps them in the low 6 bits of bytes j and j+4; j ≥ 4 splits them between the
low/high nibble of byte j+4 and the top 2 bits of bytes j−4 / j. Their values come 64 at a time:
32 low nibbles (sub-block 2i) then 32 high nibbles (2i+1) of the same 32 bytes.
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

from smoe.errors import CheckpointError

F16 = np.dtype("<f2")


# ------------------------------------------------------------------------ dequantization


def _blocks(raw: np.ndarray, nbytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size % nbytes:
        raise CheckpointError(f"GGUF tensor data of {raw.size} bytes is not a whole number of {nbytes}-byte blocks")
    return raw.reshape(-1, nbytes)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte offset `at` of each block, as fp32 [n, 1]."""
    return blocks[:, at : at + 2].copy().view(F16).astype(np.float32)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)
    return (_f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)
    q = b[:, 2:]  # [n, 16]
    codes = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)  # [n, 32]
    return (_f16(b, 0) * (codes - 8)).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)
    q = b[:, 4:]
    codes = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
    return (_f16(b, 0) * codes + _f16(b, 2)).reshape(-1)


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes qh (bit j = fifth bit of value j) and 16 bytes of nibbles -> 32 codes 0..31."""
    bits = qh.copy().view("<u4")  # [n, 1]
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [n, 32]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n, 32]
    return (low | (high << 4)).astype(np.float32)


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 22)
    return (_f16(b, 0) * (_q5_codes(b[:, 2:6], b[:, 6:22]) - 16)).reshape(-1)


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 24)
    return (_f16(b, 0) * _q5_codes(b[:, 4:8], b[:, 8:24]) + _f16(b, 2)).reshape(-1)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes per block [n, 12] -> eight 6-bit scales and eight 6-bit mins, each [n, 8]."""
    s = packed.astype(np.uint8)
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63  # sub-blocks 0..3
    high_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)  # sub-blocks 4..7
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return (np.concatenate([low_sc, high_sc], 1).astype(np.float32),
            np.concatenate([low_m, high_m], 1).astype(np.float32))


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 8, 32] 4-bit codes: for each 32-byte chunk i, its low nibbles
    (sub-block 2i), then its high nibbles (sub-block 2i+1)."""
    chunks = q.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 144)
    d, dmin = _f16(b, 0), _f16(b, 2)  # [n, 1]
    sc, m = _k_scales_mins(b[:, 4:16])  # [n, 8]
    codes = _k_nibbles(b[:, 16:144]).astype(np.float32)  # [n, 8, 32]
    return ((d * sc)[..., None] * codes - (dmin * m)[..., None]).reshape(-1)


def dequantize_q5_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 176)
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # [n, 32]: bit j of byte l is the fifth bit of value l of sub-block j
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).astype(np.float32)  # [n, 8, 32]
    codes = _k_nibbles(b[:, 48:176]).astype(np.float32) + 16 * high
    return ((d * sc)[..., None] * codes - (dmin * m)[..., None]).reshape(-1)


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 210)
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)  # two halves of 128 values
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = _f16(b, 208)[:, :, None]  # [n, 1, 1]
    # each half: 4 groups of 32 values; group g takes the low (g even) or high nibble of ql
    # bytes 0..31 (g = 0, 2) or 32..63 (g = 1, 3), and bits 2g..2g+1 of qh
    lo = np.stack([ql[:, :, 0:32] & 0x0F, ql[:, :, 32:64] & 0x0F, ql[:, :, 0:32] >> 4, ql[:, :, 32:64] >> 4], 2)
    hi = np.stack([(qh >> (2 * g)) & 3 for g in range(4)], 2)  # [n, 2, 4, 32]
    codes = (lo | (hi << 4)).astype(np.float32) - 32  # [n, 2, 4, 32]
    # sub-blocks of 16: value l of group g uses scale 2g + l // 16 of its half
    scales = sc.reshape(-1, 2, 4, 2)[..., None].repeat(16, axis=-1).reshape(-1, 2, 4, 32)
    return (d[..., None] * scales * codes).reshape(-1)


def _k_crumbs(q: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: [n, 64] bytes -> [n, 16, 16] 2-bit codes: the values come 128 at a time from 32
    bytes; bits 2j..2j+1 of bytes 0..15 are sub-block 2j, of bytes 16..31 sub-block 2j + 1."""
    halves = q.reshape(-1, 2, 1, 2, 16)  # [n, half, 1, bytes 0..15 | 16..31, 16]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1, 1)
    return ((halves >> shifts) & 3).reshape(-1, 16, 16)


def dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 84)
    sc = b[:, 0:16]  # [n, 16]: per sub-block of 16, a 4-bit scale (low) and a 4-bit min (high)
    d, dmin = _f16(b, 80), _f16(b, 82)
    codes = _k_crumbs(b[:, 16:80]).astype(np.float32)
    return ((d * (sc & 0x0F))[..., None] * codes - (dmin * (sc >> 4))[..., None]).reshape(-1)


def dequantize_q3_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 110)
    hmask, packed = b[:, 0:32], b[:, 96:108]
    # sixteen 6-bit scales: the low 4 bits are the low (sub-blocks 0..7) then high (8..15)
    # nibbles of bytes 0..7, the top 2 bits bits 2i..2i+1 of byte 8 + k % 4 for sub-blocks 4i..4i+3
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)
    top = (packed[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]) & 3  # [n, 4, 4]
    scales = (low | (top.reshape(-1, 16) << 4)).astype(np.float32) - 32
    # the third bit of value l of sub-block pair (half h, step j) is bit 4h + j of hmask byte l;
    # a clear bit subtracts 4
    bits = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    codes = _k_crumbs(b[:, 32:96]).astype(np.float32) - 4 * (1 - bits.reshape(-1, 16, 16)).astype(np.float32)
    return ((_f16(b, 108) * scales)[..., None] * codes).reshape(-1)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw data in GGUF type `type_name` -> fp32 array of `shape` (numpy order)."""
    plain = {"F32": np.float32, "F16": F16}
    if type_name in plain:
        values = np.asarray(raw).view(plain[type_name]).astype(np.float32)
    elif type_name == "BF16":
        values = (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif type_name in DEQUANTIZERS:
        values = DEQUANTIZERS[type_name](raw)
    else:
        raise CheckpointError(f"GGUF tensor type {type_name} is not supported; smoe reads "
                              f"{', '.join(['F32', 'F16', 'BF16', *DEQUANTIZERS])} (convert with llama-quantize)")
    return values.reshape(shape)


DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0,
                "Q5_1": dequantize_q5_1, "Q2_K": dequantize_q2_k, "Q3_K": dequantize_q3_k, "Q4_K": dequantize_q4_k,
                "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k}


# ------------------------------------------------------------------------- reading a file


def _check_tensors(path: Path, file_bytes: int, start: int, infos) -> None:
    """Each tensor of the file's table (gguf's reader fields: name, dims, type, offset) against the
    file: a type gguf knows, whole blocks along its rows, data inside the file — one line naming
    the first tensor that is not, instead of a reshape error from deep inside the reader."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for info in infos:
        _, name_data, _, dims, raw_type, offset = info.parts
        name = bytes(name_data).decode("utf-8", "replace")
        try:
            kind = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name} has GGML type id {int(raw_type[0])}, which this version of the gguf "
                "package does not know (a newer llama.cpp format?); requantize the file to one of "
                f"{', '.join(['F32', 'F16', 'BF16', *DEQUANTIZERS])} with llama.cpp's llama-quantize") from None
        block, block_bytes = GGML_QUANT_SIZES[kind]
        dims = [int(d) for d in dims]
        if not dims or dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name} ({kind.name}, shape {list(reversed(dims))}) is not a "
                                  f"whole number of {block}-value blocks along its rows: the file is damaged")
        end = start + int(offset[0]) + int(np.prod(dims)) // block * block_bytes
        if end > file_bytes:
            raise CheckpointError(f"{path}: tensor {name}'s data ends at byte {end} but the file has {file_bytes} "
                                  "bytes: the file is truncated (an interrupted download or copy?); fetch it again")


def _open(path: Path):
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            _check_tensors(path, len(self.data), start_offs, fields)
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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
        (int(embed.shape[-1]) if embed is not None else None)
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


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter stores each head's q/k rows as interleaved rotary pairs
    (rows 0,1 = pair 0); Hugging Face keeps the halves apart (rows i and D/2+i = pair i).
    weight [heads·D, H] interleaved -> [heads·D, H] in halves."""
    rows, cols = weight.shape
    D = rows // heads
    return weight.view(heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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
        kind = t.tensor_type.name
        if kind not in NATURAL and kind not in DEQUANTIZERS:
            raise CheckpointError(
                f"{path}: tensor {t.name} is {kind}, which smoe cannot read (it reads "
                f"{', '.join([*NATURAL, *DEQUANTIZERS])}; the IQ types need their lattice tables and are not "
                "supported yet); requantize the file to one of those with llama.cpp's llama-quantize, e.g. "
                "Q4_K_M or Q3_K_M")


def hf_tensors(reader, config: dict, dtype: torch.dtype | None, done=lambda: None):
    """Yield (Hugging Face name, tensor) for every tensor of the file, dequantized to `dtype`
    (None: each in the type it has in the file, quantized ones in bf16); done() after each of
    the file's tensors."""
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    dense = not any("exps" in t.name or "ffn_gate_inp" in t.name for t in reader.tensors)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        kind = t.tensor_type.name
        value = torch.from_numpy(dequantize(t.data, kind, shape)).to(dtype or NATURAL.get(kind, torch.bfloat16))
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
        value = unpermute(value, heads[rest])
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
    reader = _open(path)
    check_types(reader, path)
    config = read_config(reader, path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    need = converted_bytes(reader, dtype)
    if config["tie_word_embeddings"]:  # the head is written as a tensor of its own
        embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
        need += int(embed.n_elements) * (dtype or NATURAL.get(embed.tensor_type.name, torch.bfloat16)).itemsize
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
        kind = t.tensor_type.name
        out = dtype or NATURAL.get(kind, torch.bfloat16)
        total += int(t.n_elements) * out.itemsize
    return total


def natural_dtype(reader) -> torch.dtype:
    """The dtype of the file's bulk weights (all but norms and routers): F16 -> fp16, BF16 ->
    bf16, F32 -> fp32; quantized or mixed -> bf16 (dequantized values d·q then round to bf16)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1 and "ffn_gate_inp" not in t.name}
    return NATURAL[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in NATURAL else torch.bfloat16


def cache_dir() -> Path:
    return Path(os.environ.get("SMOE_CACHE", Path.home() / ".cache" / "smoe")) / "gguf"


def cached_conversion(path: Path) -> Path:
    """`--model file.gguf`: the file converted once (natural_dtype) into smoe's cache, keyed by
    its path, size and modification time; later runs reuse it."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    print(f"smoe: converting {path} for smoe (once; cached in {out})", file=sys.stderr)
    return convert(path, out)
