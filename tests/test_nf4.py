"""NF4 against its definition, an independent quantizer, and bitsandbytes where its CPU build runs."""

from __future__ import annotations

import pytest
import torch

from smoe.loader import build_model
from smoe.lora import apply_lora, lora_modules
from smoe.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, nf4_absmax, quantize_model_nf4, quantize_nf4
from smoe.options import LoraSpec

W = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05


def test_levels_are_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) (outermost at
    0.9677), plus an exact zero, scaled into [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    assert torch.allclose(NF4_LEVELS.double(), levels, atol=1e-6)


def test_codes_are_the_nearest_level():
    q = quantize_nf4(W, double_quant=False)
    codes = torch.stack([q["packed"] >> 4, q["packed"] & 15], 1).reshape(-1).long()
    blocks = W.reshape(-1, 64)
    normalized = blocks / blocks.abs().amax(1, keepdim=True)
    nearest = (normalized.reshape(-1, 1) - NF4_LEVELS[None]).abs().argmin(1)  # written independently
    assert torch.equal(codes, nearest)
    restored = dequantize_nf4(q)
    assert restored.shape == W.shape
    assert (restored - W).abs().max() <= blocks.abs().max() * (NF4_LEVELS[-1] - NF4_LEVELS[-2]) / 2 + 1e-7


def test_double_quant_costs_little():
    single, double = quantize_nf4(W, double_quant=False), quantize_nf4(W)
    assert double["absmax_q"].dtype == torch.int8 and len(double["absmax_q"]) == W.numel() // 64
    rel = (nf4_absmax(double) - single["absmax"]).abs() / single["absmax"]
    assert rel.max() < 0.02
    err_single = (dequantize_nf4(single) - W).pow(2).mean()
    err_double = (dequantize_nf4(double) - W).pow(2).mean()
    assert err_double < err_single * 1.05


def test_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(1))
    ours = quantize_nf4(w, double_quant=False)
    theirs, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.allclose(state.code, NF4_LEVELS, atol=1e-7)
    assert torch.allclose(state.absmax, ours["absmax"])
    assert torch.equal(theirs.reshape(-1), ours["packed"])  # same codes, same nibble order
    assert torch.allclose(F.dequantize_4bit(theirs, state), dequantize_nf4(ours), atol=1e-6)
    # with double quantization both formats reconstruct the weight about equally well
    theirs_dq, state_dq = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    err_theirs = (F.dequantize_4bit(theirs_dq, state_dq) - w).pow(2).mean()
    err_ours = (dequantize_nf4(quantize_nf4(w)) - w).pow(2).mean()
    assert err_ours < err_theirs * 1.05


def test_qlora_is_lora_over_nf4(checkpoint_factory):
    path = checkpoint_factory(num_local_experts=4)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    # the reference: a plain model whose weights are replaced by their NF4 round trip
    reference_model = build_model(path)
    with torch.no_grad():
        for name, module in reference_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize_nf4(quantize_nf4(module.weight)))
    reference = reference_model(ids)
    model = build_model(path)
    assert quantize_model_nf4(model) == 2 * (4 + 4 * 3)
    assert isinstance(model.layers[0].moe.experts[3].w2, NF4Linear)
    quantized = model(ids)
    assert (quantized - reference).abs().max() <= 1e-5
    assert (quantized - build_model(path)(ids)).abs().max() > 1e-3  # 4 bits do change the weights
    apply_lora(model, LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "w1", "w2", "w3",)))
    assert torch.equal(model(ids), quantized)  # fresh adapters change nothing
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_modules(model)) == 2 * (2 + 4 * 3)


@pytest.mark.parametrize("autocast", [False, True])
def test_nf4_backward_rebuilds_the_weight(autocast):
    """Gradients through NF4Linear equal those through a plain linear holding the dequantized weight."""
    linear = torch.nn.Linear(128, 64, bias=False)
    nf4 = NF4Linear(linear)
    weight = dequantize_nf4(nf4.quantized())
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = nf4(x)
        y_ref = torch.nn.functional.linear(x_ref, weight)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.float().backward(g)
    y_ref.float().backward(g)
    assert y.dtype == y_ref.dtype and x.grad.dtype == torch.float32
    assert torch.allclose(y.float(), y_ref.float(), atol=1e-5 if not autocast else 1e-2)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5 if not autocast else 2e-2)
