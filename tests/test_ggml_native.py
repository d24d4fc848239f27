"""GGUF's block formats in the native kernels (smoe/csrc/ggml.h, ggml_rows.h, ggml_avx2.h), against
references written here from llama.cpp's arithmetic:

- a row product equals, to fp32 rounding, the product of `gguf`'s dequantized weight (bit for bit
  smoe/ggml.py's) with the activations quantized as llama.cpp quantizes them (Q8_K for K-quants:
  d = max / -127 per 256 values, round half to even; Q8_0 for the 32-value types: d = max|x| / 127
  rounded to fp16, round half away from zero) — every type, every variant this CPU runs, 1..16 token
  rows, scales that are fp16 subnormals (real Q6_K files have them);
- every variant gives the same bits (the integer sums are exact, the fp32 operations after them
  run in one order);
- prefill's dequantization (linear_prefill) is gguf's dequantization bit for bit, and its bf16
  GEMMs (AVX-512 CPUs) the bf16 model's product bit for bit;
- the fused MoE op over GGUF's two stacked parts (gate, up) equals the experts one by one;
- a GGUF file loaded in place runs these kernels on views of the file (nothing copied), its decode
  step (smoe::decode_step) gives the modules' logits bit for bit, and its logits agree with the
  fp32 reference path's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import smoe
import smoe.kernels.native as native
from smoe.ggml import BLOCKS, TYPE_IDS, dequantize
from smoe.kernels import ops

gguf = pytest.importorskip("gguf")
from test_formats_gguf import _mapped_from, write_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

TYPES = list(TYPE_IDS)
SCALES = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # byte offsets of each block's fp16 scales


def random_rows(kind: str, N: int, K: int, rng, scale: float = 0.01) -> np.ndarray:
    """N rows of K values in `kind`: random bytes, finite fp16 scales (some of them subnormal)."""
    elems, nbytes = BLOCKS[kind]
    raw = rng.integers(0, 256, size=(N, K // elems, nbytes), dtype=np.uint8)
    for at in SCALES[kind]:
        d = rng.standard_normal((N, K // elems, 1)) * scale
        d[..., ::3, :] *= 1e-3  # every third block's scales below fp16's smallest normal (6.1e-5)
        raw[..., at : at + 2] = d.astype("<f2").view(np.uint8)
    return raw.reshape(N, -1)


def q8_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q8_K, dequantized: per 256 values q = min(127, round(-127 / max · x))."""
    out = np.zeros_like(x)
    for i, v in enumerate(x.reshape(-1, 256)):
        top = v[np.argmax(np.abs(v))]
        if top != 0:
            iscale = np.float32(-127.0) / np.float32(top)
            out.reshape(-1, 256)[i] = np.minimum(127, np.rint(iscale * v)) * (np.float32(1) / iscale)
    return out


def q8_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q8_0, dequantized: d = max|x| / 127 (stored fp16), q = round(x / d)."""
    b = x.reshape(-1, 32)
    d = np.abs(b).max(1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d == 0, 1, d), 0).astype(np.float32)
    q = np.sign(b * inv) * np.floor(np.abs(b * inv) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def product(kind: str, blocks: np.ndarray, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(llama.cpp's product in float64, the sum of |terms| per output) for bf16 rows x."""
    N, K = blocks.shape[0], x.shape[1]
    W = dequantize(blocks, kind, (N, K)).astype(np.float64)
    quantize = q8_k if BLOCKS[kind][0] == 256 else q8_0
    xq = np.stack([quantize(row) for row in x.float().numpy()]).astype(np.float64)
    return xq @ W.T, np.abs(xq) @ np.abs(W).T


@pytest.fixture(params=ops.variants() or ["none"])
def variant(request):
    before = ops.variant()
    ops.select(request.param)
    yield request.param
    ops.select(before)


def info(kind: str) -> torch.Tensor:
    return torch.tensor([TYPE_IDS[kind]], dtype=torch.int32)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("M,N,K", [(1, 5, 512), (3, 7, 768), (16, 4, 1024)])
def test_row_products_are_llama_cpps(variant, kind, M, N, K):
    rng = np.random.default_rng(M * 1000 + N)
    if BLOCKS[kind][0] == 32:
        K -= 32 * (M % 3)  # rows of whole 32-value blocks that are not whole 256s too
    blocks = random_rows(kind, N, K, rng)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N)).bfloat16()
    ours = torch.ops.smoe.linear_ggml(x, torch.from_numpy(blocks), info(kind)).float().numpy()
    reference, magnitude = product(kind, blocks, x)
    # the op rounds to bf16 (half a step: 2^-8 relative); its fp32 sums add a few ulp of the terms' magnitude
    assert np.all(np.abs(ours - reference) <= 2.0**-8 * np.abs(reference) + 1e-5 * magnitude + 1e-30)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("M", [1, 7, 40])
def test_fp32_row_products_are_llama_cpps_unrounded(variant, kind, M):
    """fp32 activations (a model loaded in fp32, in place): quantized from fp32 as llama.cpp
    quantizes them, the products returned in fp32 — llama.cpp's own arithmetic, for any number of
    rows (prefill too: llama.cpp quantizes a prompt's activations as well)."""
    rng = np.random.default_rng(M)
    K = 768
    blocks = random_rows(kind, 6, K, rng)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    ours = torch.ops.smoe.linear_ggml(x, torch.from_numpy(blocks), info(kind))
    assert ours.dtype == torch.float32
    N, quantize = blocks.shape[0], q8_k if BLOCKS[kind][0] == 256 else q8_0
    W = dequantize(blocks, kind, (N, K)).astype(np.float64)
    xq = np.stack([quantize(row) for row in x.numpy()]).astype(np.float64)
    reference, magnitude = xq @ W.T, np.abs(xq) @ np.abs(W).T
    if kind in ("Q4_1", "Q5_1"):  # llama.cpp multiplies a block's min by fp16(d·Σq), not by the exact Σ d·q
        mins = blocks.reshape(N, -1, BLOCKS[kind][1])[:, :, 2:4].copy().view("<f2")[..., 0].astype(np.float64)
        xb = x.numpy().reshape(M, -1, 32)
        d = np.abs(xb).max(-1) / np.float32(127)
        sums = xq.reshape(M, -1, 32).sum(-1) / np.where(d == 0, 1, d.astype(np.float16).astype(np.float32))
        stored = (sums * d).astype(np.float32).astype(np.float16).astype(np.float64)
        reference += (stored - xq.reshape(M, -1, 32).sum(-1)) @ mins.T
    assert np.all(np.abs(ours.numpy() - reference) <= 1e-5 * magnitude + 1e-30)


@pytest.mark.parametrize("kind", TYPES)
def test_every_variant_gives_the_same_bits(kind):
    rng = np.random.default_rng(5)
    blocks = torch.from_numpy(random_rows(kind, 9, 1280, rng))
    x = torch.randn(5, 1280, generator=torch.Generator().manual_seed(1)).bfloat16()
    before, outs = ops.variant(), []
    try:
        for name in ops.variants():
            ops.select(name)
            outs.append(torch.ops.smoe.linear_ggml(x, blocks, info(kind)))
    finally:
        ops.select(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("kind", TYPES)
def test_prefill_dequantizes_as_gguf(variant, kind):
    """linear_prefill over GGML blocks: fp32 GEMMs over gguf's dequantized values, bit for bit."""
    rng = np.random.default_rng(2)
    blocks = random_rows(kind, 37, 512, rng)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(3)).bfloat16()
    ours = torch.ops.smoe.linear_prefill(x, torch.from_numpy(blocks), info(kind), 0)
    weight = torch.from_numpy(dequantize(blocks, kind, (37, 512)))
    assert torch.equal(ours, (x.float() @ weight.T).bfloat16())


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "Q3_K", "Q6_K"])
@pytest.mark.parametrize("N,M", [(37, 40), (4100, 23)])  # one block of rows / two, rows padded to 48 / 32
def test_prefill_in_bf16_is_the_bf16_models_product(variant, kind, N, M):
    """linear_prefill's bf16 GEMMs (asked where the kernels are AVX-512's): gguf's dequantized values
    rounded to bf16, multiplied as the PyTorch twin (GGMLLinear in bf16: F.linear over the rounded
    weight) multiplies them — the same bits, whatever the padding of the rows and the blocks of N."""
    if "avx512" not in ops.variants():  # (elsewhere PyTorch's bf16 GEMM, which the kernels do not ask, may sum
        pytest.skip("the bf16 GEMMs are asked where the kernels are AVX-512's")  # in a shape's own order)
    rng = np.random.default_rng(6)
    K = 512
    blocks = random_rows(kind, N, K, rng)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7)).bfloat16()
    ours = torch.ops.smoe.linear_prefill(x, torch.from_numpy(blocks), info(kind), 0, True)
    weight = torch.from_numpy(dequantize(blocks, kind, (N, K))).bfloat16()
    assert ours.shape == (M, N) and ours.is_contiguous()
    assert torch.equal(ours, torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0"])
def test_a_prompts_rows_take_the_variants_gemm(variant, kind):
    """A GGUF linear over a prompt's rows (more than the row kernels take): bf16 GEMMs over the
    bf16-rounded values where the variant is AVX-512 (the bf16 model's product), fp32 GEMMs over
    gguf's values rounded once elsewhere — each bit for bit."""
    from smoe.ggml import GGMLLinear

    rng = np.random.default_rng(8)
    blocks = random_rows(kind, 21, 512, rng)
    linear = native.NativeGGMLLinear(GGMLLinear.of(torch.from_numpy(blocks), kind, 512))
    x = torch.randn(2, 20, 512, generator=torch.Generator().manual_seed(9)).bfloat16()  # 40 rows > MAX_ROWS
    weight = torch.from_numpy(dequantize(blocks, kind, (21, 512)))
    expected = (torch.nn.functional.linear(x, weight.bfloat16()) if variant == "avx512"
                else (x.float() @ weight.T).bfloat16())
    assert torch.equal(linear(x), expected)


@pytest.mark.parametrize("gate,up,down", [("Q4_K", "Q4_K", "Q6_K"), ("Q3_K", "Q2_K", "Q4_0"), ("Q5_0", "Q8_0", "Q5_K")])
def test_fused_moe_over_the_files_two_parts_equals_each_expert(variant, gate, up, down):
    """smoe::moe_ggml (gate and up as the file stacks them, each of its type) against the sorted
    path (each chosen expert's products by linear_ggml, SiLU·up and the weighted sum in PyTorch)."""
    from smoe.experts import StackedExperts
    from smoe.ggml import StackedGGML

    E, H, F = 5, 512, 256
    rng = np.random.default_rng(9)
    parts = [(torch.from_numpy(random_rows(k, E * F, H, rng).reshape(E, F, -1)), k) for k in (gate, up)]
    experts = StackedExperts(native.NativeStackedGGML(StackedGGML(parts, H)),
                             native.NativeStackedGGML(StackedGGML(
                                 [(torch.from_numpy(random_rows(down, E * H, F, rng).reshape(E, H, -1)), down)], F)),
                             F)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, H, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(6)])
    weights = torch.softmax(torch.randn(6, 2, generator=gen), -1)
    experts.path = "fused"
    fused = experts(x, idx, weights)
    experts.path = "sorted"
    sorted_ = experts(x, idx, weights)
    torch.testing.assert_close(fused.float(), sorted_.float(), rtol=2.0**-7, atol=1e-3 * sorted_.abs().max().item())


@pytest.fixture(scope="module")
def original(checkpoint_factory):
    return checkpoint_factory(seed=3, vocab_size=32000, hidden_size=256, intermediate_size=512,
                              num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)


@pytest.mark.parametrize("qtype,experts_qtype", [("Q8_0", "Q4_0"), ("Q4_0", "Q4_K"), ("Q5_1", "Q3_K"),
                                                 ("Q4_1", "Q2_K"), ("Q5_0", "Q6_K")])
def test_gguf_in_place_runs_the_native_kernels_on_the_files_blocks(original, tmp_path, qtype, experts_qtype):
    """smoe.load(file, gguf_in_place=True) in bf16: every quantized matrix in the native kinds, its
    blocks still views of the file; a decode step (one smoe::decode_step) gives the modules'
    logits bit for bit; against the fp32 reference path (weights dequantized, activations not
    quantized) its logits are within 3x the distance of the bf16 PyTorch path (the same weights, bf16
    activations): the activations quantized to 8 bits with one scale per 256 values (Q8_K, llama.cpp's
    for K-quants) measured 2.0-2.7x that distance here, per 32 values (Q8_0) 0.9x."""
    from smoe.cache import KVCache
    from smoe.model import HalfCacheAttention

    file = write_gguf(original, tmp_path / "m.gguf", qtype, experts_qtype, tokenizer=False)
    model = smoe.load(file, gguf_in_place=True)[0]
    reference = smoe.load(file, gguf_in_place=True, dtype="fp32", pack=False)[0]  # PyTorch's fp32 products
    llama = smoe.load(file, gguf_in_place=True, dtype="fp32")[0]  # fp32, activations quantized as llama.cpp does
    plain = smoe.load(file, gguf_in_place=True, pack=False)[0]  # bf16, PyTorch's products of the dequantized weights
    layer = model.layers[1]
    assert isinstance(layer.attn.v_proj, native.NativeGGMLLinear)
    assert isinstance(layer.moe.experts.gate_up, native.NativeStackedGGML)
    assert _mapped_from(file, layer.attn.v_proj.blocks) and _mapped_from(file, layer.moe.experts.gate_up.blocks1)
    assert _mapped_from(file, layer.moe.experts.down.blocks0)
    assert model.kernels.ran["layers", "native", "decode steps"] == len(model.layers)
    ids = torch.randint(0, 32000, (4, 24), generator=torch.Generator().manual_seed(0))  # 4 prompts: the distances
    # below vary 1.1-3.5x between single 24-token prompts of this 2-layer model (8-bit codes that flip)
    with torch.inference_mode():
        ours, theirs, bf16, fp32 = model(ids).float(), reference(ids).float(), plain(ids).float(), llama(ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    assert (ours - theirs).abs().mean() <= 3 * (bf16 - theirs).abs().mean()
    # in fp32 the native kernels run the GGML matrices alone (no decode plan), every row's
    # activations quantized to 8 bits as llama.cpp quantizes them (the prompt's too: the bf16
    # path above dequantizes the weights for 24 rows instead), and attention rounds as llama.cpp's
    # F16 KV cache does (HalfCacheAttention): against the reference with that attention, the
    # activations' quantization is the only difference
    assert isinstance(llama.layers[1].moe.experts.gate_up, native.NativeStackedGGML) and llama.decode_plan is None
    for layer in reference.layers:
        layer.attn = HalfCacheAttention.of(layer.attn)
    with torch.inference_mode():
        half = reference(ids).float()
    assert fp32.dtype == torch.float32 and (fp32.argmax(-1) == half.argmax(-1)).float().mean() >= 0.9
    assert (fp32 - half).abs().mean() <= 3 * (bf16 - theirs).abs().mean()
    cache = KVCache(model.config, 1, 64, dtype=model.dtype)
    with torch.inference_mode():
        model(ids[:1, :5], torch.arange(5)[None], cache)
        for position in range(5, 12):
            token = int(ids[0, position])
            saved = [t.clone() for t in (cache.k, cache.v, cache.slot_pos)]
            with torch.profiler.profile() as prof:
                logits, best = model.decode_step([token], [position], cache)
            assert [e.name for e in prof.events() if e.name.startswith("smoe::")] == ["smoe::decode_step"]
            for t, s in zip((cache.k, cache.v, cache.slot_pos), saved, strict=True):
                t.copy_(s)
            modules = model(torch.tensor([[token]]), torch.tensor([[position]]), cache)[:, -1]
            assert torch.equal(logits, modules) and torch.equal(best, modules.float().max(-1).indices)


def _attention_written_out(q, k, v):
    """The slow twin of HalfCacheAttention without a cache (causal): per head and query row in
    float64, from q, k, v and the probabilities rounded to fp16 where llama.cpp's F16 cache rounds them."""
    B, Q, T, D = q.shape
    G = k.shape[1]
    half = [t.to(torch.float16).double() for t in (q, k, v)]
    out = torch.empty(B, Q, T, D, dtype=torch.float64)
    for h in range(Q):
        g = h // (Q // G)
        for t in range(T):
            scores = (half[1][0, g, : t + 1] * half[0][0, h, t]).sum(-1) * D**-0.5
            probs = torch.softmax(scores, -1).to(torch.float16).double()
            out[0, h, t] = (probs[:, None] * half[2][0, g, : t + 1]).sum(0)
    return out


def test_fp32_in_place_attends_as_llama_cpps_f16_cache(original, tmp_path):
    """fp32 in place with the kernels (llama.cpp's products) attends as llama.cpp does over its F16
    KV cache (HalfCacheAttention; the PyTorch reference, pack=False, does not): its output equals
    the attention written out in float64 from fp16-rounded q, k, v and probabilities (to fp32
    rounding: 1.7e-7 here), where fp32 attention of the same q, k, v is ~1000x farther; the keys and values it caches are fp16 values;
    and a prompt run token by token over the cache gives the logits and greedy tokens of the
    prompt at once."""
    from smoe.cache import KVCache
    from smoe.model import Attention, ForwardContext, HalfCacheAttention

    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0", "Q4_K", tokenizer=False)
    model = smoe.load(file, gguf_in_place=True, dtype="fp32")[0]
    attn = model.layers[0].attn
    assert type(attn) is HalfCacheAttention
    assert type(smoe.load(file, gguf_in_place=True, dtype="fp32", pack=False)[0].layers[0].attn) is Attention
    g = torch.Generator().manual_seed(0)
    Q, G, T, D = attn.n_heads, attn.n_kv_heads, 24, attn.head_dim
    q, k, v = (torch.randn(1, n, T, D, generator=g) for n in (Q, G, G))
    want = _attention_written_out(q, k, v)
    got = attn.attend(q, k, v, ForwardContext(None, None, None, True, None)).double()
    attn.scores_bytes = 4 * Q * T * 5  # 5 query rows at a time (a long prompt's blocks)
    torch.testing.assert_close(attn.attend(q, k, v, ForwardContext(None, None, None, True, None)).double(), want,
                               rtol=0, atol=1e-6)
    del attn.scores_bytes
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (plain - want).abs().mean() > 1000 * (got - want).abs().mean()
    ids = torch.randint(0, 32000, (1, 16), generator=g)
    cache = KVCache(model.config, 1, 32, dtype=model.dtype)
    with torch.inference_mode():
        whole = model(ids)[0]
        steps = torch.cat([model(ids[:, i : i + 1], torch.tensor([[i]]), cache)[0] for i in range(16)])
    assert torch.equal(cache.k, cache.k.half().float()) and torch.equal(cache.v, cache.v.half().float())
    assert torch.equal(whole.argmax(-1), steps.argmax(-1))
    torch.testing.assert_close(steps, whole, rtol=0, atol=1e-3 * whole.abs().max().item())
