"""A weight format added by one module and one registration (tests/toy_format.py, which no smoe
module names) runs through smoe.load's quantization, the stacked inference layout, offloaded
experts, the server, and a checkpoint saved in it — against a plain model whose linears hold the
same dequantized weights."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from toy_format import NAME, StackedToy, ToyLinear, ToySpec, quantize_rows

import smoe
from smoe.checkpoint import save_checkpoint
from smoe.cli import main
from smoe.errors import ConfigError, SmoeError
from smoe.experts import StackedExperts
from smoe.loader import build_model
from smoe.offload import OffloadedExperts
from smoe.server import attach
from smoe.server.app import ServerState, create_app

CONFIG = {"num_local_experts": 4, "hidden_size": 64, "intermediate_size": 96}
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def dequantized_reference(path) -> torch.nn.Module:
    """The plain model with each attention and expert linear's weight replaced by the toy
    format's dequantization of it: q · scale + offset, in fp32."""
    model = build_model(path)
    for layer in model.layers:
        linears = [getattr(layer.attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(expert, n) for expert in layer.moe.experts for n in ("w1", "w2", "w3")]
        for linear in linears:
            q, scale, offset = quantize_rows(linear.weight)
            linear.weight = torch.nn.Parameter(q.float() * scale[:, None] + offset[:, None], requires_grad=False)
    return model


def test_a_registered_format_loads_stacks_and_computes_as_its_reference(checkpoint_factory):
    path = checkpoint_factory(seed=11, **CONFIG)
    model, _ = smoe.load(path, quant=ToySpec())
    experts = model.layers[0].moe.experts
    assert isinstance(experts, StackedExperts) and type(experts.gate_up) is StackedToy
    assert type(model.layers[0].attn.q_proj) is ToyLinear
    assert model.config.quantization["format"] == {"name": NAME, "version": 1}
    layers = len(model.layers)
    # no backend names the format: its plain reference runs, and the report says so
    assert model.kernels.ran[NAME, "pytorch", "expert stacks"] == 2 * layers
    assert model.kernels.ran[NAME, "pytorch", "linears"] == 4 * layers
    reference = dequantized_reference(path)
    with torch.inference_mode():
        ours, theirs, unquantized = model(IDS), reference(IDS), build_model(path)(IDS)
        for path_ in ("sorted", "gather"):  # both stacked paths of the format's plain kind
            for layer in model.layers:
                layer.moe.experts.path = path_
            torch.testing.assert_close(model(IDS), theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - unquantized).abs().max() > 1e-4  # 8 bits did change the weights


def test_a_registered_format_offloads(checkpoint_factory):
    path = checkpoint_factory(seed=11, **CONFIG)
    resident, _ = smoe.load(path, quant=ToySpec())
    expert_bytes = sum(t.nbytes for t in resident.layers[0].moe.experts.buffers()) // CONFIG["num_local_experts"]
    offloaded, _ = smoe.load(path, quant=ToySpec(), max_memory=3 * expert_bytes, prefetch=False)
    assert isinstance(offloaded.layers[0].moe.experts, OffloadedExperts)
    with torch.inference_mode():
        torch.testing.assert_close(offloaded(IDS), resident(IDS), rtol=0, atol=1e-5)
    assert offloaded.expert_store.stats.disk_reads > 0  # experts came from the file as tokens needed them
    ids = [3, 14, 15, 92, 65]
    assert (smoe.generate(offloaded, None, ids, max_tokens=8, ignore_eos=True).token_ids
            == smoe.generate(resident, None, ids, max_tokens=8, ignore_eos=True).token_ids)


def test_a_registered_format_serves(checkpoint_factory):
    """The OpenAI client against the server holding a toy-format model: the tokens smoe.generate
    gives."""
    model, _ = smoe.load(checkpoint_factory(seed=11, **CONFIG), quant=ToySpec())
    state = ServerState(model_name="toy")
    http = TestClient(create_app(state))
    scheduler = attach(state, model, None, max_batch=2, max_context=64, prefill_chunk=16)
    try:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        prompt = [1, 5, 9, 33]
        done = client.completions.create(model="toy", prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
        expected = smoe.generate(model, None, prompt, max_tokens=6, ignore_eos=True).token_ids
        assert done.choices[0].model_dump()["token_ids"] == expected
        assert done.usage.completion_tokens == 6
    finally:
        scheduler.stop()


def test_a_registered_format_saves_and_loads(checkpoint_factory, tmp_path, capsys):
    """Saved, config.json records the format by name and version; loaded, the stored codes come
    back into the format's modules; a format this smoe does not have is one clear error."""
    model, _ = smoe.load(checkpoint_factory(seed=11, **CONFIG), quant=ToySpec(), pack=False)
    save_checkpoint(model, tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["quantization"]["format"] == {"name": NAME, "version": 1}
    again, _ = smoe.load(tmp_path / "toy")
    assert type(again.layers[0].attn.q_proj) is ToyLinear and type(again.layers[0].moe.experts.gate_up) is StackedToy
    with torch.inference_mode():
        torch.testing.assert_close(again(IDS), model(IDS), rtol=0, atol=1e-5)
    assert main(["info", str(tmp_path / "toy")]) == 0  # described by the format's own spec
    assert f"in the format {NAME} v1" in capsys.readouterr().out
    config["quantization"]["format"]["name"] = "toy-never-registered"
    (tmp_path / "toy" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a weight format this smoe does not have"):
        smoe.load(tmp_path / "toy")
    assert main(["info", str(tmp_path / "toy")]) == 0  # still described from config.json alone
    assert "in the format toy-never-registered v1" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "toy"), "--prompt-ids", "1,2", "--max-tokens", "2"]) == 2
    assert "register it before loading" in capsys.readouterr().err


def test_a_registered_format_is_named_like_int8(checkpoint_factory, capsys):
    """smoe.load(quant=NAME) and --quant NAME take a registered format by its name; an unknown name
    is one error that lists the registered ones."""
    path = checkpoint_factory(seed=11, **CONFIG)
    model, _ = smoe.load(path, quant=NAME)
    assert type(model.layers[0].attn.q_proj) is ToyLinear
    assert main(["generate", "--model", str(path), "--quant", NAME, "--prompt-ids", "1,2", "--max-tokens", "3",
                 "--ignore-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == smoe.generate(
        model, None, [1, 2], max_tokens=3, ignore_eos=True).token_ids
    with pytest.raises(SmoeError, match=f"or a registered weight format: .*{NAME}"):
        smoe.load(path, quant="int3")
    assert main(["generate", "--model", str(path), "--quant", "int3", "--prompt-ids", "1,2"]) == 2
    assert NAME in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--quant", NAME, "--group-size", "32", "--prompt-ids", "1,2"]) == 2
    assert "not --quant" in capsys.readouterr().err
