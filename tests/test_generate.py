"""The engine: sampling against transformers' processors, seeds, stops, streaming, scheduling."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.errors import GenerationError
from smoe.generate import Engine
from smoe.sampling import SamplingParams, apply_repetition_penalty, filter_logits


@pytest.fixture(scope="module")
def chat_model(chat_checkpoint):
    return smoe.load(chat_checkpoint)


def hf_filtered(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits[None].clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores[0]


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.3, min_p=0.1), dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, top_p=0.3),
])
def test_filters_match_transformers_warpers(kw):
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(500) * 3
        ours = filter_logits(logits, SamplingParams(**kw))
        theirs = hf_filtered(logits, **kw)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        kept = ~torch.isinf(ours)
        assert torch.allclose(ours[kept], theirs[kept])


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(100)
    context = torch.tensor([3, 7, 7, 50, 99])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(context[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, context, 1.3), expected)


def test_greedy_with_repetition_penalty_matches_transformers(checkpoint_factory):
    from transformers import MixtralForCausalLM

    path = checkpoint_factory()
    hf = MixtralForCausalLM.from_pretrained(path).eval()
    model, _ = smoe.load(path)
    ids = list(range(5, 15))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.5,
                          eos_token_id=None)
    got = smoe.generate(model, None, ids, max_tokens=30, repetition_penalty=1.5, ignore_eos=True)
    assert got.token_ids == out[0, 10:].tolist()


def test_same_seed_same_output_and_seeds_differ(chat_model):
    model, tok = chat_model
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = smoe.generate(model, tok, "Once upon a time", seed=42, **kw)
    b = smoe.generate(model, tok, "Once upon a time", seed=42, **kw)
    c = smoe.generate(model, tok, "Once upon a time", seed=43, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_stop_strings_cut_the_text(chat_model):
    model, tok = chat_model
    full = smoe.generate(model, tok, "The weather today", max_tokens=40, ignore_eos=True)
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    prompt = tok.encode("The weather today")
    assert full.text == tok.decode(prompt + full.token_ids)[len(tok.decode(prompt)):]
    assert full.text.startswith(" ") == tok.id_to_piece(full.token_ids[0]).startswith("▁")
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = smoe.generate(model, tok, "The weather today", max_tokens=40, ignore_eos=True, stop=[stop, "never-there"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = list(smoe.stream_generate(model, tok, "The weather today", max_tokens=40, ignore_eos=True, stop=stop))
    assert "".join(p.text for p in streamed[:-1]) == cut.text and streamed[-1].text == cut.text


def test_stop_token_ids_and_eos(chat_model):
    model, tok = chat_model
    full = smoe.generate(model, tok, "Numbers:", max_tokens=30, ignore_eos=True)
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    got = smoe.generate(model, tok, "Numbers:", max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    assert got.token_ids == full.token_ids[: first + 1] and got.finish_reason == "stop"
    prompt = tok.encode("Numbers:")
    assert got.text == tok.decode(prompt + full.token_ids[:first])[len(tok.decode(prompt)):]


def test_streaming_pieces_add_up_to_the_text(chat_model):
    model, tok = chat_model
    items = list(smoe.stream_generate(model, tok, "Grüße aus 日本", max_tokens=32, ignore_eos=True, seed=1,
                                      temperature=0.8))
    result = items[-1]
    assert isinstance(result, smoe.GenerationResult)
    prompt = tok.encode("Grüße aus 日本")
    assert "".join(p.text for p in items[:-1]) == result.text == tok.decode(prompt + result.token_ids)[len(tok.decode(prompt)):]
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.time_to_first_token_s > 0 and result.prompt_tokens == len(tok.encode("Grüße aus 日本"))


def test_context_limit_is_a_clear_error(chat_model):
    model, tok = chat_model  # max_position_embeddings = 512
    with pytest.raises(GenerationError, match=r"prompt \(\d+ tokens\) \+ max_tokens \(500\) = \d+ tokens exceeds the model's context of 512"):
        smoe.generate(model, tok, "word " * 20, max_tokens=500)
    with pytest.raises(GenerationError, match="prompt is empty"):
        smoe.generate(model, None, [], max_tokens=5)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        smoe.generate(model, None, [1, 32000], max_tokens=5)


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-1), "temperature must be"), (dict(top_p=0), "top_p must be"),
    (dict(top_k=-2), "top_k must be"), (dict(min_p=2), "min_p must be"),
    (dict(max_tokens=0), "max_tokens must be"), (dict(repetition_penalty=0), "repetition_penalty must be"),
    (dict(temprature=0.5), "unexpected keyword argument 'temprature'"),
])
def test_bad_sampling_values(chat_model, kw, message):
    model, tok = chat_model
    with pytest.raises(GenerationError, match=message):
        smoe.generate(model, tok, "hi", **kw)


def test_sequences_join_and_leave_between_decode_steps(checkpoint_factory):
    """What a continuous-batching scheduler does: add and remove sequences while others decode."""
    model, _ = smoe.load(checkpoint_factory(sliding_window=6))
    prompts = {"a": list(range(3, 14)), "b": list(range(40, 45)), "c": list(range(60, 80))}
    alone = {k: smoe.generate(model, None, p, max_tokens=20, ignore_eos=True).token_ids for k, p in prompts.items()}
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    params = lambda: SamplingParams(max_tokens=20, ignore_eos=True)  # noqa: E731
    a = engine.add(prompts["a"], params())
    for _ in range(5):
        engine.step()
    b = engine.add(prompts["b"], params())
    with pytest.raises(GenerationError, match="all rows of the engine are busy"):
        engine.add(prompts["c"], params())
    while not a.finished:
        engine.step()
    engine.remove(a)
    c = engine.add(prompts["c"], params())  # reuses a's row, with its stale cache contents
    assert c.row == a.row
    while engine.active:
        engine.step()
    assert a.token_ids == alone["a"] and b.token_ids == alone["b"] and c.token_ids == alone["c"]


def test_stop_none_means_no_stop_strings(chat_model):
    model, tok = chat_model
    plain = smoe.generate(model, tok, "The weather today", max_tokens=8, ignore_eos=True)
    assert smoe.generate(model, tok, "The weather today", max_tokens=8, ignore_eos=True, stop=None).text == plain.text


@pytest.mark.parametrize("max_seq_len", [24, 40, 64])
def test_cached_decode_equals_uncached_when_the_window_is_not_yet_full(checkpoint_factory, max_seq_len):
    """A prompt shorter than the sliding window, in a cache longer than it (a rolling buffer whose
    later slots are still empty): each greedy step equals a forward pass over the whole sequence."""
    model, _ = smoe.load(checkpoint_factory(sliding_window=16))
    prompt = list(range(5, 9))
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    engine = Engine(model, max_batch_size=1, max_seq_len=max_seq_len)
    s = engine.add(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.active:
        engine.step()
    assert s.token_ids == seq[len(prompt):]


def test_prompts_fed_in_chunks_between_decode_steps(checkpoint_factory):
    """What the server's scheduler does: admit a long prompt and feed it a chunk at a time while
    another sequence decodes; both give what they give alone, and the prompt's logprobs are the
    model's log-softmax."""
    model, _ = smoe.load(checkpoint_factory(sliding_window=6))
    long_prompt, short_prompt = list(range(3, 40)), list(range(50, 55))
    params = lambda **kw: SamplingParams(max_tokens=12, ignore_eos=True, **kw)  # noqa: E731
    alone = {tuple(p): smoe.generate(model, None, p, max_tokens=12, ignore_eos=True).token_ids
             for p in (long_prompt, short_prompt)}
    engine = Engine(model, max_batch_size=3, max_seq_len=64, prefill_chunk=5)
    a = engine.add(short_prompt, params())
    b = engine.admit(long_prompt, params(prompt_logprobs=2, logprobs=0))
    assert b.prefilling and engine.active == [a]
    while b.prefilling:
        engine.prefill(b)
        engine.step()
    while engine.active:
        engine.step()
    assert a.token_ids == alone[tuple(short_prompt)] and b.token_ids == alone[tuple(long_prompt)]
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([long_prompt])).float()[0], -1)  # [P, V]
    got = torch.tensor([e.logprob for e in b.prompt_logprobs])
    expected = ref[:-1].gather(1, torch.tensor(long_prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert [e.token_id for e in b.prompt_logprobs] == long_prompt[1:]
    assert all(len(e.top) == 2 and e.top[0][1] == pytest.approx(ref[i].max().item(), abs=1e-5)
               for i, e in enumerate(b.prompt_logprobs))
    assert [e.token_id for e in b.logprobs] == b.token_ids and all(e.top == [] for e in b.logprobs)


def test_top_p_below_fp32_range_keeps_the_most_likely_token():
    """A top_p too small for fp32 (5e-324 compares as 0) still keeps the most likely token, so
    sampling never sees an all -inf row (the server once answered such a request with a 500)."""
    from smoe.sampling import Sampler, filter_logits

    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    params = smoe.SamplingParams(temperature=1.0, top_p=5e-324, repetition_penalty=0.35)
    kept = filter_logits(logits, params)
    assert kept[1] == 3.0 and torch.isinf(kept[[0, 2, 3]]).all()
    assert Sampler(params, vocab_size=4, context=[0, 2])(logits) == 1  # penalised tokens stay below 3.0


def test_rope_tables_of_one_decode_position_are_kept_and_equal_the_computed_ones():
    from smoe.model import RotaryEmbedding

    rope = RotaryEmbedding(64, 1e6)
    computed = rope._tables(torch.tensor([[37]]), torch.bfloat16)
    with torch.inference_mode():
        first = rope(torch.tensor([[37]]), torch.bfloat16)
        again = rope(torch.tensor([[37]]), torch.bfloat16)
        other = rope(torch.tensor([[38]]), torch.bfloat16)
    assert again[0] is first[0] and torch.equal(first[0], computed[0]) and torch.equal(first[1], computed[1])
    assert not torch.equal(other[0], first[0])
    # outside inference mode the tables are computed: no inference tensor reaches autograd
    outside = rope(torch.tensor([[37]]), torch.bfloat16)
    assert not outside[0].is_inference() and torch.equal(outside[0], computed[0])
    rope.reset_parameters()
    assert not rope._memo


@pytest.mark.parametrize("kw", [dict(temperature=5e-324), dict(temperature=1e-300), dict(temperature=1e-40),
                                dict(temperature=1.0, repetition_penalty=1e-300),
                                dict(temperature=5e-324, repetition_penalty=1e-300),
                                dict(temperature=1e300, top_k=1), dict(temperature=1.0, repetition_penalty=1e300)])
def test_extreme_valid_sampling_values_sample_a_token(kw):
    """Valid values at fp32's ends (the server's fuzz test sent temperature 1e-300 and got a 500:
    "probability tensor contains either inf, nan"): a temperature under fp32's range is greedy, its
    limit; a penalty that overflows a logit leaves it the largest finite one; top_k=1 keeps the top."""
    from smoe.sampling import Sampler

    logits = torch.randn(500, generator=torch.Generator().manual_seed(4)) * 5
    context = [int(logits.argmax()), 7, 9]
    token = Sampler(SamplingParams(**kw, seed=0), vocab_size=500, context=context)(logits)
    penalized = kw.get("repetition_penalty", 1.0)
    if kw["temperature"] < 1e-30 and penalized == 1.0 or kw.get("top_k") == 1:
        assert token == int(logits.argmax())
    if penalized < 1e-100:  # the strongest "reward": one of the seen tokens with a positive logit (all at the top)
        assert token in [t for t in context if logits[t] > 0]


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    """sampling.draw (one uniform draw against the running sum): 40 000 draws land on each token
    within 5 standard deviations of its probability, never on a token of probability 0 — also
    where the zeros sit at the ends and where one token holds all of it."""
    from smoe.sampling import draw

    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([0.0, 0.1, 0.0, 0.55, 0.05, 0.3, 0.0])
    n = 40_000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=7).double()
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    assert ((counts - n * probs.double()).abs() <= 5 * sigma).all() and counts[probs == 0].sum() == 0
    assert {draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) for _ in range(200)} == {2}


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("stale", [False, True])
def test_batch_one_decode_plan_attends_exactly_the_keys_the_mask_allows(window, stale):
    """KVCache.begin_one (a batch-1 decode step planned without a mask) attends the first
    min(p + 1, S) slots: exactly the slots attention_mask lets a query at p see, before a rolling
    buffer wraps and after, also in a row whose later slots still hold a previous, longer
    sequence's positions (`stale`: the row is not reset in between)."""
    from smoe.cache import KVCache, attention_mask
    from smoe.config import ModelConfig

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                      num_experts_per_tok=1, sliding_window=window)
    cache = KVCache(cfg, 2, 10, dtype=torch.bfloat16)
    row = cache.view(1, 2)
    if stale:
        for p in range(9):  # a previous sequence, 9 positions (wrapping the rolling buffer)
            row.begin(torch.tensor([[p]]))
    else:
        row.reset()
    for p in range(9):
        plan = row.begin(torch.tensor([[p]]))
        allowed = attention_mask(torch.tensor(p), cache.slot_pos[1], window)
        assert plan.mask is None and int(plan.write_slots) == p % cache.num_slots
        assert allowed.tolist() == [s < plan.kv_len for s in range(cache.num_slots)]
