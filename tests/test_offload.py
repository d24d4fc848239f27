"""Expert offloading (smoe/offload.py): the same tokens as a resident model under every policy,
memory held to the budget, and the statistics, profiles and errors people rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import smoe
from smoe.cli import main
from smoe.offload import ExpertStore, expert_usage, pinned_experts, read_profile
from smoe.options import parse_size

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_local_experts=8)
PROMPT = [5, 17, 3, 99, 42, 7, 64, 1, 23, 88, 11, 2]


def _expert_bytes(dtype: torch.dtype, bits: int | None = None) -> int:
    H, F = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    return 3 * H * F * dtype.itemsize


def _generate(model, max_tokens=24):
    return smoe.generate(model, None, PROMPT, max_tokens=max_tokens, ignore_eos=True).token_ids


@pytest.fixture(scope="module")
def profile_file(checkpoint_factory, tmp_path_factory):
    model, _ = smoe.load(checkpoint_factory(seed=3, **CONFIG))
    counts = expert_usage(model, PROMPT * 8)
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    from smoe.offload import write_profile

    write_profile(path, counts, len(PROMPT) * 8)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["lru", "lfu", "profile"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_output_is_token_for_token_the_resident_output(checkpoint_factory, profile_file, dtype, policy,
                                                                    prefetch):
    path = checkpoint_factory(seed=3, dtype=dtype, **CONFIG)
    resident, _ = smoe.load(path)
    budget = 16 * _expert_bytes(dtype)  # half of the 32 experts
    offloaded, _ = smoe.load(path, max_memory=budget, cache_policy="lru" if policy == "profile" else policy,
                             expert_profile=profile_file if policy == "profile" else None, prefetch=prefetch)
    store = offloaded.expert_store
    assert _generate(offloaded) == _generate(resident)
    ids = torch.tensor([PROMPT])
    assert torch.equal(offloaded(ids), resident(ids))  # the same kernels on the same weights: bit for bit
    store.wait()
    stats = store.stats
    assert stats.tiers[0].misses > 0 and stats.tiers[0].hits > 0  # the cache was too small to hold all
    assert store.compute.used <= budget
    assert stats.disk_bytes >= stats.disk_reads * _expert_bytes(dtype)
    if prefetch:
        assert stats.guessed > 0 and 0 < stats.prefetch_accuracy <= 1
    else:
        assert stats.prefetch_loads == 0
    if policy == "profile":
        assert len(store.compute.pinned) == 16 // 2  # half the budget; the other half (a token's 4 x 2) is LRU
        assert store.compute.pinned <= set(store.compute.entries)


def test_offloading_composes_with_quantization(checkpoint_factory, tmp_path):
    path = checkpoint_factory(seed=4, **CONFIG)
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(path), "--bits", "4", "--out", str(out)]) == 0
    for source, quant in ((out, None), (path, "int4"), (path, "int8")):
        resident, _ = smoe.load(source, quant=quant)
        offloaded, _ = smoe.load(source, quant=quant, max_memory=6 * _expert_bytes(torch.float32) // 4)
        assert _generate(offloaded) == _generate(resident)
        assert offloaded.expert_store.stats.tiers[0].misses > 0


def test_a_ram_tier_below_the_compute_tier(checkpoint_factory):
    """The tier chain on the CPU: a larger cache under a small one serves what the small one evicts."""
    path = checkpoint_factory(seed=3, **CONFIG)
    resident, _ = smoe.load(path)
    model, _ = smoe.load(path, max_memory=4 * _expert_bytes(torch.float32), prefetch=False)
    old = model.expert_store
    size = _expert_bytes(torch.float32)
    store = ExpertStore(old.sources, old.templates, torch.float32,
                        [("ram", "cpu", 32 * size), ("fast", "cpu", 4 * size)], prefetch=False)
    store.steps = old.steps  # what the loader recorded for each layer's experts (stack, pack)
    store.start()
    for layer in model.layers:
        layer.moe.experts.store = store
    assert _generate(model) == _generate(resident)
    ram, fast = store.stats.tiers
    assert fast.misses > 0 and ram.hits > 0
    assert store.stats.disk_reads == ram.misses <= 32  # each expert read from disk once at most


def test_cache_policies_evict_as_named():
    from smoe.offload import ExpertCache

    lru = ExpertCache("t", torch.device("cpu"), budget=3, policy="lru")
    lfu = ExpertCache("t", torch.device("cpu"), budget=3, policy="lfu")
    for cache in (lru, lfu):
        for key in ((0, 0), (0, 1), (0, 2)):
            cache.make_room(1)
            cache.put(key, torch.nn.Identity(), 1)
        cache.get((0, 0)), cache.get((0, 0)), cache.get((0, 1))  # (0, 2) is the least often used
        cache.get((0, 2))  # ... and now the most recently used
        cache.pinned.add((0, 1))
        cache.make_room(1)
    assert set(lru.entries) == {(0, 1), (0, 2)}  # the least recently used, (0, 0), went
    assert set(lfu.entries) == {(0, 0), (0, 1)}  # the least often used, (0, 2), went
    assert not lru.make_room(3)  # only pinned (0, 1) would be left to evict... and it may not be
    assert (0, 1) in lru.entries


def test_peak_memory_stays_within_the_budget(checkpoint_factory):
    """Resident set: the non-expert weights plus the budget, not the experts (a subprocess, so the
    high-water mark is this run's)."""
    path = checkpoint_factory(seed=5, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_local_experts=8, vocab_size=256)
    expert = 3 * 256 * 1024 * 4  # 3 MiB in fp32; 32 experts = 96 MiB
    script = textwrap.dedent(f"""
        import gc, re, sys, torch, smoe
        torch.set_num_threads(2)
        def kib(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        budget = {expert} * int(sys.argv[1]) if sys.argv[1] != "all" else None
        warm, _ = smoe.load({str(path)!r}, max_memory=2 * {expert}, pack=False, prefetch=False)
        # the same run once, so torch's kernels, thread pools and caches are set up, then let go
        smoe.generate(warm, None, list(range(1, 60)), max_tokens=24, ignore_eos=True)
        del warm
        gc.collect()
        base = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        # unpacked, a resident model's experts stay in the file's memory map until first used
        model, _ = smoe.load({str(path)!r}, max_memory=budget, pack=False, prefetch=False)
        smoe.generate(model, None, list(range(1, 60)), max_tokens=24, ignore_eos=True)
        resident = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                       if not t.is_meta) + model.config.max_position_embeddings * 4 * 2 * 128 * 4  # + KV cache: 4 layers, K and V, 2 heads x 64, fp32
        print((kib("VmHWM") - base) * 1024, resident)
    """)

    def growth(arg: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, check=True)
        peak, resident = out.stdout.split()[-2:]
        return int(peak), int(resident)

    peak, _ = growth("all")
    assert peak > 20 * expert  # without offloading the experts come into memory (32 of 3 MiB)
    for n in (2, 6):
        peak, resident = growth(str(n))
        assert resident < 8 * 2**20  # attention, embeddings, head, norms, routers and the KV cache
        # the budget, the resident weights, and the file pages of the one expert being read, until
        # they are given back (measured 1.2 MiB over budget + resident). Without prefetch, so
        # exactly one load is in flight whatever the machine's load.
        assert peak < n * expert + resident + expert + 2 * 2**20, (n, peak, resident)


def test_profile_counts_are_the_routing(checkpoint_factory, tmp_path, capsys, v1_tokenizer_json):
    path = checkpoint_factory(seed=3, **CONFIG)
    model, _ = smoe.load(path)
    from smoe.routing import trace_routing

    with trace_routing(model) as trace:
        model(torch.tensor([PROMPT]))
    experts, _, _ = trace.tokens()  # [n, L, K]
    counts = expert_usage(model, PROMPT)
    for layer in range(CONFIG["num_hidden_layers"]):
        assert counts[layer].tolist() == torch.bincount(experts[:, layer].reshape(-1), minlength=8).tolist()
    ranked = torch.arange(32).view(4, 8)  # expert (l, e) used 8l + e times; a token needs 4 x 2 experts
    keys = pinned_experts(ranked, budget=16 * 1000, expert_bytes=1000, top_k=2, share=1.0)
    assert keys == [((31 - i) // 8, (31 - i) % 8) for i in range(8)]  # hottest first, 8 slots left to LRU
    assert len(pinned_experts(ranked, budget=20 * 1000, expert_bytes=1000, top_k=2)) == 10  # half by default
    assert len(pinned_experts(ranked, budget=10 * 1000, expert_bytes=1000, top_k=2)) == 2  # keep LRU's 8
    assert len(pinned_experts(ranked, budget=6 * 1000, expert_bytes=1000, top_k=2)) == 4  # below a token's 8
    assert pinned_experts(ranked, budget=2 * 1000, expert_bytes=1000, top_k=2) == []  # no room beyond top-2


def test_profile_cli_and_stats(chat_checkpoint, tmp_path, capsys):
    text = tmp_path / "work.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    profile = tmp_path / "p.json"
    assert main(["profile", "--model", str(chat_checkpoint), "--input", str(text), "--out", str(profile)]) == 0
    data = json.loads(profile.read_text())
    assert data["format"] == "smoe-expert-profile" and data["tokens"] > 100
    assert sum(map(sum, data["counts"])) == data["tokens"] * 2 * 2  # top-2 in each of 2 layers
    capsys.readouterr()
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "The quick", "--max-tokens", "8",
                 "--max-memory", "40KiB", "--expert-profile", str(profile), "--stats"]) == 0
    err = capsys.readouterr().err
    assert "expert cache ram:" in err and "read from the checkpoint:" in err and "prefetch:" in err


def test_bad_offload_input_gets_a_clear_error(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory(seed=3, **CONFIG)
    cases = [
        (["--max-memory", "lots"], "cannot read the memory size 'lots'"),
        (["--max-memory", "1KiB"], "holds no expert"),
        (["--stats"], "add --max-memory"),
        (["--max-memory", "1MiB", "--max-cpu-memory", "1GiB"], "RAM tier under a GPU"),
        (["--max-memory", "1MiB", "--expert-profile", str(tmp_path / "none.json")], "no such expert profile"),
    ]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "smoe-expert-profile", "counts": [[1, 2]]}))
    cases.append((["--max-memory", "1MiB", "--expert-profile", str(wrong)], "field 'counts' must be 4 lists of 8"))
    for extra, message in cases:
        code = main(["generate", "--model", str(path), "--prompt-ids", "1,2", "--max-tokens", "2", *extra])
        assert code == 2
        assert message in capsys.readouterr().err
    assert parse_size("6GiB") == 6 << 30 and parse_size("1.5GB") == 1_500_000_000 and parse_size("512") == 512
    with pytest.raises(smoe.SmoeError, match="profile"):
        read_profile(wrong, smoe.load(path)[0].config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_offloading_on_a_gpu_with_a_ram_tier(checkpoint_factory):
    path = checkpoint_factory(seed=3, **CONFIG)
    resident, _ = smoe.load(path, device="cuda")
    size = _expert_bytes(torch.float32)
    offloaded, _ = smoe.load(path, device="cuda", max_memory=4 * size, max_cpu_memory=16 * size)
    assert _generate(offloaded) == _generate(resident)
    ram, gpu = offloaded.expert_store.stats.tiers
    assert gpu.misses > 0 and ram.hits > 0
