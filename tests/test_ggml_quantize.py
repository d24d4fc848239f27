"""smoe's own GGUF quantizers (smoe/formats/ggml_quantize.py) and llama.cpp's preset type mixes
(smoe/formats/gguf_write.py) against their references:
- the 32-value types equal `gguf`'s reference quantizer bit for bit;
- every type against llama.cpp's own quantizer (`ggml_quantize_chunk` without an importance
  matrix, as `llama-quantize` runs it): its blocks, stored by scripts/ggml_quant_reference.py in
  tests/data/ggml_quants/llama_cpp.npz, equal ours but where fp32 sums in another order tip a
  choice, and our squared error is never above llama.cpp's by more than that;
- the per-tensor types of each preset equal those of the files llama.cpp's quantizer wrote for the
  demo model (recorded below) and its rules for other shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoe.formats import ggml_quantize
from smoe.formats.ggml_quantize import quantize
from smoe.formats.gguf_write import FALLBACK, tensor_type
from smoe.ggml import BLOCKS, dequantize

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import quantize as reference_quantize  # noqa: E402

LLAMA = np.load(Path(__file__).parent / "data" / "ggml_quants" / "llama_cpp.npz")
ROWS = LLAMA["rows"].astype(np.float32)  # 16 x 512: scales 1e-6 .. 1, heavy tails, outliers, zeros, constants
SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def edge_rows() -> np.ndarray:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 256)).astype(np.float32) * np.float32(0.05)
    w[0, :32] = 0
    w[1, :32] = np.arange(32, dtype=np.float32) - 16 + np.float32(0.5)  # Q8_0: d = 1, every value a half
    w[1, 0] = 127
    w[2, :32] = -np.abs(w[2, :32])
    w[3, 5], w[3, 9] = -0.3, 0.3  # the largest magnitude twice, both signs
    return w


@pytest.mark.parametrize("kind", SIMPLE)
def test_32_value_quantizers_equal_ggufs_reference(kind):
    for w in (ROWS, edge_rows()):
        ours = quantize(w, kind)
        assert ours.dtype == np.uint8 and np.array_equal(ours, reference_quantize(w, GGMLQuantizationType[kind]))


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_quantizers_against_llama_cpps(kind):
    ours, theirs = quantize(ROWS, kind), LLAMA[kind]
    nbytes = BLOCKS[kind][1]
    equal = (ours.reshape(-1, nbytes) == theirs.reshape(-1, nbytes)).all(axis=1)
    err_ours = ((dequantize(ours, kind, ROWS.shape) - ROWS) ** 2).sum(axis=1)
    err_theirs = ((dequantize(theirs, kind, ROWS.shape) - ROWS) ** 2).sum(axis=1)
    if kind in SIMPLE:
        assert equal.all()
    else:  # measured: 93.4-100 % of blocks equal; the rest differ by fp32 summation order
        assert equal.mean() >= 0.9, equal.mean()
    assert err_ours.sum() <= err_theirs.sum() * (1 + 1e-4)
    assert np.all(err_ours <= err_theirs * (1 + 1e-3) + 1e-30)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_quantizing_in_chunks_changes_nothing(kind, monkeypatch):
    whole = quantize(ROWS, kind)
    monkeypatch.setattr(ggml_quantize, "CHUNK", 512)  # a few blocks at a time
    assert np.array_equal(quantize(ROWS.reshape(4, 4, 512), kind).reshape(whole.shape), whole)


def test_quantizer_refuses_rows_of_partial_blocks():
    with pytest.raises(ValueError, match=r"Q4_K rows hold whole blocks of 256 values; 384"):
        quantize(np.zeros((2, 384), np.float32), "Q4_K")


# llama.cpp 0.3.36's llama_model_quantize on the demo model (hidden 256, experts 8 x 384, 6 layers,
# 8 query / 2 kv heads), read back from its files: role -> type (ffn_down_exps per layer)
DEMO_TYPES = {
    "Q4_K_M": {"token_embd": "Q4_K", "attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q5_K",
               "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "output": "Q6_K",
               "ffn_down_exps": ["Q5_0", "Q5_0", "Q8_0", "Q5_0", "Q5_0", "Q8_0"]},
    "Q3_K_M": {"token_embd": "Q3_K", "attn_q": "Q3_K", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q5_K",
               "ffn_gate_exps": "Q3_K", "ffn_up_exps": "Q3_K", "output": "Q6_K", "ffn_down_exps": ["Q5_0"] * 6},
    "Q2_K": {"token_embd": "Q2_K", "attn_q": "Q2_K", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q5_K",
             "ffn_gate_exps": "Q2_K", "ffn_up_exps": "Q2_K", "output": "Q6_K", "ffn_down_exps": ["Q4_0"] * 6},
    "Q4_0": {"token_embd": "Q4_0", "attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q4_0",
             "ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q4_0", "output": "Q6_K", "ffn_down_exps": ["Q4_0"] * 6},
    "Q8_0": {"token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q8_0",
             "ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q8_0", "output": "Q8_0", "ffn_down_exps": ["Q8_0"] * 6},
}


@pytest.mark.parametrize("preset", list(DEMO_TYPES))
def test_preset_types_are_llama_cpps_on_the_demo(preset):
    for role, want in DEMO_TYPES[preset].items():
        columns = 384 if role == "ffn_down_exps" else 256
        for layer in range(6):
            expected = want[layer] if isinstance(want, list) else want
            assert tensor_type(preset, role, columns, layer, 6, experts=8, gqa=4) == expected, (role, layer)
    for role in ("attn_norm", "ffn_norm", "output_norm", "ffn_gate_inp"):
        assert tensor_type(preset, role, 256, experts=8) == "F32"


def test_preset_rules_for_mixtral_and_dense_attention():
    # Mixtral-8x7B (32 layers, 14336-wide experts): Q3_K_M's down is Q5_K in layers 0-1, then Q4_K
    assert [tensor_type("Q3_K_M", "ffn_down_exps", 14336, i, 32) for i in (0, 1, 2, 31)] == ["Q5_K"] * 2 + ["Q4_K"] * 2
    assert [tensor_type("Q4_K_M", "ffn_down_exps", 14336, i, 32) for i in (0, 4, 6, 7, 28)] == \
        ["Q6_K", "Q4_K", "Q6_K", "Q4_K", "Q6_K"]  # use_more_bits: first/last eighth, every third between
    assert tensor_type("Q3_K_S", "ffn_down_exps", 14336, 0, 32) == "Q3_K"
    # not 8 experts: llama.cpp's dense rules for attention
    assert tensor_type("Q2_K", "attn_v", 4096, 0, 32, experts=4, gqa=4) == "Q4_K"
    assert tensor_type("Q2_K", "attn_v", 4096, 0, 32, experts=4, gqa=1) == "Q3_K"
    assert tensor_type("Q3_K_M", "attn_v", 4096, 1, 32, experts=4) == "Q5_K"
    assert tensor_type("Q3_K_M", "attn_v", 4096, 2, 32, experts=4) == "Q4_K"
    assert tensor_type("Q2_K", "attn_output", 4096, experts=4) == "Q3_K"
    assert tensor_type("Q4_K_M", "attn_k", 4096, experts=4) == "Q4_K"
    # rows that are not whole blocks: llama.cpp's fallbacks, then F16
    for kind, fallback in FALLBACK.items():
        assert BLOCKS[fallback][0] == 32 and kind.endswith("_K")
    assert tensor_type("Q4_K_M", "attn_q", 96) == "Q5_0"
    assert tensor_type("Q4_K_M", "attn_q", 40) == "F16"
