"""GGML's block formats (llama.cpp's GGUF files): their layouts and their dequantization, the
plain reference every kernel for them is tested against (numpy; equal bit for bit to `gguf`'s
reference dequantization: tests/test_formats_gguf.py).

Block formats (ggml's, little-endian; d/dmin fp16; values in each block in order):

    type   elems  bytes  layout                                       value
    Q8_0    32     34    d, int8 q[32]                                d·q
    Q4_0    32     18    d, q[16]: low nibbles 0..15, high 16..31     d·(q − 8)
    Q4_1    32     20    d, m, q[16]                                  d·q + m
    Q5_0    32     22    d, qh (32 bits: the fifth bit of each), q[16] d·(q + 16·h − 16)
    Q5_1    32     24    d, m, qh, q[16]                              d·(q + 16·h) + m
    IQ4_NL  32     18    d, q[16] as Q4_0                             d·table[q] (16 fixed values)
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import CheckpointError
from smoe.weights import WeightFormat, register_format

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


IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def dequantize_iq4_nl(raw: np.ndarray) -> np.ndarray:
    """IQ4_NL: Q4_0's layout, each nibble an index into a fixed non-uniform table (llama.cpp's
    kvalues_iq4nl) — what llama.cpp writes for K-quant rows that are not whole 256-value blocks."""
    b = _blocks(raw, 18)
    q = b[:, 2:]
    codes = np.concatenate([q & 0x0F, q >> 4], axis=1)  # [n, 32]
    return (_f16(b, 0) * IQ4_NL_VALUES[codes]).reshape(-1)


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
                "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k, "IQ4_NL": dequantize_iq4_nl}




BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "IQ4_NL": (32, 18), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}
"""type -> (values per block, bytes per block)"""


TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14, "IQ4_NL": 20}
"""type -> GGML's type id (ggml.h's enum ggml_type), what the native kernels are told (smoe/csrc/ggml.h)"""


def row_bytes(kind: str, columns: int) -> int:
    """The bytes of one row of `columns` values in block format `kind` (whole blocks only)."""
    elems, nbytes = BLOCKS[kind]
    if columns % elems:
        raise CheckpointError(f"a {kind} row holds whole blocks of {elems} values; {columns} is not a multiple")
    return columns // elems * nbytes


# ------------------------------------------------------------------------------ in place: the reference modules


class GGMLLinear(nn.Module):
    """One bias-free linear in a GGML block format, held as the file holds it: `blocks` uint8
    [N, K / elems · bytes] (on the CPU a view of the memory-mapped file, nothing copied) and `kind`
    its type. forward is the reference: the weight dequantized (`dequantize`, gguf's values bit for
    bit), then F.linear — correct, not fast: a backend's kernels take these blocks where it has them."""

    def __init__(self, in_features: int, out_features: int, kind: str, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.register_buffer("blocks", torch.empty(out_features, row_bytes(kind, in_features), dtype=torch.uint8,
                                                   device=device))

    @staticmethod
    def of(blocks: torch.Tensor, kind: str, in_features: int) -> GGMLLinear:
        """The linear whose weight is `blocks` [N, row bytes] as they are (a view stays a view)."""
        with torch.device("meta"):
            linear = GGMLLinear(in_features, blocks.shape[0], kind)
        linear.blocks = blocks
        return linear

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        values = dequantize(self.blocks.cpu().numpy(), self.kind, (self.out_features, self.in_features))
        return torch.from_numpy(values).to(device=self.blocks.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_in(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class GGMLEmbedding(nn.Module):
    """A token embedding table in a GGML block format, held as the file holds it (`blocks` uint8
    [V, H / elems · bytes], a view of the memory-mapped file): a looked-up row is dequantized (gguf's
    values bit for bit), then rounded to `dtype` — the rows a table dequantized whole would give,
    without the table (Mixtral-8x7B's: 250 MiB in bf16, 500 MiB in fp32 while it is made). The native
    decode step reads the blocks itself (smoe::decode_step)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, kind: str, dtype: torch.dtype = torch.bfloat16,
                 device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.kind, self.dtype = num_embeddings, embedding_dim, kind, dtype
        self.register_buffer("blocks", torch.empty(num_embeddings, row_bytes(kind, embedding_dim), dtype=torch.uint8,
                                                   device=device))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id outside the embedding (0..{self.num_embeddings - 1})")
        rows = dequantize(self.blocks.cpu()[flat].numpy(), self.kind, (flat.numel(), self.embedding_dim))
        return torch.from_numpy(rows).to(device=ids.device, dtype=self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}, dtype={self.dtype}"


class StackedGGML(nn.Module):
    """E experts' linears in GGML block formats: parts [E, N_i, row bytes] whose outputs are
    concatenated (a GGUF file stores the experts' gate and up as two stacked tensors, each in its
    own type: `blocks0` and `blocks1`, kinds[i]); the plain stacked kind smoe/experts.py calls.
    Stacked by the loader as the file stacks them, a backend takes it whole (Backend.restack)."""

    format_name = "gguf-blocks"

    def __init__(self, parts: list[tuple[torch.Tensor, str]], in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.kinds = [kind for _, kind in parts]
        self.outs = [int(blocks.shape[1]) for blocks, _ in parts]
        for i, (blocks, kind) in enumerate(parts):
            if blocks.shape[-1] != row_bytes(kind, in_features) or blocks.shape[0] != parts[0][0].shape[0]:
                raise CheckpointError(f"stacked {kind} blocks {tuple(blocks.shape)} do not hold "
                                      f"{in_features}-value rows of every expert")
            self.register_buffer(f"blocks{i}", blocks)

    @staticmethod
    def stack(rows: list[list[GGMLLinear]]) -> StackedGGML:
        """rows: per expert, the linears whose outputs are concatenated (gate and up: [w1, w3])."""
        parts = []
        for j, first in enumerate(rows[0]):
            if any(row[j].kind != first.kind for row in rows):
                raise CheckpointError("experts stacked together must share each linear's block format")
            parts.append((torch.stack([row[j].blocks for row in rows]), first.kind))
        return StackedGGML(parts, rows[0][0].in_features)

    @property
    def num_experts(self) -> int:
        return self.blocks0.shape[0]

    def linears(self, e: int) -> list[GGMLLinear]:
        """Expert e's parts as GGMLLinear views of these blocks (gate and up: [w1, w3])."""
        return [GGMLLinear.of(getattr(self, f"blocks{i}")[e], kind, self.in_features)
                for i, kind in enumerate(self.kinds)]

    def weight_in(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight [sum of the parts' outputs, in], dequantized."""
        weights = []
        for i, (kind, out) in enumerate(zip(self.kinds, self.outs, strict=True)):
            blocks = getattr(self, f"blocks{i}")[e]
            values = dequantize(blocks.cpu().numpy(), kind, (out, self.in_features))
            weights.append(torch.from_numpy(values).to(device=blocks.device, dtype=dtype))
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's product: x [n, in] -> [n, out]."""
        return F.linear(x, self.weight_in(e, x.dtype))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, "
                f"parts={list(zip(self.kinds, self.outs, strict=True))}")


GGUF_BLOCKS = register_format(WeightFormat("gguf-blocks", 1, GGMLLinear, StackedGGML.stack))
