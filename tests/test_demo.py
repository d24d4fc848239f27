"""The bundled demo model: loads unchanged in transformers, and is as good as its card says."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

import smoe
from smoe.data import read_jsonl
from smoe.train import heldout_perplexity

DEMO = smoe.DEMO_MODEL
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model is not bundled")


def test_demo_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "eval_slice.jsonl", "eval.json"):
        assert (DEMO / name).exists(), name
    assert (DEMO / "model.safetensors").stat().st_size <= 40 * 10**6
    config = smoe.ModelConfig.from_dir(DEMO)
    assert config.num_local_experts == 8 and config.num_experts_per_tok == 2
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.sliding_window < config.max_position_embeddings  # the rolling cache is exercised


def test_transformers_loads_the_demo_unchanged():
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(DEMO / "tokenizer.json"))
    model, tok = smoe.load(dtype="fp32")
    text = "Der frühe Vogel fängt den Wurm.\ndef f(x):\n    return x + 1  # 日本"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, bos=False)
    assert hf_tok.decode(tok.encode(text, bos=False)) == text
    hf = MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_heldout_perplexity_matches_the_card_and_beats_unigram():
    model, tok = smoe.load()  # as shipped: bf16
    card = json.loads((DEMO / "eval.json").read_text())["slice"]
    docs = read_jsonl(DEMO / "eval_slice.jsonl")
    got = heldout_perplexity(model, tok, docs, card["seq_len"], card["tokens_per_domain"])
    assert set(got) == {"en", "de", "it", "es", "python"}
    readme = (DEMO / "README.md").read_text()
    for domain, ppl in got.items():
        assert ppl == pytest.approx(card["perplexity"][domain], rel=0.01)
        assert f"| {domain} | {card['perplexity'][domain]:.2f} |" in readme
        # unigram baseline of the same tokenizer on the same tokens, computed here
        tokens = [t for d in docs if d["domain"] == domain for t in [tok.bos_id, *tok.encode(d["text"], bos=False), tok.eos_id]]
        tokens = tokens[1 : card["tokens_per_domain"] + 1]
        counts = Counter(tokens)
        unigram = math.exp(-sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values()))
        assert ppl < unigram / 3, (domain, ppl, unigram)


def test_default_model_everywhere():
    model, tok = smoe.load()
    assert tok is not None and model.config.vocab_size == tok.vocab_size
    r = smoe.generate(model, tok, "The meaning of life is", max_tokens=200, ignore_eos=True)
    assert len(r.token_ids) == 200  # 6 + 200 tokens > sliding window: the rolling cache wraps
    out = subprocess.run([sys.executable, "-m", "smoe.cli", "generate", "--prompt", "Hello", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("Hello") and "tokens/s" in out.stderr
    chat = subprocess.run([sys.executable, "-m", "smoe.cli", "chat", "--max-tokens", "8"], input="Hi\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "tokens/s" in chat.stderr
