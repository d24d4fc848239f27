"""A decode step compiled whole (generate(..., compile=True)) against the eager engine, and
the static cache plan it runs on against the ordinary one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import smoe
from conftest import capability_env, cpu_capabilities
from smoe.errors import GenerationError, SmoeError
from smoe.generate import Engine
from smoe.sampling import SamplingParams

PROMPTS = [[5, 9, 17, 3, 60, 2, 44], [7, 7, 100, 12]]


@pytest.mark.parametrize("window", [None, 5])
def test_static_cache_plan_gives_the_same_logits(checkpoint_factory, window):
    """One-token steps planned without reading positions (all slots under a mask, scatter
    writes) equal the ordinary plan; window 5 < the sequence exercises the rolling buffer."""
    model, _ = smoe.load(checkpoint_factory(sliding_window=window, num_local_experts=8))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    logits = {}
    for static in (False, True):
        engine = Engine(model, None, max_batch_size=2, max_seq_len=32)
        engine.cache.static = static
        seqs = [engine.add(p, params) for p in PROMPTS]
        with torch.inference_mode():
            steps = []
            while engine.active:
                view = engine.cache.view(0, 2)
                tokens = torch.tensor([[s.token_ids[-1]] for s in seqs])
                positions = torch.tensor([[s.position - 1] for s in seqs])
                steps.append(model(tokens, positions, view))
                engine.step()
        logits[static] = torch.cat(steps, 1)
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-5


def test_compiled_decode_gives_the_eager_tokens(checkpoint_factory):
    """fp32 (bf16 compiled graphs round fused intermediates differently), a batch of two
    prompts of different lengths, a sliding window shorter than the sequence."""
    path = checkpoint_factory(sliding_window=5, num_local_experts=8)
    eager, _ = smoe.load(path)
    compiled, _ = smoe.load(path, compile=True)
    expected = smoe.generate(eager, None, PROMPTS, max_tokens=20, ignore_eos=True)
    got = smoe.generate(compiled, None, PROMPTS, max_tokens=20, ignore_eos=True, compile=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    # the engine's warm-up step is the compiled step: later engines of this shape reuse it
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = smoe.generate(compiled, None, PROMPTS, max_tokens=12, ignore_eos=True, compile=True)
    assert [r.token_ids for r in again] == [r.token_ids[:12] for r in expected]
    single = smoe.generate(compiled, None, PROMPTS[0], max_tokens=20, ignore_eos=True, compile=True)
    assert single.token_ids == expected[0].token_ids


def test_compile_errors_name_what_to_do(checkpoint_factory):
    path = checkpoint_factory()
    packed, _ = smoe.load(path)
    with pytest.raises(GenerationError, match=r"smoe.load\(..., compile=True\)"):
        smoe.generate(packed, None, [1, 2, 3], max_tokens=2, compile=True)
    with pytest.raises(SmoeError, match="does not combine with offloaded experts"):
        smoe.load(path, compile=True, max_memory="1MiB")


def test_compiled_decode_with_int8_experts_keeps_their_kernels(checkpoint_factory):
    """Quantized experts stay on their weight-only kernels (the smoe::experts_sorted op) inside
    the compiled step; fp32 activations, so the tokens equal eager ones."""
    path = checkpoint_factory(num_local_experts=8, hidden_size=64, intermediate_size=128)
    eager, _ = smoe.load(path, quant="int8")
    compiled, _ = smoe.load(path, quant="int8", compile=True)
    expected = smoe.generate(eager, None, PROMPTS[0], max_tokens=16, ignore_eos=True)
    assert smoe.generate(compiled, None, PROMPTS[0], max_tokens=16, ignore_eos=True,
                         compile=True).token_ids == expected.token_ids


def test_a_compiled_step_cached_under_one_capability_is_not_reused_under_another(checkpoint_factory, tmp_path):
    """inductor's on-disk cache keys on its options, not on ATEN_CPU_CAPABILITY: a decode step cached
    under avx2 and loaded under avx512 corrupted the heap ("corrupted double-linked list"). compiled_decode
    states the vector width in its options, so each capability compiles and caches its own."""
    capabilities = cpu_capabilities()
    if len(capabilities) < 2:
        pytest.skip("this CPU runs one ATEN_CPU_CAPABILITY")
    path = checkpoint_factory(num_local_experts=8)
    code = ("import json, smoe\n"
            f"m, _ = smoe.load({str(path)!r}, compile=True)\n"
            f"print(json.dumps(smoe.generate(m, None, {PROMPTS[0]}, max_tokens=8, ignore_eos=True, "
            "compile=True).token_ids))\n")
    tokens = []
    for capability in (capabilities[-2], capabilities[-1], capabilities[-2]):
        env = capability_env(capability, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (capability, r.stderr[-3000:])
        tokens.append(json.loads(r.stdout.strip().splitlines()[-1]))
    eager = smoe.generate(smoe.load(path)[0], None, PROMPTS[0], max_tokens=8, ignore_eos=True).token_ids
    assert tokens == [eager, eager, eager]
    assert os.listdir(tmp_path / "inductor")
