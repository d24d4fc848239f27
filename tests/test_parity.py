"""smoe against transformers' MixtralForCausalLM on the same saved checkpoints."""

from __future__ import annotations

import pytest
import torch

import smoe
from conftest import hf_model

CONFIGS = {
    "gqa1-top2-e4": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2-top2-e8": dict(num_local_experts=8),
    "gqa4-top1-e8": dict(num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=1),
    "top4-e16": dict(num_local_experts=16, num_experts_per_tok=4),
    "head_dim16": dict(head_dim=16),  # hidden 32 / 4 heads would be 8
    "window5": dict(sliding_window=5),
    "window7-gqa4-e8": dict(num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, sliding_window=7),
    "tied-3layers": dict(tie_word_embeddings=True, num_hidden_layers=3),
}


def prompt(seed: int, length: int, vocab: int = 128) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_fp32(checkpoint_factory, name):
    path = checkpoint_factory(**CONFIGS[name])
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(path).eval()
    model, tokenizer = smoe.load(path)
    assert tokenizer is None and model.dtype == torch.float32
    ids = torch.tensor([prompt(1, 20), prompt(2, 20)])
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(ids)
    assert got.shape == (2, 20, 128)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_transformers(checkpoint_factory, name):
    path = checkpoint_factory(**CONFIGS[name])
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(path).eval()
    model, _ = smoe.load(path)
    ids = prompt(3, 12)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None)
    expected = out[0, len(ids):].tolist()
    result = smoe.generate(model, None, ids, max_tokens=48, ignore_eos=True)
    assert result.token_ids == expected
    assert len(expected) == 48  # with a window of 5 or 7, 12 + 48 tokens wrap the rolling cache many times


@pytest.mark.parametrize("dtype,ulps", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_half_precision_close_to_transformers(checkpoint_factory, dtype, ulps):
    """Same dtype, same operations: logits agree to about one unit in the last place."""
    path = checkpoint_factory(dtype=dtype, sliding_window=6)
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model, _ = smoe.load(path)
    assert model.dtype == dtype  # the checkpoint's own dtype by default
    ids = torch.tensor([prompt(4, 20)])
    with torch.no_grad():
        expected = hf(ids).logits.float()
        out = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
    got = model(ids).float()
    assert (got - expected).abs().max().item() <= ulps * expected.abs().max().item() * 2
    result = smoe.generate(model, None, ids[0].tolist(), max_tokens=32, ignore_eos=True)
    assert result.token_ids == out[0, 20:].tolist()


def test_load_converts_dtype(checkpoint_factory):
    path = checkpoint_factory()
    model, _ = smoe.load(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = hf_model(0).to(torch.bfloat16)
    ids = torch.tensor([prompt(5, 10)])
    with torch.no_grad():
        assert torch.equal(model(ids).argmax(-1), ref(ids).logits.argmax(-1))


@pytest.mark.parametrize("name", ["gqa2-top2-e8", "window5"])
def test_batched_generation_equals_each_prompt_alone(checkpoint_factory, name):
    path = checkpoint_factory(**CONFIGS[name])
    model, _ = smoe.load(path)
    prompts = [prompt(10, 3), prompt(11, 17), prompt(12, 9)]
    batched = smoe.generate(model, None, prompts, max_tokens=24, ignore_eos=True)
    for p, got in zip(prompts, batched, strict=True):
        alone = smoe.generate(model, None, p, max_tokens=24, ignore_eos=True)
        assert got.token_ids == alone.token_ids
        assert got.prompt_tokens == len(p)


@pytest.mark.parametrize("window,chunk", [(None, 4), (5, 3), (5, 8), (4, 64)])
def test_cached_decode_equals_uncached_recompute(checkpoint_factory, window, chunk):
    """Chunked prefill into the (rolling) cache, then one token at a time, against a full
    forward over the whole sequence with no cache."""
    from smoe.cache import KVCache

    path = checkpoint_factory(sliding_window=window)
    model, _ = smoe.load(path)
    ids = torch.tensor([prompt(20, 30)])  # [1, 30]
    cache = KVCache(model.config, 1, 64, dtype=model.dtype)
    pieces = []
    with torch.no_grad():
        for start in range(0, 20, chunk):  # prefill 20 tokens in chunks
            stop = min(start + chunk, 20)
            pieces.append(model(ids[:, start:stop], torch.arange(start, stop)[None], cache))
        for t in range(20, 30):  # decode the other 10 one by one
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache))
        full = model(ids)
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5
    if window is not None:
        assert cache.k.shape[3] == window  # the rolling buffer holds only the window


def test_rolling_cache_memory_is_bounded(checkpoint_factory):
    from smoe.generate import Engine

    path = checkpoint_factory(sliding_window=5)
    model, _ = smoe.load(path)
    engine = Engine(model, max_seq_len=256)
    assert engine.cache.k.shape[3] == 5
    no_window = Engine(smoe.load(checkpoint_factory())[0], max_seq_len=256)
    assert no_window.cache.nbytes == engine.cache.nbytes * 256 // 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(checkpoint_factory):
    path = checkpoint_factory(**CONFIGS["window5"])
    cpu, _ = smoe.load(path)
    gpu, _ = smoe.load(path, device="cuda")
    ids = torch.tensor([prompt(6, 20)])
    assert (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max().item() <= 1e-3
    a = smoe.generate(cpu, None, ids[0].tolist(), max_tokens=32, ignore_eos=True)
    b = smoe.generate(gpu, None, ids[0].tolist(), max_tokens=32, ignore_eos=True)
    assert a.token_ids == b.token_ids
