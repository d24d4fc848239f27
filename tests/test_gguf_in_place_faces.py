"""A GGUF file used in place behind smoe's faces: `smoe serve --model file.gguf` (the `openai` client)
answers what smoe's own engine gives on the same in-place model, and routing traces / `smoe routes`
read its router — nothing converted (the conversion cache stays empty). The file is the demo model
quantized by `smoe quantize --type Q4_K_M` (Q4_K / Q5_K / Q6_K / Q8_0 / Q5_0 blocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import smoe
from serving import Server
from smoe.generate import _result
from smoe.kernels import native
from smoe.routing import trace_routing

openai = pytest.importorskip("openai")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "demo-Q4_K_M.gguf"
    run = subprocess.run([sys.executable, "-m", "smoe", "quantize", "--type", "Q4_K_M", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoe-cache")


def converted(cache) -> list:
    return [d for d in (cache / "gguf").glob("*") if (d / "config.json").exists()] if (cache / "gguf").exists() else []


def test_server_answers_from_the_file_in_place(gguf_file, cache_dir, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(cache_dir))
    server = Server("--model", str(gguf_file), "--max-batch", "4", "--prefill-chunk", "16")
    try:
        client = server.client()
        model_id = client.models.list().data[0].id
        prompts = ["The meaning of life is", "def fibonacci(n):"]
        model, tok = smoe.load(gguf_file)  # in place, as the server loads it
        if native.available():
            assert isinstance(model.layers[0].moe.experts.gate_up, native.NativeStackedGGML)

        def alone(ids: list[int], max_tokens: int):  # the request alone in an engine shaped like the server's
            engine = smoe.Engine(model, tok, max_batch_size=4, max_seq_len=model.config.max_position_embeddings,
                                 prefill_chunk=16)
            seq = engine.add(ids, smoe.SamplingParams(max_tokens=max_tokens))
            while engine.active:
                engine.step()
            return _result(seq)

        for prompt in prompts:
            r = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0)
            ref = alone(tok.encode(prompt), 16)
            assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
        messages = [{"role": "user", "content": "Hello"}]
        chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
        ref = alone(tok.apply_chat_template(messages), 8)
        assert chat.choices[0].message.content == ref.text and chat.usage.prompt_tokens == ref.prompt_tokens
    finally:
        server.stop()
    assert converted(cache_dir) == []  # served from the file's blocks: nothing converted


def test_routing_traces_read_the_in_place_router(gguf_file):
    model, _ = smoe.load(gguf_file)
    prompt = list(range(10, 30))
    with trace_routing(model) as trace:
        result = smoe.generate(model, None, prompt, max_tokens=8, ignore_eos=True)
    experts, weights, _ = trace.tokens()
    fed = prompt + result.token_ids[:-1]
    layers, top_k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    assert experts.shape == (len(fed), layers, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(len(fed), layers))
    with trace_routing(model) as full:  # the whole sequence at once: the same choices
        with torch.inference_mode():
            model(torch.tensor([fed]))
    agree = (full.tokens()[0] == experts).all(-1).float().mean()
    # measured 1.0; not asserted equal: the whole sequence runs prefill's arithmetic (dequantized
    # rows, fp32 GEMMs) where decode steps multiply 8-bit activations, so a router near-tie may flip
    assert agree >= 0.97, agree


def test_routes_cli_on_a_gguf_file(gguf_file, tmp_path, cache_dir):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a little cat who liked to read code.\n" * 3)
    env = {**os.environ, "SMOE_CACHE": str(cache_dir)}
    out = subprocess.run([sys.executable, "-m", "smoe", "routes", "--model", str(gguf_file), "--input", str(text),
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r" / "routes.json").read_text())
    layers = report["layers"]
    assert [layer["layer"] for layer in layers] == list(range(6))
    assert all(sum(layer["topk_share"]) == pytest.approx(1) for layer in layers)
    assert converted(cache_dir) == []


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "router"), ("k_proj", "o_proj", "w1", "w2", "w3")])
def test_lora_adapter_over_the_file_in_place(gguf_file, tmp_path, monkeypatch, targets):
    """An adapter (PEFT's format) trained on the converted checkpoint, loaded over the file in place:
    attention and router adapters wrap the GGML linears; expert adapters the experts' views of the
    file's stacked blocks (unstacked, nothing copied). In fp32 with the reference modules it gives
    the converted model's logits with the same adapter; in bf16 the native kernels run the blocks
    under the adapters, within 3x the bf16 PyTorch path's distance (as without an adapter)."""
    from smoe.formats.gguf import convert
    from smoe.lora import apply_lora, lora_modules, save_adapter
    from smoe.options import LoraSpec

    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    directory = convert(gguf_file, tmp_path / "converted", dtype=torch.float32, progress=False)
    model, _ = smoe.load(directory, dtype="fp32", pack=False)
    apply_lora(model, LoraSpec(rank=4, alpha=8, targets=targets), seed=1)
    g = torch.Generator().manual_seed(2)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05, generator=g)  # a trained-looking, non-zero update
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 415, 565, 302, 484, 349, 546, 287, 415, 2001, 33, 918]])
    plain_model, _ = smoe.load(directory, dtype="fp32", pack=False)
    with torch.inference_mode():
        reference, without = model(ids), plain_model(ids)
    assert (reference - without).abs().max() > 0.1  # the adapter changes the answer
    in_place, _ = smoe.load(gguf_file, dtype="fp32", gguf_in_place=True, pack=False, adapter=tmp_path / "adapter")
    assert sorted(lora_modules(in_place)) == sorted(lora_modules(model))
    with torch.inference_mode():
        assert torch.allclose(in_place(ids), reference, rtol=0, atol=1e-5)
    fast, _ = smoe.load(gguf_file, adapter=tmp_path / "adapter")  # bf16, in place, packed
    plain, _ = smoe.load(gguf_file, pack=False, adapter=tmp_path / "adapter")  # bf16, PyTorch's products
    if native.available():
        assert isinstance(lora_modules(fast)[sorted(lora_modules(fast))[0]].base, native.NativeGGMLLinear)
    with torch.inference_mode():
        ours, theirs = fast(ids).float(), plain(ids).float()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    assert (ours - reference).abs().mean() <= 3 * (theirs - reference).abs().mean()
    assert converted(tmp_path / "cache") == []


def test_offloaded_experts_read_from_the_files_map(gguf_file):
    """--max-memory over a file in place: the file's map is the disk tier — an expert's blocks are
    copied out of it on a miss (its file pages given back), run by the same kernels, evicted under
    the budget — and the logits and tokens are those of the file in place with every expert resident."""
    from smoe.loader import LoadOptions, gguf_in_place_for
    from smoe.offload import OffloadedExperts
    from smoe.options import OffloadSpec

    resident, _ = smoe.load(gguf_file)
    offloaded, _ = smoe.load(gguf_file, max_memory="3MB")  # ~16 of the 48 experts
    assert gguf_in_place_for(gguf_file, LoadOptions(offload=OffloadSpec(3 << 20)))  # the default with --max-memory
    assert isinstance(offloaded.layers[0].moe.experts, OffloadedExperts)
    store = offloaded.expert_store
    assert store.expert_bytes * 48 > 3 * 2**20 >= store.expert_bytes * 2
    ids = torch.tensor([[1, 415, 565, 302, 484, 349, 546, 287, 415]])
    with torch.inference_mode():
        assert torch.equal(offloaded(ids), resident(ids))
    prompt = [1, 415, 565]
    assert (smoe.generate(offloaded, None, prompt, max_tokens=12, ignore_eos=True).token_ids
            == smoe.generate(resident, None, prompt, max_tokens=12, ignore_eos=True).token_ids)
    assert store.stats.tiers[0].misses > 0 and store.stats.tiers[0].evictions > 0
    assert store.compute.used <= store.compute.budget
