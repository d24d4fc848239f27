"""Expert and tensor parallelism with real processes: 2 and 4 gloo ranks on this machine (one
thread each), started with the variables torchrun sets, on tiny random checkpoints. Logits equal
one process's (fp32, 1e-5) under EP, TP and EP x TP; greedy generation identical, batched too,
and seeded sampling; each rank holds 1/N of the expert bytes; a rank that dies makes the others
fail with an error within the timeout instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smoe
from serving import free_port

WORKER = Path(__file__).parent / "parallel_worker.py"
PROMPTS = [[1, 5, 9, 33, 70, 2, 14, 90], [1, 44, 12, 7, 100, 3, 61, 8]]
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64)


def launch(n: int, task: str, checkpoint: Path, spec: str, tmp: Path, timeout: float = 10, **env_extra) -> list[dict]:
    port, out = free_port(), tmp / f"{task}-{spec}-{n}"
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "SMOE_DIST_TIMEOUT": str(timeout), "PROMPTS": json.dumps(PROMPTS), **env_extra}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), task, str(checkpoint), spec, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    results = []
    for rank in range(n):
        file = Path(f"{out}.{rank}.json")
        results.append(json.loads(file.read_text()) if file.exists() else {"exit": procs[rank].returncode,
                                                                          "log": logs[rank][-2000:]})
    return results


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory(seed=11, **CONFIG)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, _ = smoe.load(checkpoint, dtype="fp32")
    with torch.inference_mode():
        logits = model(torch.tensor(PROMPTS))
    runs = smoe.generate(model, None, PROMPTS, max_tokens=12, ignore_eos=True)
    sampled = smoe.generate(model, None, PROMPTS[0], max_tokens=12, ignore_eos=True, temperature=1.0, seed=7)
    return {"logits": logits, "tokens": [r.token_ids for r in runs], "sampled": sampled.token_ids,
            "alone": smoe.generate(model, None, PROMPTS[0], max_tokens=12, ignore_eos=True).token_ids}


CASES = [(2, "expert"), (2, "tensor"), (4, "expert,tensor")]  # 4 x EP and 4 x TP are the grid's halves


@pytest.mark.parametrize("n,spec", CASES)
def test_logits_and_generation_equal_one_process(checkpoint, reference, tmp_path, n, spec):
    for r in launch(n, "run", checkpoint, spec, tmp_path):
        assert "logits" in r, r
        torch.testing.assert_close(torch.tensor(r["logits"]), reference["logits"], atol=1e-5, rtol=1e-5)
        assert r["tokens"] == reference["tokens"]  # a batch of two prompts
        assert r["alone"] == reference["alone"]
        assert r["sampled"] == reference["sampled"]  # seeded sampling draws the same on every rank


@pytest.mark.parametrize("n,spec", [(2, "expert"), (4, "expert,tensor")])  # (the grid holds TP's splits)
def test_a_gguf_file_in_place_splits_as_one_process_runs_it(checkpoint, tmp_path, n, spec):
    """A GGUF file used in place (Q8_0 attention, Q4_0 experts) under EP / TP / both: each rank keeps
    views of its experts' blocks (TP: their rows, and whole-block column slices of down and o),
    the native kernels in fp32 (activations quantized as llama.cpp does) — logits and tokens as
    one process running the same file in place."""
    pytest.importorskip("gguf")
    from test_formats_gguf import write_gguf

    file = write_gguf(checkpoint, tmp_path / "m.gguf", "Q8_0", "Q4_0", tokenizer=False)
    model, _ = smoe.load(file, dtype="fp32", gguf_in_place=True)
    with torch.inference_mode():
        logits = model(torch.tensor(PROMPTS))
    tokens = [r.token_ids for r in smoe.generate(model, None, PROMPTS, max_tokens=12, ignore_eos=True)]
    for r in launch(n, "run", file, spec, tmp_path):
        assert "logits" in r, r
        torch.testing.assert_close(torch.tensor(r["logits"]), logits, atol=1e-5, rtol=1e-5)
        assert r["tokens"] == tokens


def test_int8_weights_split_by_expert_compute_as_in_one_process(checkpoint, tmp_path):
    """Each rank quantizes its own experts (whole, so with the same per-row scales as one process)."""
    model, _ = smoe.load(checkpoint, dtype="fp32", quant="int8")
    with torch.inference_mode():
        expected = model(torch.tensor(PROMPTS))
    for r in launch(2, "run", checkpoint, "expert", tmp_path, QUANT_BITS="8"):
        assert "logits" in r, r
        torch.testing.assert_close(torch.tensor(r["logits"]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,spec", [(4, "expert,tensor")])
def test_each_rank_holds_its_share_of_the_experts(checkpoint, tmp_path, n, spec):
    model, _ = smoe.load(checkpoint, dtype="fp32", pack=False)
    from smoe.parallel import expert_bytes

    total = expert_bytes(model)
    for r in launch(n, "bytes", checkpoint, spec, tmp_path):
        assert r.get("expert_bytes") == total // n, r


def test_a_dead_rank_is_an_error_on_the_others_not_a_hang(checkpoint, tmp_path):
    survivor = launch(2, "die", checkpoint, "expert", tmp_path, timeout=10)[0]
    assert survivor.get("error"), survivor
    assert survivor["after_s"] < 15


@pytest.mark.parametrize("n", [4])
def test_one_lora_step_gives_one_processs_gradients_under_expert_parallelism(checkpoint, tmp_path, n):
    """Attention adapters are replicated: every rank's gradient is the whole one. Expert adapters
    live on the rank of their expert: its gradient is the one process's for that expert."""
    from parallel_worker import lora_grads

    model, _ = smoe.load(checkpoint, dtype="fp32", pack=False)
    reference = lora_grads(model, PROMPTS)
    seen = set()
    for r in launch(n, "grads", checkpoint, "expert", tmp_path):
        assert "grads" in r, r
        for key, grad in r["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), torch.tensor(reference[key]), atol=1e-5, rtol=1e-4)
            seen.add(key)
    assert seen == set(reference)  # every adapter is somewhere, experts split, attention everywhere


def test_finetune_under_torchrun_splits_the_batch_and_matches_one_process(chat_checkpoint, tmp_path):
    """Data parallel: 2 ranks take half of each batch each and average their gradients — one
    step gives one process's gradient norm and adapter (router balancing loss off: it is
    computed per rank)."""
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog, again and again."
                                for i in range(40)))
    args = ["finetune", "--model", str(chat_checkpoint), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--seq-len", "16", "--aux-loss-coef", "0", "--lr", "1e-3", "--targets", "attention", "--lora-rank", "4"]
    one = subprocess.run([sys.executable, "-m", "smoe", *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "smoe", *args, "--out", str(tmp_path / "two")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # Adam's first step is lr·g/(|g| + eps): where |g| is tiny it magnifies the fp32 difference of
        # summing the halves' gradients in another order, so the bound is 1 % of a step (lr = 1e-3)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    # the same gradient (its norm before clipping) and the same loss, logged by rank 0
    logged = [next(h for h in json.loads((tmp_path / d / "ckpt-0000001" / "history.json").read_text())
                   if "grad_norm" in h) for d in ("one", "two")]
    assert logged[1]["grad_norm"] == pytest.approx(logged[0]["grad_norm"], abs=1.01e-4)  # logged to 4 places
    assert logged[1]["ce"] == pytest.approx(logged[0]["ce"], rel=1e-4)


def test_tensor_parallel_refuses_to_cut_a_gguf_block():
    """TP over a file in place slices rows of GGML blocks only at whole blocks: a K-quant row (256
    values a block) cut at 128 is refused with what to do instead."""
    from smoe.errors import SmoeError
    from smoe.parallel import _block_columns

    blocks = torch.zeros(4, 2 * 144, dtype=torch.uint8)  # 4 rows of 512 values in Q4_K
    assert _block_columns(blocks, "Q4_K", slice(256, 512), "o").shape == (4, 144)
    with pytest.raises(SmoeError, match=r"o is Q4_K, whose rows split only at multiples of 256 values; a rank's "
                                        r"share starts at 128.*--no-gguf-in-place"):
        _block_columns(blocks, "Q4_K", slice(128, 256), "o")
