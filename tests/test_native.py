"""The native CPU kernels (smoe/csrc/native.cpp) against PyTorch references at awkward shapes:
bf16 products equal to F.linear up to the order of the fp32 sums; int8 / int4 products equal
to the same products computed in fp64 from the dequantized weights and the kernels' own 8-bit
activations (themselves checked against a Python quantizer); the fused MoE op equal to the
experts module it replaces; 1 and 2 threads; greedy tokens of the demo model identical with
and without the kernels and between the kernel variants; the op inside torch.compile. Every
kernel test runs once per variant this CPU runs (`variant`: avx512, avx2-vnni, avx2, neon,
portable — smoe/csrc/isa.h), and the self-test compares the variants without torch, here and
for aarch64 under qemu. Skipped where the kernels are not built, which test_fallback covers."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import smoe
from smoe import kernels
from smoe.experts import Expert, ExpertList, StackedExperts
from smoe.kernels import decode, native, ops
from smoe.options import QuantSpec
from smoe.quantize import quantize_expert, quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
BF16_ULP = 2.0**-8  # relative spacing of bf16 numbers
SELFTEST_FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-static", "-w"]  # as the Makefile builds it


@pytest.fixture(params=ops.variants() or ["none"])
def variant(request):
    """Each kernel variant this CPU runs, selected for the test (the best one again after it)."""
    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    before = ops.variant()
    ops.select(request.param)
    yield request.param
    ops.select(before)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def python_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 along each row, absmax / 127, round half to even: the dequantized values."""
    M, K = x.shape
    pad = -K % 32
    blocks = F.pad(x.float(), (0, pad)).view(M, -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / torch.where(scale > 0, scale, 1)), 0).clamp(-127, 127)
    return (q * scale).view(M, -1)[:, :K]


def assert_close_to_exact(y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """y (bf16) within one bf16 rounding of `exact` plus the fp32 summation error `bound`."""
    err = (y.double() - exact).abs()
    limit = exact.abs() * BF16_ULP + bound
    assert (err <= limit).all(), (err - limit).max().item()


def sum_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A bound on fp32 accumulation error of x·wᵀ: K·eps·sum|x||w| (loose but rigorous)."""
    K = x.shape[1]
    return K * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) + 1e-30


# --------------------------------------------------------------------------- single products


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 31), (5, 33), (37, 100), (9, 1000), (130, 64)])
def test_bf16_product(variant, threads, M, N, K):
    x, w = randn(M, K, seed=1), randn(N, K, seed=2)
    y = torch.ops.smoe.linear_bf16(x, w)
    exact = x.double() @ w.double().t()
    assert_close_to_exact(y, exact, sum_bound(x, w))


@needs_native
@pytest.mark.parametrize("M,K", [(1, 7), (3, 32), (2, 100), (8, 1000)])
def test_activation_quantization_matches_python(variant, M, K):
    x = randn(M, K, seed=3)
    x[0, :5] = 0  # a block with zeros, and below a block of zeros
    if K >= 64:
        x[-1, 32:64] = 0
    ours = torch.ops.smoe.quantize_activations(x, 32)
    assert torch.equal(ours, python_quantize_activations(x))


@needs_native
@pytest.mark.parametrize("M", [1, 2, 4, 5, 8, 16])
@pytest.mark.parametrize("N,K", [(1, 5), (3, 64), (7, 65), (37, 200), (9, 1000)])
def test_int8_product(variant, threads, M, N, K):
    x, w = randn(M, K, seed=4), randn(N, K, seed=5, scale=0.05)
    q, scale = quantize_int8(w)
    y = torch.ops.smoe.linear_q8(x, q, scale)
    xq = torch.ops.smoe.quantize_activations(x, 32).double()
    wq = q.double() * scale.double()[:, None]
    assert_close_to_exact(y, xq @ wq.t(), 4 * sum_bound(xq, wq))


@needs_native
@pytest.mark.parametrize("M", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("N,K,G", [(1, 32, 32), (5, 96, 32), (37, 224, 32), (9, 192, 64), (4, 384, 128),
                                   (3, 768, 256), (6, 256, 256)])
def test_int4_product(variant, threads, M, N, K, G):
    x, w = randn(M, K, seed=6), randn(N, K, seed=7, scale=0.05)
    codes, scale, zero = quantize_int4(w.float(), G)
    packed, sm = native.int4_native_layout(codes, scale, zero)
    y = torch.ops.smoe.linear_q4(x, packed, sm, G)
    xq = torch.ops.smoe.quantize_activations(x, 32).double()
    s = sm[:, 0].double().repeat_interleave(G, dim=1)
    m = sm[:, 1].double().repeat_interleave(G, dim=1)
    wq = codes.double() * s + m  # what the stored bf16 scale and offset mean
    assert_close_to_exact(y, xq @ wq.t(), 4 * sum_bound(xq, wq))
    # and the dequantization prefill uses reads the same layout
    assert torch.equal(native.dequantize_int4_native(packed, sm, G, torch.float64), wq)


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M,N,K", [(17, 37, 96), (64, 300, 224), (33, 5, 992), (40, 700, 64)])
def test_prefill_product(variant, threads, kind, M, N, K):
    """smoe::linear_prefill (prompts where the kernels are not AVX-512's: the weight widened or
    dequantized to fp32 a block of rows at a time, fp32 GEMMs, one rounding to bf16) against fp64
    products of the same weights; N = 700 spans several blocks."""
    x, w = randn(M, K, seed=11), randn(N, K, seed=12, scale=0.05)
    if kind == "bf16":
        y, wq = torch.ops.smoe.linear_prefill(x, w, None, 0), w.double()
    elif kind == "int8":
        q, scale = quantize_int8(w)
        y, wq = torch.ops.smoe.linear_prefill(x, q, scale, 0), q.double() * scale.double()[:, None]
    else:
        codes, scale, zero = quantize_int4(w.float(), 32)
        packed, sm = native.int4_native_layout(codes, scale, zero)
        y, wq = torch.ops.smoe.linear_prefill(x, packed, sm, 32), native.dequantize_int4_native(packed, sm, 32, torch.float64)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert_close_to_exact(y, x.double() @ wq.t(), sum_bound(x, wq))


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("K", [256, 1024, 224])
def test_a_rows_product_does_not_depend_on_its_batch(variant, kind, K):
    """Batch invariance: a token row's product is the same bits alone (where AVX-512 takes 4 weight
    rows a call) as among 2..8 rows (groups of up to 4 token rows), in every variant."""
    x, w = randn(8, K, seed=21), randn(37, K, seed=22, scale=0.05)
    if kind == "bf16":
        product = lambda rows: torch.ops.smoe.linear_bf16(rows, w)  # noqa: E731
    elif kind == "int8":
        q, scale = quantize_int8(w)
        product = lambda rows: torch.ops.smoe.linear_q8(rows, q, scale)  # noqa: E731
    else:
        packed, sm = native.int4_native_layout(*quantize_int4(w.float(), 32))
        product = lambda rows: torch.ops.smoe.linear_q4(rows, packed, sm, 32)  # noqa: E731
    alone = torch.cat([product(x[i:i + 1]) for i in range(8)])
    for batch in (2, 3, 5, 8):
        assert torch.equal(torch.cat([product(x[i:i + batch]) for i in range(0, 8, batch)]), alone), batch


@needs_native
def test_bad_inputs_are_errors_not_crashes():
    x = randn(2, 64)
    with pytest.raises(RuntimeError, match="activations must be bf16"):
        torch.ops.smoe.linear_bf16(x.float(), randn(3, 64))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.smoe.linear_bf16(x, randn(3, 64)[:, :32])
    with pytest.raises(RuntimeError, match="group size"):
        codes, scale, zero = quantize_int4(randn(4, 64).float(), 32)
        torch.ops.smoe.linear_q4(x, *native.int4_native_layout(codes, scale, zero), 48)


# --------------------------------------------------------------------------- the fused MoE op

H, FF = 96, 160  # neither a multiple of 64; both multiples of 32 (int4's smallest group)


def expert_list(num_experts: int, seed: int = 0, hidden: int = H, ffn: int = FF) -> ExpertList:
    torch.manual_seed(seed)
    experts = ExpertList(Expert(hidden, ffn) for _ in range(num_experts))
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return experts.to(torch.bfloat16).requires_grad_(False)


def routing(tokens, num_experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g) + 0.05
    return indices, weights / weights.sum(-1, keepdim=True)


def quantized(experts: ExpertList, quant: str | None) -> ExpertList:
    experts = copy.deepcopy(experts)
    if quant is not None:
        experts.map_experts(lambda e: quantize_expert(e, QuantSpec.parse(quant)))
    return experts


@needs_native
@pytest.mark.parametrize("quant", [None, "int8", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (8, 3), (16, 4)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 16])
def test_fused_moe_equals_the_experts_module(variant, threads, quant, num_experts, top_k, tokens):
    """The fused op against the same stacked experts run expert by expert (each expert's
    products through the same kernels, the rest in PyTorch): equal up to SiLU's last bit."""
    hidden, ffn = (192, 320) if quant == "int4-g64" else (H, FF)  # g64 needs multiples of 64 (not of 128)
    experts = quantized(expert_list(num_experts, hidden=hidden, ffn=ffn), quant)
    stacked = experts.for_inference(kernels.for_load(kernels.Target()))
    assert isinstance(stacked, StackedExperts) and stacked.fused
    x = randn(tokens, hidden, seed=tokens)
    indices, weights = routing(tokens, num_experts, top_k, seed=tokens * 31 + num_experts)
    stacked.path = "fused"
    fused = stacked(x, indices, weights)
    stacked.path = "sorted"
    per_expert = stacked(x, indices, weights)
    # PyTorch's vectorised SiLU and the kernel's std::exp may round one bf16 value differently;
    # one such ulp moves an output by about one ulp of its largest term
    scale = per_expert.float().abs().amax()
    assert (fused.float() - per_expert.float()).abs().max() <= 4 * BF16_ULP * scale


@needs_native
@pytest.mark.parametrize("quant,limit", [(None, 0.02), ("int8", 0.05), ("int4-g32", 0.05)])
def test_fused_moe_close_to_the_pytorch_experts(variant, quant, limit):
    """Against PyTorch's own kinds (bf16 products; int8/int4 with unquantized activations):
    the difference is the 8-bit activations' rounding, a few % of the output's scale."""
    experts = quantized(expert_list(8, seed=3), quant)
    reference = copy.deepcopy(experts).for_inference(kernels.PLAIN)
    assert not reference.fused
    stacked = experts.for_inference(kernels.for_load(kernels.Target()))
    x = randn(6, H, seed=9)
    indices, weights = routing(6, 8, 2, seed=5)
    ours, theirs = stacked(x, indices, weights).float(), reference(x, indices, weights).float()
    assert (ours - theirs).norm() / theirs.norm() < limit


@needs_native
def test_fused_moe_reads_rows_that_are_not_multiples_of_the_tile(variant):
    """H and F that are neither multiples of 4 (the row tile) nor of 32 (bf16 only)."""
    experts = expert_list(5, hidden=37, ffn=23)
    reference = copy.deepcopy(experts)
    stacked = experts.for_inference(kernels.for_load(kernels.Target()))
    x = randn(3, 37, seed=2)
    indices, weights = routing(3, 5, 2, seed=1)
    stacked.path = "fused"
    expected = reference(x, indices, weights).float()
    assert (stacked(x, indices, weights).float() - expected).abs().max() <= 4 * BF16_ULP * expected.abs().amax()


@needs_native
def test_fused_moe_compiles_whole():
    experts = expert_list(8).for_inference(kernels.for_load(kernels.Target()))
    x = randn(2, H, seed=4)
    indices, weights = routing(2, 8, 2, seed=4)
    eager = experts(x, indices, weights)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x, indices, weights), eager)


# --------------------------------------------------------------------------- the model


def onednn_packs_bf16() -> bool:
    """Whether this CPU's oneDNN packs bf16 weights (it refuses without AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT: there the fallback keeps PyTorch's plain linears)."""
    from smoe.kernels.onednn import PackedLinear

    try:
        PackedLinear(torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def generation_logits(model, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """The logits generation computes before each token of `continuation`: the prompt prefilled
    in one chunk, then one decode step per token (as smoe.generate runs them) -> [n, V]."""
    from smoe.cache import KVCache

    n = len(prompt_ids)
    cache = KVCache(model.config, 1, n + len(continuation), dtype=model.dtype, device=model.device)
    with torch.inference_mode():
        rows = [model(torch.tensor([prompt_ids]), torch.arange(n)[None], cache)[0, -1]]
        rows += [model(torch.tensor([[t]]), torch.tensor([[n + i]]), cache)[0, -1] for i, t in enumerate(continuation[:-1])]
    return torch.stack(rows).float()


@needs_native
def test_demo_greedy_tokens_identical_with_and_without_the_kernels(monkeypatch):
    """Greedy generations equal up to the first step where PyTorch's own top two logits are
    exactly tied in bf16 (there greedy decoding itself has no answer: any change in the order of a
    sum picks either token); along PyTorch's tokens, the same argmax at every untied step; logits
    as close to the fp32 model's as PyTorch's bf16 logits are (the kernels sum in another order,
    so their roundings differ, not their accuracy). Decode steps run smoe::decode_layer, the
    attention and head linears the native kernels, the fp32 model PyTorch's."""
    prompts = ["The meaning of life is", "def fibonacci(n):", "Once upon a time", "Question: what is 2 + 2?",
               "import numpy as np", "Der Zug nach Berlin", "El perro come"]
    models, runs = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("SMOE_NATIVE", flag)
        model, tokenizer = smoe.load(dtype="bf16")
        models[flag] = model
        runs[flag] = [smoe.generate(model, tokenizer, p, max_tokens=48, temperature=0).token_ids for p in prompts]
        kinds = {type(model.layers[0].moe.experts.gate_up).__name__, type(model.lm_head).__name__,
                 type(model.decode_plan).__name__}
        fallback = {"PackedLinears", "PackedLinear"} if onednn_packs_bf16() else {"StackedLinear", "Linear"}
        assert kinds == ({"NativeStackedLinear", "NativeLinear", "DecodePlan"} if flag == "1"
                         else fallback | {"NoneType"})
    exact = smoe.load(dtype="fp32", pack=False)[0]
    whole = 0
    for prompt, ours_ids, theirs_ids in zip(prompts, runs["1"], runs["0"], strict=True):
        ids = tokenizer.encode(prompt)
        ours, theirs, fp32 = (generation_logits(m, ids, theirs_ids) for m in (models["1"], models["0"], exact))
        top2 = theirs.topk(2, dim=-1).values
        untied = top2[:, 0] > top2[:, 1]
        first_tie = int((~untied).nonzero()[0, 0]) if not untied.all() else len(theirs_ids)  # either token there
        assert ours_ids[:first_tie] == theirs_ids[:first_tie], prompt
        whole += ours_ids == theirs_ids
        assert torch.equal(ours.argmax(-1)[untied], theirs.argmax(-1)[untied]), prompt
        assert (ours - fp32).abs().mean() <= 1.1 * (theirs - fp32).abs().mean(), prompt
    assert whole >= len(prompts) - 2  # ties are rare: most generations are identical to the end


@needs_native
def test_demo_greedy_tokens_identical_between_the_variants():
    """The demo model's greedy generations (bf16: prefill, then decode steps through
    smoe::decode_layers) under every variant this CPU runs, against the best one's: the same
    tokens up to the first step where some variant's top two logits are within one bf16 step
    of each other (the head rounds logits to bf16, ~0.06 at 10: there the order of a sum picks
    either token), and along the best variant's tokens the same argmax at every other step."""
    prompts = ["The meaning of life is", "def fibonacci(n):", "Once upon a time", "Der Zug nach Berlin",
               "import numpy as np", "El perro come"]
    model, tokenizer = smoe.load(dtype="bf16")
    assert model.decode_plan is not None
    best = ops.variant()
    runs, logits = {}, {}
    try:
        for name in ops.variants():
            ops.select(name)
            runs[name] = [smoe.generate(model, tokenizer, p, max_tokens=40, temperature=0).token_ids for p in prompts]
        for name in ops.variants():
            ops.select(name)
            logits[name] = [generation_logits(model, tokenizer.encode(p), ids) for p, ids in zip(prompts, runs[best], strict=True)]
    finally:
        ops.select(best)
    differing = 0
    for i, prompt in enumerate(prompts):
        near_tie = torch.zeros(len(runs[best][i]), dtype=torch.bool)
        for rows in (v[i] for v in logits.values()):
            top2 = rows.topk(2, dim=-1).values
            near_tie |= top2[:, 0] - top2[:, 1] <= top2[:, 0].abs() * BF16_ULP
        first = int(near_tie.nonzero()[0, 0]) if near_tie.any() else len(near_tie)
        for name in ops.variants():
            assert runs[name][i][:first] == runs[best][i][:first], (name, prompt)
            assert torch.equal(logits[name][i].argmax(-1)[~near_tie], logits[best][i].argmax(-1)[~near_tie])
        differing += any(runs[name][i] != runs[best][i] for name in runs)
    assert differing <= 2  # near ties are rare: most generations are the same to the end in every variant


@pytest.mark.parametrize("compiler,runner,variant_name", [
    ("g++", None, None),  # this CPU's variants against the portable one
    ("aarch64-linux-gnu-g++", ["qemu-aarch64", "-cpu", "max"], "neon"),  # ARM, emulated
], ids=["this-cpu", "aarch64-qemu"])
def test_kernel_selftest(tmp_path, compiler, runner, variant_name):
    """smoe/csrc/selftest.cpp (no torch): each variant against the portable one at awkward
    shapes; for aarch64 cross-compiled and run under qemu (`make neon-selftest` does the same)."""
    import shutil

    missing = [tool for tool in (compiler, *(runner or [])[:1]) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (`make test` installs them where it can)")
    csrc = Path(smoe.__file__).parent / "csrc"
    binary = tmp_path / "selftest"
    subprocess.run([compiler, *SELFTEST_FLAGS, str(csrc / "selftest.cpp"), "-o", str(binary)], check=True,
                   capture_output=True)
    run = subprocess.run([*(runner or []), str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    assert "0 failure(s)" in run.stdout
    if variant_name is not None:
        assert f"{variant_name:10s} ok" in run.stdout, run.stdout
    else:
        assert all(f"{name:10s} ok" in run.stdout for name in ops.variants() if name != "portable"), run.stdout


@needs_native
def test_quantized_demo_model_keeps_its_perplexity_through_the_kernels(variant, monkeypatch):
    """The quality bar of test_quant.py, every token row through the native kernels."""
    from smoe.data import read_jsonl
    from smoe.tokenizer import HFTokenizer
    from smoe.train import heldout_perplexity

    docs = read_jsonl(smoe.DEMO_MODEL / "eval_slice.jsonl")
    tokenizer = HFTokenizer(smoe.DEMO_MODEL / "tokenizer.json")
    reference = heldout_perplexity(smoe.load(dtype="fp32", pack=False)[0], tokenizer, docs, 256, 1024)
    monkeypatch.setattr(ops, "MAX_ROWS", 1 << 30)  # ops.few_rows reads it
    for quant, limit in (("int8", 0.01), ("int4-g32", 0.05)):
        model = smoe.load(dtype="bf16", quant=quant)[0]
        assert type(model.layers[0].moe.experts.gate_up).__name__.startswith("NativeStackedInt")
        ppl = heldout_perplexity(model, tokenizer, docs, 256, 1024)
        for domain, value in ppl.items():
            assert abs(value / reference[domain] - 1) < limit, (quant, domain, value, reference[domain])


def test_fallback_is_pytorch_and_said_once():
    """SMOE_NATIVE=0 (as on a CPU without the instructions, or without a compiler): PyTorch's
    layout, one line on stderr, the same greedy tokens as the default load."""
    code = ("import smoe, torch\n"
            "from smoe.kernels.onednn import PackedLinear\n"
            "m, t = smoe.load(dtype='bf16'); smoe.load(dtype='bf16')\n"
            "print(type(m.lm_head).__name__)\n"
            "print(smoe.generate(m, t, 'Once upon a time', max_tokens=16, temperature=0).token_ids)\n"
            "try:\n"  # whether this CPU's oneDNN packs bf16 weights at all
            "    PackedLinear(torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)); print('PackedLinear')\n"
            "except RuntimeError:\n"
            "    print('Linear')\n")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "SMOE_NATIVE": "0"},
                         check=True)
    assert off.stdout.splitlines()[0] == off.stdout.splitlines()[2]  # oneDNN's layout where it packs bf16
    assert off.stderr.count("native CPU kernels off (SMOE_NATIVE=0)") == 1
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert on.stdout.splitlines()[1] == off.stdout.splitlines()[1]
    if native.available():
        assert on.stdout.splitlines()[0] == "NativeLinear" and "native CPU kernels off" not in on.stderr


@needs_native
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_decode_layer_equals_the_block_it_replaces(variant, checkpoint_factory, quant):
    """smoe::decode_layer (a whole Block per call for decode steps) against the Block's modules
    (the same native linears; RMSNorm, RoPE, attention and router in PyTorch), step by step from
    the same cache, at awkward sizes (H 96, F 160, 6 query / 2 kv heads of 16, 5 experts), four
    rows of different lengths in a rolling buffer (window 8) that has wrapped for some rows and
    not for others: the layer runs once per layer per step, and its logits are no further from
    PyTorch's bf16 ones than those are from the fp32 model's."""
    from smoe.cache import KVCache
    path = checkpoint_factory(seed=3, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                              num_key_value_heads=2, num_local_experts=5, sliding_window=8)
    model = smoe.load(path, dtype="bf16", quant=quant)[0]
    exact = smoe.load(path, dtype="fp32", pack=False, quant=quant)[0]
    assert model.decode_plan is not None  # every layer's parts are the op's
    assert model.kernels.ran["layers", "native", "decode steps"] == len(model.layers)
    lengths = [3, 7, 12, 20]
    B = len(lengths)
    caches = {m: KVCache(m.config, B, 64, dtype=m.dtype) for m in (model, exact)}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b, n in enumerate(lengths):  # each row prefilled alone (T > 1: the modules)
            ids = torch.randint(0, 128, (1, n), generator=gen)
            for m, cache in caches.items():
                m(ids, torch.arange(n)[None], cache.view(b, b + 1))
        cache = caches[model]
        positions = torch.tensor(lengths)[:, None]
        for _ in range(6):
            tokens = torch.randint(0, 128, (B, 1), generator=gen)
            saved = cache.k.clone(), cache.v.clone(), cache.slot_pos.clone()
            with torch.profiler.profile() as prof:
                ours = model(tokens, positions, cache)[:, -1].float()
            assert sum(e.name == "smoe::decode_layers" for e in prof.events()) == 1  # all layers, one call
            written = cache.k.clone(), cache.v.clone()
            for t, s in zip((cache.k, cache.v, cache.slot_pos), saved, strict=True):
                t.copy_(s)
            plan, model.decode_plan = model.decode_plan, None  # the Blocks' modules
            try:
                theirs = model(tokens, positions, cache)[:, -1].float()
            finally:
                model.decode_plan = plan
            reference = exact(tokens, positions, caches[exact])[:, -1]
            for ours_kv, theirs_kv in zip(written, (cache.k, cache.v), strict=True):  # RoPE'd keys, values
                torch.testing.assert_close(ours_kv.float(), theirs_kv.float(), rtol=2 * BF16_ULP, atol=1e-3)
            assert (ours - theirs).abs().max() <= (theirs - reference).abs().max()
            assert (ours - reference).abs().mean() <= 1.1 * (theirs - reference).abs().mean()
            positions = positions + 1


@needs_native
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("lengths", [[3], [3, 7, 12, 20]], ids=["1-row", "4-rows"])
def test_decode_step_equals_the_models_forward(variant, checkpoint_factory, quant, lengths):
    """smoe::decode_step (a whole decode step from token ids: embedding, every layer, final norm,
    head, greedy tokens), through Transformer.decode_step, against the model's forward from the same
    cache: the same logits bit for bit, the same keys, values and slot positions written, and each
    row's greedy token max(-1).indices of its logits. Awkward sizes, a rolling buffer (window 8):
    one row through positions 3..14 (before, at and after it wraps: the plan in Python numbers),
    or four rows of different lengths, wrapped for some and not for others."""
    from smoe.cache import KVCache
    path = checkpoint_factory(seed=3, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                              num_key_value_heads=2, num_local_experts=5, sliding_window=8)
    model = smoe.load(path, dtype="bf16", quant=quant)[0]
    B = len(lengths)
    cache = KVCache(model.config, B, 64, dtype=model.dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b, n in enumerate(lengths):
            model(torch.randint(0, 128, (1, n), generator=gen), torch.arange(n)[None], cache.view(b, b + 1))
        positions = list(lengths)
        for _ in range(12):
            tokens = torch.randint(0, 128, (B,), generator=gen).tolist()
            saved = [t.clone() for t in (cache.k, cache.v, cache.slot_pos)]
            with torch.profiler.profile() as prof:
                logits, best = model.decode_step(tokens, positions, cache)
            assert [e.name for e in prof.events() if e.name.startswith("smoe::")] == ["smoe::decode_step"]
            written = [t.clone() for t in (cache.k, cache.v, cache.slot_pos)]
            for t, s in zip((cache.k, cache.v, cache.slot_pos), saved, strict=True):
                t.copy_(s)
            theirs = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache)[:, -1]
            assert logits.dtype == theirs.dtype and torch.equal(logits, theirs)
            assert torch.equal(best, theirs.float().max(-1).indices)
            for ours_t, theirs_t in zip(written, (cache.k, cache.v, cache.slot_pos), strict=True):
                assert torch.equal(ours_t, theirs_t)
            positions = [p + 1 for p in positions]


@needs_native
def test_decode_steps_greedy_token_is_the_first_largest_logit(checkpoint_factory):
    """decode_step's greedy token where logits tie or are NaN, as max(-1).indices picks it: every
    logit 0 (the first), two equal largest rows (the first of them), a NaN row (the NaN)."""
    from smoe.cache import KVCache
    path = checkpoint_factory(seed=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4)
    model = smoe.load(path, dtype="bf16")[0]
    head = model.lm_head.weight
    assert type(model.lm_head).__name__ == "NativeLinear"
    cache = KVCache(model.config, 1, 32, dtype=model.dtype)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
        for make in ("zeros", "ties", "nan"):
            head.zero_()
            if make == "ties":  # rows 3 and 9 the same, row 4 their opposite: one of those wins, tied or alone
                head[3] = head[9] = 0.5
                head[4] = -0.5
            if make == "nan":
                head[7] = float("nan")
            saved = [t.clone() for t in (cache.k, cache.v, cache.slot_pos)]
            logits, best = model.decode_step([11], [3], cache)
            for t, s in zip((cache.k, cache.v, cache.slot_pos), saved, strict=True):
                t.copy_(s)
            assert torch.equal(best, logits.float().max(-1).indices), make
            assert int(best) == {"zeros": 0, "nan": 7}.get(make, int(best))
            if make == "ties":
                assert int(best) in (3, 4) and logits[0, 3] == logits[0, 9]


@needs_native
def test_decode_step_reads_the_model_again_after_a_part_is_swapped(checkpoint_factory):
    """decode_step keeps its arguments between steps; assigning a module anywhere makes it read
    the model again: a new head (another NativeLinear) is the one the next step multiplies by, a
    layer's part the op does not compute (a plain nn.Linear) sends the step to forward (None),
    and putting the native part back brings the one call back."""
    from smoe.cache import KVCache
    path = checkpoint_factory(seed=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4)
    model = smoe.load(path, dtype="bf16")[0]
    cache = KVCache(model.config, 1, 32, dtype=model.dtype)

    def step(position):
        saved = [t.clone() for t in (cache.k, cache.v, cache.slot_pos)]
        stepped = model.decode_step([9], [position], cache)
        for t, s in zip((cache.k, cache.v, cache.slot_pos), saved, strict=True):
            t.copy_(s)
        theirs = model(torch.tensor([[9]]), torch.tensor([[position]]), cache)[:, -1]
        return stepped, theirs

    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
        (before, _), theirs = step(3)
        assert torch.equal(before, theirs)
        model.lm_head = native.NativeLinear(torch.nn.Linear(64, model.config.vocab_size, bias=False).bfloat16())
        (logits, _), theirs = step(3)
        assert torch.equal(logits, theirs) and not torch.equal(logits, before)
        q_proj = model.layers[1].attn.q_proj
        model.layers[1].attn.q_proj = torch.nn.Linear(64, q_proj.out_features, bias=False).bfloat16()
        stepped, _ = step(5)
        assert stepped is None
        model.layers[1].attn.q_proj = q_proj
        (logits, _), theirs = step(6)
        assert torch.equal(logits, theirs)


@needs_native
def test_decode_steps_run_hooked_layers_as_modules(checkpoint_factory):
    """A decode step of the Engine is one smoe::decode_step call (embedding to greedy tokens),
    unless something hooks a layer or one of its parts: then the layers go one by one, the hooked
    one through its modules (its hook fires) and the others through smoe::decode_layer; a hook on
    the embedding, the final norm, the head or the model: the model's forward (it fires), its
    layers in one smoe::decode_layers call; without the hook, one call again."""
    path = checkpoint_factory(seed=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4)
    model = smoe.load(path, dtype="bf16")[0]
    engine = smoe.Engine(model, None, max_batch_size=1, max_seq_len=64)
    engine.add(list(range(3, 10)), smoe.SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # prefill

    def counts():
        with torch.profiler.profile() as prof:
            engine.step()
        names = [e.name for e in prof.events()]
        return tuple(names.count(f"smoe::{op}") for op in ("decode_step", "decode_layers", "decode_layer"))

    L = len(model.layers)
    assert counts() == (1, 0, 0)
    for hooked, expected in [(model.layers[1], (0, 0, L - 1)), (model.layers[1].moe.router, (0, 0, L - 1)),
                             (model.embed_tokens, (0, 1, 0)), (model.norm, (0, 1, 0)), (model.lm_head, (0, 1, 0)),
                             (model, (0, 1, 0))]:
        calls = []
        handle = hooked.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        try:
            assert counts() == expected
            assert calls == [1]
        finally:
            handle.remove()
        assert counts() == (1, 0, 0)


@needs_native
@pytest.mark.parametrize("rows,hidden", [(1, 96), (3, 37), (16, 1024)])
def test_final_norm_equals_the_module(rows, hidden):
    """smoe::rms_norm (the model's final norm in a decode step, NativeRMSNorm) against the
    RMSNorm module it replaces: fp32 statistics, bf16 roundings in the same places, so equal up
    to the order of the sum of squares — one bf16 rounding at most; more than MAX_ROWS rows take
    the module."""
    from smoe.model import RMSNorm

    gen = torch.Generator().manual_seed(rows)
    module = RMSNorm(hidden, 1e-5).bfloat16()
    module.weight.data = (torch.rand(hidden, generator=gen) + 0.5).bfloat16()
    x = (torch.randn(rows, 1, hidden, generator=gen) * 3).bfloat16()
    native_norm = copy.deepcopy(module)
    native_norm.__class__ = decode.NativeRMSNorm
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ours = native_norm(x)
    assert sum(e.name == "smoe::rms_norm" for e in prof.events()) == 1
    theirs = module(x)
    assert ours.shape == theirs.shape and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=BF16_ULP, atol=0)
    assert (ours == theirs).float().mean() > 0.95
    many = torch.randn(native.MAX_ROWS + 1, hidden, generator=gen).bfloat16()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        assert torch.equal(native_norm(many), module(many))
    assert not any(e.name == "smoe::rms_norm" for e in prof.events())


@needs_native
def test_loaded_model_gets_the_native_final_norm(checkpoint_factory):
    path = checkpoint_factory(seed=5, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4)
    assert type(smoe.load(path, dtype="bf16")[0].norm) is decode.NativeRMSNorm
    assert type(smoe.load(path, dtype="fp32")[0].norm) is not decode.NativeRMSNorm


def _vma_huge_kb(address: int) -> int:
    """AnonHugePages (KiB) of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                begin, end = (int(a, 16) for a in head.split("-"))
                inside = begin <= address < end
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise AssertionError("address not mapped")


def _thp_possible() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_possible(), reason="no transparent huge pages on this system")
def test_huge_page_memory_gets_huge_pages_even_where_the_heap_was_touched():
    from smoe.fsutil import HUGE_PAGE, huge_page_empty

    # glibc raises its mmap threshold to a freed mapping's size (30 MiB) and serves the next
    # blocks below it from its heap: the 24 MiB block is touched, freed, and handed out again
    torch.ones(30 << 20, dtype=torch.uint8)
    torch.ones(24 << 20, dtype=torch.uint8)
    region = huge_page_empty(12 << 20)
    assert region.data_ptr() % HUGE_PAGE == 0 and region.numel() == 12 << 20
    region.fill_(1)
    assert _vma_huge_kb(region.data_ptr()) >= 6 << 10  # at least half of it (the kernel may lack a free 2 MiB block)
    assert int(region.sum()) == 12 << 20


@pytest.mark.skipif(not _thp_possible(), reason="no transparent huge pages on this system")
def test_the_cpu_kv_cache_is_zeroed_huge_page_memory():
    from smoe.cache import KVCache
    from smoe.config import ModelConfig
    from smoe.fsutil import HUGE_PAGE

    config = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    cache = KVCache(config, 2, 4096, dtype=torch.bfloat16)  # 4 layers x 2 rows x 2 heads x 4096 x 16 x 2 B = 2 MiB
    for t in (cache.k, cache.v):
        assert t.data_ptr() % HUGE_PAGE == 0 and t.shape == (4, 2, 2, 4096, 16)
        assert t.dtype == torch.bfloat16 and t.is_contiguous() and not t.any()
        assert _vma_huge_kb(t.data_ptr()) > 0


@needs_native
def test_a_native_layers_decode_tensors_live_in_one_region_in_read_order(checkpoint_factory):
    path = checkpoint_factory(seed=6, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4)
    model = smoe.load(path, dtype="bf16", quant="int4")[0]
    for layer in model.layers:
        assert decode.decode_weights(layer) is not None
        owners = decode.decode_tensor_owners(layer)
        tensors = [getattr(module, name) for module, name in owners]
        storage = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storage) == 1 and tensors[0].untyped_storage().resizable()  # ours: release_mmap keeps it
        addresses = [t.data_ptr() for t in tensors]
        assert addresses == sorted(addresses) and all(a % 64 == 0 for a in addresses)
        # what the op is given is what was packed
        assert {t.data_ptr() for t in decode.decode_weights(layer) if t.numel()} == set(addresses)
