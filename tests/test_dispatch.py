"""Every expert dispatch computes what the reference per-expert loop computes."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.config import ModelConfig
from smoe.model import DISPATCH, MoE


def moe_layer(experts: int, top_k: int, dtype: torch.dtype) -> MoE:
    config = ModelConfig(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=top_k,
    )
    torch.manual_seed(0)
    layer = MoE(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return layer.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (16, 4)])
@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_dispatch_agrees_with_reference_loop(dtype, experts, top_k, tokens):
    layer = moe_layer(experts, top_k, dtype)
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer.dispatch = "loop"
    with torch.no_grad():
        reference = layer(x)
        for name in [*DISPATCH, "auto"]:
            layer.dispatch = name
            got = layer(x)
            # same products, same fp32 weighting, same order of addition: equal to rounding of the GEMM
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert torch.allclose(got, reference, rtol=tol, atol=tol), name


def test_grouped_path_skips_unused_experts_and_handles_all_on_one():
    layer = moe_layer(8, 2, torch.float32)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 5.0  # pushes every token to expert 3 first
        x = torch.rand(1, 9, 64) + 0.1
        layer.dispatch = "loop"
        reference = layer(x)
        layer.dispatch = "grouped"
        assert torch.allclose(layer(x), reference, atol=1e-6)


def test_whole_model_dispatches_agree(checkpoint_factory):
    model, _ = smoe.load(checkpoint_factory(num_local_experts=8))
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for name in [*DISPATCH, "auto"]:
        model.set_dispatch(name)
        outputs[name] = model(ids)
    for name, out in outputs.items():
        assert (out - outputs["loop"]).abs().max().item() <= 1e-5, name
    with pytest.raises(ValueError, match="unknown dispatch"):
        model.set_dispatch("fastest")


def test_packed_linears_agree_with_plain(checkpoint_factory):
    """The CPU fast path (oneDNN-packed weights) against plain F.linear, whole model."""
    from smoe.model import FusedExpert
    from smoe.packing import PackedLinear, is_packed

    path = checkpoint_factory(num_local_experts=8, sliding_window=5)
    plain, _ = smoe.load(path, pack=False)
    packed, _ = smoe.load(path)  # packs on CPU by default
    if not is_packed(packed):
        pytest.skip("oneDNN packing is not available in this torch build")
    assert isinstance(packed.layers[0].moe.experts[0], FusedExpert)  # w1 and w3 packed as one matrix
    assert isinstance(packed.layers[0].moe.experts[0].w13, PackedLinear)
    assert isinstance(packed.layers[0].attn.q_proj, PackedLinear)
    assert not is_packed(plain)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    assert (packed(ids) - plain(ids)).abs().max().item() <= 1e-5
    for dispatch in ("loop", "grouped", "token"):  # every dispatch calls packed experts the same way
        packed.set_dispatch(dispatch)
        plain.set_dispatch(dispatch)
        assert (packed(ids[:, :1]) - plain(ids[:, :1])).abs().max().item() <= 1e-5
    packed.set_dispatch("auto")
    a = smoe.generate(plain, None, ids[0].tolist(), max_tokens=30, ignore_eos=True)
    b = smoe.generate(packed, None, ids[0].tolist(), max_tokens=30, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_packed_model_refuses_to_save(checkpoint_factory, tmp_path):
    from smoe.checkpoint import save_checkpoint
    from smoe.errors import CheckpointError
    from smoe.packing import is_packed

    model, _ = smoe.load(checkpoint_factory())
    if not is_packed(model):
        pytest.skip("oneDNN packing is not available in this torch build")
    with pytest.raises(CheckpointError, match="load it with pack=False to save"):
        save_checkpoint(model, tmp_path)
