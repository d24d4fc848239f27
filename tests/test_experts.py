"""Every experts implementation computes what the reference per-expert loop computes, on
random routings (experts that get no token, K = 1..4, E up to 16), and the few-token path
of stacked experts compiles whole (no host synchronisation)."""

from __future__ import annotations

import copy

import pytest
import torch

import smoe
from smoe import kernels
from smoe.experts import Expert, ExpertList, StackedExperts
from smoe.options import QuantSpec
from smoe.quantize import quantize_expert

H, F = 64, 96


def expert_list(num_experts: int, dtype: torch.dtype, seed: int = 0) -> ExpertList:
    torch.manual_seed(seed)
    experts = ExpertList(Expert(H, F) for _ in range(num_experts))
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return experts.to(dtype).requires_grad_(False)


def routing(tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_indices [N, K] (distinct per row) and renormalised fp32 weights [N, K]."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g) + 0.05
    return indices, weights / weights.sum(-1, keepdim=True)


def implementations(reference: ExpertList) -> dict[str, torch.nn.Module]:
    """Every implementation built from the reference's weights, with its path pinned."""
    out = {}
    sorted_list = copy.deepcopy(reference)
    sorted_list.sorted_dispatch = True
    out["list-sorted"] = sorted_list
    for pack in (False, True):
        for path in ("gather", "sorted"):
            stacked = copy.deepcopy(reference).for_inference(kernels.for_load(kernels.Target()) if pack else kernels.PLAIN)
            assert isinstance(stacked, StackedExperts)
            if path == "gather" and not hasattr(stacked.gate_up, "gathered"):
                continue  # oneDNN-packed experts run on the CPU only, read on the host
            stacked.path = path
            out[f"stacked-{'packed' if pack else 'plain'}-{path}"] = stacked
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (8, 3), (16, 4)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 37])
def test_every_implementation_equals_the_reference_loop(dtype, num_experts, top_k, tokens):
    reference = expert_list(num_experts, dtype)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    indices, weights = routing(tokens, num_experts, top_k, seed=tokens * 31 + num_experts)
    expected = reference(x, indices, weights)
    # same products, same fp32 weighting, same order of addition: equal to the rounding of the matmuls
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, experts in implementations(reference).items():
        got = experts(x, indices, weights)
        assert got.dtype == dtype and got.shape == (tokens, H)
        assert torch.allclose(got, expected, rtol=tol, atol=tol), name


@pytest.mark.capability
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32)])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_stacked_quantized_experts_equal_their_list(spec, tokens, monkeypatch):
    """int8 / int4 stacked (gate and up concatenated through their codes) against the list of
    quantized experts; F = 96 is not a multiple of aten's int4 kernel's 64-row blocks. PyTorch's
    kinds: the stored format stacked (pack=False) and aten's kernels' layouts for this CPU
    (pack=True); the native kernels' kinds quantize activations too: tests/test_native.py."""
    monkeypatch.setenv("SMOE_NATIVE", "0")
    reference = expert_list(8, torch.bfloat16).map_experts(lambda e: quantize_expert(e, spec))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2)).bfloat16()
    indices, weights = routing(tokens, 8, 2, seed=tokens)
    expected = reference(x, indices, weights)
    for pack in (False, True):
        stacked = copy.deepcopy(reference).for_inference(kernels.for_load(kernels.Target()) if pack else kernels.PLAIN)
        for path in ("gather", "sorted") if stacked.can_gather else ("sorted",):
            stacked.path = path
            assert torch.allclose(stacked(x, indices, weights), expected, rtol=1e-2, atol=1e-2), (pack, path)
        if pack == (spec.bits == 8):  # the CPU path: the same kernels on the same rows, so the same numbers
            stacked.path = "auto"
            assert torch.equal(stacked(x, indices, weights), expected)


def test_all_tokens_on_one_expert_and_experts_without_tokens():
    reference = expert_list(8, torch.float32)
    x = torch.rand(9, H) + 0.1
    indices = torch.tensor([[3, 5]] * 9)
    weights = torch.full((9, 2), 0.5)
    expected = reference(x, indices, weights)
    for name, experts in implementations(reference).items():
        assert torch.allclose(experts(x, indices, weights), expected, atol=1e-6), name


def test_lora_experts_stay_a_list_read_on_the_host(checkpoint_factory, tmp_path):
    from smoe.lora import apply_lora, save_adapter
    from smoe.options import LoraSpec

    path = checkpoint_factory(num_local_experts=8)
    model, _ = smoe.load(path, pack=False)
    apply_lora(model, LoraSpec(rank=2, targets=("w1", "q_proj")))
    for m in model.modules():  # a non-zero update, so the adapter changes the outputs
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, 0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    adapted, _ = smoe.load(path, adapter=tmp_path / "adapter")
    experts = adapted.layers[0].moe.experts
    assert isinstance(experts, ExpertList) and experts.sorted_dispatch
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (adapted(ids) - model(ids)).abs().max().item() <= 1e-5


def test_inference_layout_agrees_with_the_plain_model(checkpoint_factory):
    """The CPU fast path (stacked experts, oneDNN-packed weights) against the plain model."""
    from smoe.kernels import in_inference_layout as is_packed
    from smoe.kernels.onednn import PackedLinear, PackedLinears

    path = checkpoint_factory(num_local_experts=8, sliding_window=5)
    plain, _ = smoe.load(path, pack=False)
    packed, _ = smoe.load(path)  # the inference layout by default
    assert isinstance(plain.layers[0].moe.experts, ExpertList) and not is_packed(plain)
    experts = packed.layers[0].moe.experts
    assert isinstance(experts, StackedExperts) and is_packed(packed)
    if torch.backends.mkldnn.is_available():
        assert isinstance(experts.gate_up, PackedLinears)  # w1 and w3 packed as one [2F, H] matrix per expert
        assert isinstance(packed.layers[0].attn.q_proj, PackedLinear)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    assert (packed(ids) - plain(ids)).abs().max().item() <= 1e-5
    assert (packed(ids[:, :1]) - plain(ids[:, :1])).abs().max().item() <= 1e-5
    a = smoe.generate(plain, None, ids[0].tolist(), max_tokens=30, ignore_eos=True)
    b = smoe.generate(packed, None, ids[0].tolist(), max_tokens=30, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_packed_model_refuses_to_save(checkpoint_factory, tmp_path):
    from smoe.checkpoint import save_checkpoint
    from smoe.errors import CheckpointError

    model, _ = smoe.load(checkpoint_factory())
    with pytest.raises(CheckpointError, match="load it with pack=False to save"):
        save_checkpoint(model, tmp_path)


@pytest.mark.parametrize("pack", [True, False])
def test_moe_layer_compiles_whole(pack):
    """torch.compile(fullgraph=True) of a whole MoE layer of the demo model: the default layout
    (native kinds or oneDNN-packed experts, read on the host inside one custom op; on a CPU where
    oneDNN packs no bf16 — no AVX-512 — plain stacked experts, which the graph gathers) and the
    stacked plain layout on its gather path, which would break the graph on any host
    synchronisation. A gathered bf16 graph keeps its fused intermediates in fp32 where eager
    rounds each op to bf16 (outputs apart by a bf16 step or two, seen on an AVX2 CPU), so in bf16
    both are held to the layer in fp32: the compiled one no further from it than eager is."""
    model, _ = smoe.load(pack=pack, dtype=None if pack else "fp32")
    moe = model.layers[0].moe
    if not pack:
        moe.experts = moe.experts.for_inference(kernels.PLAIN)
        moe.experts.path = "gather"
    exact = smoe.load(dtype="fp32", pack=False)[0].layers[0].moe
    compiled = torch.compile(moe, fullgraph=True)
    hidden = model.config.hidden_size
    for batch in (1, 4):
        x = torch.randn(batch, 1, hidden, generator=torch.Generator().manual_seed(batch)).to(model.dtype)
        with torch.no_grad():
            expected, got, fp32 = moe(x).float(), compiled(x).float(), exact(x.float())
        assert got.shape == (batch, 1, hidden)
        if model.dtype == torch.bfloat16:
            assert (got - fp32).abs().mean() <= 1.1 * (expected - fp32).abs().mean(), batch
            assert (got - fp32).abs().max() <= 2 * (expected - fp32).abs().max(), batch
        else:
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), batch


def test_a_copy_of_stacked_experts_is_found_by_its_own_name():
    """The compiled path finds its module by name: a copy must not run the original's weights."""
    stacked = expert_list(4, torch.float32).for_inference(kernels.PLAIN)
    clone = copy.deepcopy(stacked)
    assert clone.name != stacked.name
    clone.down.weight.data.zero_()  # the clone's weights are its own
    x = torch.randn(3, H)
    indices, weights = routing(3, 4, 2, seed=9)
    assert torch.equal(torch.ops.smoe.experts_sorted(x, indices, weights, clone.name), torch.zeros(3, H))
    assert torch.equal(torch.ops.smoe.experts_sorted(x, indices, weights, stacked.name), stacked(x, indices, weights))


def test_offloaded_experts_equal_the_reference_loop(checkpoint_factory):
    path = checkpoint_factory(num_local_experts=8)
    plain, _ = smoe.load(path, pack=False)
    for pack in (False, True):
        offloaded, _ = smoe.load(path, pack=pack, max_memory=3 * 3 * 32 * 48 * 4, prefetch=False)
        for tokens in (1, 6):
            x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens))
            indices, weights = routing(tokens, 8, 2, seed=tokens)
            for layer in range(2):
                expected = plain.layers[layer].moe.experts(x, indices, weights)
                got = offloaded.layers[layer].moe.experts(x, indices, weights)
                assert torch.allclose(got, expected, atol=1e-6), (pack, tokens, layer)
