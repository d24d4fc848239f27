"""LoRA adapters: peft reads what smoe writes; merge == unmerged; only adapters get gradients."""

from __future__ import annotations

import pytest
import torch

from smoe.errors import SmoeError
from smoe.loader import build_model
from smoe.lora import apply_lora, load_adapter, lora_modules, merge_lora, save_adapter, unmerge_lora
from smoe.options import LoraSpec

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_peft_loads_smoe_attention_adapter(checkpoint_factory, tmp_path):
    pytest.importorskip("peft")
    from conftest import peft_logits

    path = checkpoint_factory(num_local_experts=4, sliding_window=6)
    model = build_model(path)
    apply_lora(model, LoraSpec(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",)))
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(path))
    expected, plain = peft_logits(path, tmp_path / "adapter", IDS)
    got = model(IDS)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (expected - plain).abs().max().item() > 1e-2  # the adapter does change the output
    reloaded = build_model(path)
    load_adapter(reloaded, tmp_path / "adapter")
    assert torch.equal(reloaded(IDS), got)


def test_fresh_adapter_is_identity_and_merge_matches(checkpoint_factory):
    path = checkpoint_factory()
    base = build_model(path)(IDS)
    model = build_model(path)
    wrapped = apply_lora(model, LoraSpec(rank=2, alpha=4, targets=("q_proj", "v_proj", "w1", "w2", "w3",)))
    assert len(wrapped) == 2 * (2 + 4 * 3)
    assert torch.equal(model(IDS), base)  # B = 0
    randomize_b(model)
    unmerged = model(IDS)
    merge_lora(model)
    assert (model(IDS) - unmerged).abs().max().item() <= 1e-5
    unmerge_lora(model)
    assert (model(IDS) - unmerged).abs().max().item() <= 1e-5


def test_gradients_reach_only_adapters(checkpoint_factory):
    model = build_model(checkpoint_factory())
    apply_lora(model, LoraSpec(rank=2, alpha=2, targets=("q_proj", "o_proj", "w2",)))
    randomize_b(model)
    model.train()
    model(IDS).float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_bad_targets():
    with pytest.raises(SmoeError, match="unknown LoRA target"):
        from smoe.config import ModelConfig
        from smoe.model import Transformer

        model = Transformer(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                        num_experts_per_tok=1))
        apply_lora(model, LoraSpec(targets=("gate_proj",)))


def test_load_and_generate_with_adapter(checkpoint_factory, tmp_path):
    import json
    import subprocess
    import sys

    import smoe

    path = checkpoint_factory()
    model = build_model(path)
    apply_lora(model, LoraSpec(rank=2, alpha=4, targets=("q_proj", "w1",)))
    randomize_b(model, seed=3)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["smoe_expert_targets"] == ["w1"] and config["target_modules"] == ["q_proj"]  # peft places q_proj
    packed, _ = smoe.load(path, adapter=tmp_path / "a")  # adapters over packed linears, for inference
    assert (packed(IDS) - model(IDS)).abs().max().item() <= 1e-5
    expected = smoe.generate(model, None, [5, 6, 7], max_tokens=6, ignore_eos=True).token_ids
    out = subprocess.run([sys.executable, "-m", "smoe.cli", "generate", "--model", str(path), "--adapter",
                          str(tmp_path / "a"), "--prompt-ids", "5,6,7", "--max-tokens", "6", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == expected
    bad = subprocess.run([sys.executable, "-m", "smoe.cli", "generate", "--model", str(path), "--adapter",
                          str(tmp_path), "--prompt-ids", "5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr


def test_lora_merge_cli_writes_an_equivalent_checkpoint(checkpoint_factory, tmp_path):
    import subprocess
    import sys

    path = checkpoint_factory(num_local_experts=4)
    model = build_model(path)
    apply_lora(model, LoraSpec(rank=3, alpha=6, targets=("k_proj", "o_proj", "w3",)))
    randomize_b(model, seed=4)
    save_adapter(model, tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "smoe.cli", "lora", "merge", "--model", str(path), "--adapter",
                          str(tmp_path / "a"), "--out", str(tmp_path / "merged")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    merged = build_model(tmp_path / "merged")
    assert not lora_modules(merged)
    assert (merged(IDS) - model(IDS)).abs().max().item() <= 1e-5
    again = subprocess.run([sys.executable, "-m", "smoe.cli", "lora", "merge", "--model", str(path), "--adapter",
                            str(tmp_path / "a"), "--out", str(tmp_path / "merged")], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "not an empty directory" in again.stderr
