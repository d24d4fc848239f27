"""Training: the load-balancing loss against transformers, and resume retracing an uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from smoe.errors import SmoeError
from smoe.train import TrainConfig, load_balancing_loss, lr_at, train

WORDS = "the cat sat on a mat and dog ran far away while birds sang loud songs of old".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny two-domain corpus and a byte-level BPE tokenizer trained on it."""
    from smoe.data import train_tokenizer, write_jsonl

    rng = random.Random(0)
    prose = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(300)]
    code = [f"def f{i}(x):\n    return x * {rng.randint(0, 99)} + {rng.randint(0, 9)}\n" for i in range(300)]
    docs = [{"domain": "prose", "text": t} for t in prose] + [{"domain": "code", "text": t} for t in code]
    path = tmp_path_factory.mktemp("corpus")
    write_jsonl(path / "train.jsonl", docs[::2] + docs[1::2][:-40])
    write_jsonl(path / "heldout.jsonl", docs[1::2][-40:] + docs[1::2][:20])
    train_tokenizer((d["text"] for d in docs), 300, path / "tokenizer.json")
    return path


def tiny_config(corpus, out, **overrides) -> TrainConfig:
    model = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                 sliding_window=16, vocab_size=300)
    return TrainConfig(**{
        "out": str(out), "model": model, "train_data": str(corpus / "train.jsonl"),
        "heldout_data": str(corpus / "heldout.jsonl"), "tokenizer": str(corpus / "tokenizer.json"),
        "seq_len": 32, "batch_size": 4, "max_steps": 12, "warmup_steps": 3, "lr": 3e-3, "log_every": 1,
        "eval_every": 6, "eval_tokens": 256, "save_every": 4, "z_loss_coef": 1e-3, **overrides,
    })


@pytest.mark.parametrize("top_k,masked", [(1, False), (2, False), (2, True), (3, True)])
def test_aux_loss_equals_transformers(top_k, masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(top_k)
    B, T, E, L = 3, 7, 8, 4
    logits = tuple(torch.randn(B * T, E, generator=g) * 2 for _ in range(L))
    mask = (torch.rand(B, T, generator=g) > 0.3).long() if masked else None
    expected = load_balancing_loss_func(logits, E, top_k, mask)
    got = load_balancing_loss(list(logits), top_k, None if mask is None else mask.reshape(-1))
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_per_layer_aux_loss_is_the_mean_of_transformers_per_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(20, 8, generator=g) for _ in range(3)]
    expected = torch.stack([load_balancing_loss_func((r,), 8, 2) for r in logits]).mean()
    assert torch.allclose(load_balancing_loss(logits, 2, per_layer=True), expected)
    # two layers collapsed onto different experts look balanced when pooled, not per layer
    collapsed = [torch.full((10, 2), -9.0).index_fill(1, torch.tensor([i]), 9.0) for i in (0, 1)]
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(1.0, abs=1e-3)
    assert load_balancing_loss(collapsed, 1, per_layer=True).item() == pytest.approx(2.0, abs=1e-3)


def test_aux_loss_is_one_when_balanced():
    # every expert equally likely and equally chosen: E * sum_e (1/E * 1/E) = 1
    logits = [torch.zeros(8, 4)]
    logits[0][torch.arange(8), torch.arange(8) % 4] = 1e-3
    assert abs(load_balancing_loss(logits, 1).item() - 1.0) < 1e-3


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(out="x", model={}, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_checkpoints(corpus, tmp_path):
    summary = train(tiny_config(corpus, tmp_path / "run", max_steps=30, save_every=10), progress=False)
    losses = [h["ce"] for h in summary["history"] if "ce" in h]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "ckpt-0000030"
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000020", "ckpt-0000030"]  # keeps the last 2
    assert (run / "loss.png").stat().st_size > 1000
    assert not list(run.glob(".*tmp*"))  # no half-written checkpoint left behind
    evals = [h for h in summary["history"] if "eval" in h]
    assert set(evals[-1]["eval"]) == {"prose", "code"}


def test_resume_retraces_an_uninterrupted_run(corpus, tmp_path):
    full = train(tiny_config(corpus, tmp_path / "full", router_jitter=0.05), progress=False)
    train(tiny_config(corpus, tmp_path / "split", router_jitter=0.05), progress=False, stop_after=6)
    resumed = train(tiny_config(corpus, tmp_path / "split", router_jitter=0.05), resume=True, progress=False)
    a = [h for h in full["history"] if "ce" in h]
    b = [h for h in resumed["history"] if "ce" in h]
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert x["ce"] == pytest.approx(y["ce"], abs=1e-4) and x["aux"] == pytest.approx(y["aux"], abs=1e-4)
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_bad_train_configs(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"out": "x", "model": {}, "learning_rate": 1}))
    with pytest.raises(SmoeError, match="unknown field 'learning_rate'"):
        TrainConfig.from_file(path)
    path.write_text(json.dumps({"out": "x"}))
    with pytest.raises(SmoeError, match="exactly one of 'model'"):
        TrainConfig.from_file(path)
    path.write_text("{")
    with pytest.raises(SmoeError, match="not valid JSON"):
        TrainConfig.from_file(path)


def test_gradient_accumulation_equals_the_larger_batch(corpus, tmp_path):
    """Micro-batches of 2 accumulated twice see the same rows as batches of 4 (the data order is
    slot-based), so without the (batch-nonlinear) aux losses the updates agree."""
    common = {"max_steps": 3, "autocast": "none", "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "eval_every": 100,
              "save_every": 100}
    big = train(tiny_config(corpus, tmp_path / "big", batch_size=4, grad_accum=1, **common), progress=False)
    acc = train(tiny_config(corpus, tmp_path / "acc", batch_size=2, grad_accum=2, **common), progress=False)
    for a, b in zip([h for h in big["history"] if "ce" in h], [h for h in acc["history"] if "ce" in h], strict=True):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-5)
    for p, q in zip(big["model"].parameters(), acc["model"].parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_continue_training_from_a_checkpoint(corpus, tmp_path):
    first = train(tiny_config(corpus, tmp_path / "a", max_steps=20, save_every=20), progress=False)
    cfg = tiny_config(corpus, tmp_path / "b", max_steps=5, warmup_steps=1)
    cfg.model, cfg.init_from = None, str(tmp_path / "a" / "ckpt-0000020")
    second = train(cfg, progress=False)
    start = [h["ce"] for h in second["history"] if "ce" in h][0]
    scratch = [h["ce"] for h in first["history"] if "ce" in h][0]
    assert start < scratch - 1.0  # it starts where the first run ended, not from random weights
