"""Checkpoint layouts, sharding, mmap loading and the errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import smoe
import smoe.loader
from conftest import hf_model
from smoe.checkpoint import save_checkpoint
from smoe.config import ModelConfig
from smoe.errors import CheckpointError, ConfigError
from smoe.loader import build_model

CFG = dict(num_local_experts=4, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=6)
IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))


def reference_logits(seed=0, **cfg):
    with torch.no_grad():
        return hf_model(seed, **{**CFG, **cfg})(IDS).logits


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def to_mistral_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotary rows -> Mistral's, written row by row from the definition: within a head,
    HF row j (j < D/2) is Mistral row 2j and HF row D/2 + j is Mistral row 2j + 1."""
    D = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for j in range(D // 2):
            out[h * D + 2 * j] = w[h * D + j]
            out[h * D + 2 * j + 1] = w[h * D + D // 2 + j]
    return out


@pytest.fixture(scope="module")
def hf_dir(checkpoint_factory):
    return checkpoint_factory(**CFG)


def test_hf_layout_loads_without_copies(hf_dir):
    model = build_model(hf_dir)
    assert (model(IDS) - reference_logits()).abs().max() <= 1e-5
    # fp32 file, fp32 model: parameters are views into the memory-mapped file, not copies
    w = model.layers[0].moe.experts[1].w2.weight
    assert not w.untyped_storage().resizable()  # a buffer we did not allocate (the mmap)


def test_mistral_consolidated_layout(hf_dir, tmp_path):
    """Build a consolidated.safetensors + params.json by hand from the HF tensors."""
    hf = load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"layers.{i}.attention.wq.weight"] = to_mistral_rows(hf[f"{p}.self_attn.q_proj.weight"], 4)
        out[f"layers.{i}.attention.wk.weight"] = to_mistral_rows(hf[f"{p}.self_attn.k_proj.weight"], 2)
        out[f"layers.{i}.attention.wv.weight"] = hf[f"{p}.self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = hf[f"{p}.self_attn.o_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = hf[f"{p}.input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = hf[f"{p}.post_attention_layernorm.weight"]
        out[f"layers.{i}.feed_forward.gate.weight"] = hf[f"{p}.block_sparse_moe.gate.weight"]
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                out[f"layers.{i}.feed_forward.experts.{e}.{w}.weight"] = hf[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, tmp_path / "consolidated.safetensors")
    params = {"dim": 32, "n_layers": 2, "head_dim": 16, "hidden_dim": 48, "n_heads": 4, "n_kv_heads": 2,
              "norm_eps": 1e-5, "vocab_size": 128, "rope_theta": 10000.0, "sliding_window": 6,
              "max_seq_len": 256, "moe": {"num_experts": 4, "num_experts_per_tok": 2}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = build_model(tmp_path)
    assert (model(IDS) - reference_logits()).abs().max() <= 1e-5
    # and smoe writes the same file back
    save_checkpoint(model, tmp_path / "again", layout="mistral")
    again = load_file(tmp_path / "again" / "consolidated.safetensors")
    assert set(again) == set(out) and all(torch.equal(again[k], out[k]) for k in out)


def test_fused_layout_from_transformers_memory(hf_dir, tmp_path):
    """transformers v5 holds experts fused: model.layers.N.mlp.experts.gate_up_proj [E, 2F, H]."""
    state = hf_model(0, **CFG).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    model = build_model(tmp_path)
    assert (model(IDS) - reference_logits()).abs().max() <= 1e-5


def test_round_trip_through_all_layouts(hf_dir, tmp_path):
    model = build_model(hf_dir)
    expected = model(IDS)
    current = model
    for layout in ("mistral", "hf_fused", "hf"):
        save_checkpoint(current, tmp_path / layout, layout=layout)
        current = build_model(tmp_path / layout)
        assert torch.equal(current(IDS), expected), layout
    # what smoe saves in HF layout, transformers loads
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(IDS).logits - expected).abs().max() <= 1e-5


def test_sharded_checkpoints(tmp_path):
    hf = hf_model(0, **CFG)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    model = build_model(tmp_path / "hf")
    assert (model(IDS) - reference_logits()).abs().max() <= 1e-5
    save_checkpoint(model, tmp_path / "ours", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(build_model(tmp_path / "ours")(IDS), model(IDS))


def test_transformers_v4_config(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "v4")
    config = json.loads((path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_theta=theta, head_dim=16, torch_dtype="float32", transformers_version="4.46.0")
    config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_dir(path).rope_theta == 10000.0
    assert (build_model(path)(IDS) - reference_logits()).abs().max() <= 1e-5


def test_head_dim_null_means_hidden_over_heads():
    config = ModelConfig.from_hf_dict({
        "model_type": "mixtral", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": None,
        "num_local_experts": 2, "num_experts_per_tok": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0},
    })
    assert config.head_dim == 8 and config.rope_theta == 5.0


# ---------------------------------------------------------------------- bad input


def rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_shard(tmp_path):
    hf_model(0, **CFG).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' is missing"):
        build_model(tmp_path)


def test_truncated_file(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file is truncated: tensor '.+' ends at byte"):
        build_model(path)


def test_corrupt_header(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        build_model(path)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        build_model(path)


def test_missing_tensor(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        build_model(path)


def test_unexpected_tensor(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.rotary\.inv_freq'"):
        build_model(path)


def test_saved_rope_buffers_are_ignored(hf_dir, tmp_path):
    """transformers v4.3x wrote self_attn.rotary_emb.inv_freq into some checkpoints; it is derived, not a weight."""
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    assert (build_model(path)(IDS) - reference_logits()).abs().max() <= 1e-5


def test_wrong_shape(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite(path, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.2.w3.weight": torch.zeros(40, 32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\.experts\.2\.w3\.weight' has shape \[40, 32\], which does not fit .* \[48, 32\]"):
        build_model(path)


def test_unsupported_dtype(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has unsupported dtype I32"):
        build_model(path)


def test_config_does_not_match_tensors(hf_dir, tmp_path):
    for field, value, says in [("hidden_size", 64, "hidden_size=64"), ("num_hidden_layers", 3, "num_hidden_layers=3"),
                               ("num_local_experts", 8, "num_local_experts=8")]:
        path = copy_ckpt(hf_dir, tmp_path / field)
        config = json.loads((path / "config.json").read_text())
        config[field] = value
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=f"config does not match the weights: it says .*{says}"):
            build_model(path)


def test_pickle_refused_unless_allowed(hf_dir, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(hf_dir / "config.json", path)
    torch.save(load_file(hf_dir / "model.safetensors"), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"(?s)pickle files \(pytorch_model\.bin\).*--allow-pickle"):
        build_model(path)
    model = build_model(path, allow_pickle=True)
    assert (model(IDS) - reference_logits()).abs().max() <= 1e-5


def test_no_weights_and_bad_paths(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="no such directory"):
        build_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        build_model(hf_dir / "config.json")
    with pytest.raises(ConfigError, match="no config.json or params.json"):
        build_model(tmp_path)
    shutil.copy(hf_dir / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        build_model(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_local_experts": None}, "missing required field"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "cannot exceed num_local_experts"),
    ({"rope_theta": 5.0}, r"rope_theta \(5.0\) contradicts rope_parameters"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4}}, "rope type 'yarn' is not supported"),
    ({"hidden_size": "big"}, "must be a positive integer"),
])
def test_bad_config(hf_dir, tmp_path, change, message):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dir(tmp_path)


def test_bad_params_json(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "hidden_dim": 8, "n_heads": 4, "vocab_size": 9}))
    with pytest.raises(ConfigError, match="no 'moe' section"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_load_without_path_and_no_demo_model(monkeypatch, tmp_path):
    monkeypatch.setattr(smoe.loader, "DEMO_MODEL", tmp_path / "not-installed")  # where model_path looks
    with pytest.raises(CheckpointError, match="pass a checkpoint directory"):
        smoe.load()


def test_release_pages_keeps_values_and_frees_the_map(checkpoint_factory, tmp_path):
    """Dropping a memory-mapped weight's pages loses nothing: touching it re-reads the file."""
    import sys

    from smoe.checkpoint import release_pages

    model = build_model(checkpoint_factory(vocab_size=4096, hidden_size=256))
    weight = model.embed_tokens.weight  # 4 MiB viewing the file's memory map
    before = weight.clone()
    assert not weight.untyped_storage().resizable()

    def rss_file_kib() -> int:
        status = open("/proc/self/status").read()
        return int(status.split("RssFile:")[1].split()[0])

    weight.sum()  # fault the pages in
    touched = rss_file_kib() if sys.platform == "linux" else 0
    release_pages(weight)
    if sys.platform == "linux":
        assert rss_file_kib() < touched - 2048  # most of the 4 MiB left the resident set
    assert torch.equal(weight, before)
    release_pages(before)  # memory torch allocated: left alone
    assert torch.equal(weight, before)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc and /proc/self/status")
def test_trim_heap_gives_freed_heap_memory_back():
    """Freed heap blocks below the top of the heap stay resident under glibc (a load's stacked
    temporaries: 245-325 MiB on the benchmark checkpoint); trim_heap, which smoe.load calls at
    its end, gives them back."""
    from smoe.fsutil import trim_heap

    def rss_anon_mib() -> float:
        return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024

    blocks = [torch.ones(64 << 10, dtype=torch.uint8) for _ in range(1200)]  # 75 MiB of 64 KiB heap blocks
    pin = torch.ones(64 << 10, dtype=torch.uint8)  # above them: the heap's top stays in use
    del blocks
    freed = rss_anon_mib()
    trim_heap()
    assert rss_anon_mib() < freed - 50
    assert pin.sum().item() == 64 << 10  # live memory untouched
