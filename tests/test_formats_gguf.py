"""GGUF in, without llama.cpp: GGUF files written by the `gguf` package (its writer and its
quantizers, as llama.cpp's converter lays a Mixtral out: arch `llama`, q/k rows interleaved per
head, experts stacked as `ffn_*_exps`) from random checkpoints, read back by smoe.

- every block type dequantized equal to `gguf`'s own reference dequantization (K-quants from
  random codes and scales: `gguf` has no quantizer for them);
- an F16 file gives the original's logits within fp16 rounding and identical greedy tokens;
  quantized files give the logits of the dequantized weights;
- the tokenizer rebuilt from the file's vocabulary gives the original's ids on 20 texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import smoe
from conftest import v1_tokenizer_path
from smoe.formats.ggml_quantize import quantize
from smoe.formats.gguf import DEQUANTIZERS, dequantize
from smoe.formats.gguf_write import FILE_TYPES, tensor_type

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as reference_dequantize  # noqa: E402
from gguf.quants import quantize as reference_quantize  # noqa: E402

TEXTS = ["Hello, world!", "The capital of France is Paris.", "  leading spaces", "trailing spaces   ",
         "Ünïcödé façade — “quotes”", "日本語のテキスト", "emoji 🙂🚀 mix", "tabs\tand\nnewlines\n\n",
         "def f(x):\n    return x ** 2", "1234567890 3.14159", "<s> not a special token </s>", "[INST] hi [/INST]",
         "a", " ", "Mixtral-8x7B uses 2 of 8 experts.", "ça va? ¿qué tal?", "Zwölf Boxkämpfer jagen Viktor",
         "URL: https://example.com/a?b=c&d=e", "x" * 50, "The end."]


def random_blocks(qtype, n: int, rng, scale: float = 0.05) -> np.ndarray:
    """n blocks of random bytes, with finite fp16 scales where the format keeps them."""
    _, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    T = GGMLQuantizationType
    halves = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q8_0: [0],
              T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.IQ4_NL: [0]}[qtype]
    for at in halves:
        raw[:, at : at + 2] = (rng.standard_normal((n, 1)) * scale).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", list(DEQUANTIZERS))
def test_dequantization_equals_ggufs_reference(name):
    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[name]
    elems, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 48, rng).reshape(6, -1)  # 6 rows of 8 blocks
    ours = dequantize(raw, name, (6, 8 * elems))
    assert np.array_equal(ours, reference_dequantize(raw, qtype).reshape(ours.shape))
    if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # and on blocks gguf's own quantizer made
        w = rng.standard_normal((4, 8 * elems)).astype(np.float32)
        q = reference_quantize(w, qtype)
        assert np.array_equal(dequantize(q, name, w.shape), reference_dequantize(q, qtype).reshape(w.shape))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_plain_types(name):
    w = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    data = reference_quantize(w, GGMLQuantizationType[name]) if name != "F32" else w
    assert np.array_equal(dequantize(data, name, w.shape),
                          reference_dequantize(data, GGMLQuantizationType[name]).reshape(w.shape))


# ------------------------------------------------------------------------------ files


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from halves (HF) to interleaved rotary pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(checkpoint: Path, out: Path, qtype: str = "F16", experts_qtype: str | None = None,
               tokenizer: bool = True, head: bool = True) -> Path:
    """A Mixtral checkpoint (HF layout, fp32) as llama.cpp's converter writes it, with `gguf`'s writer
    (head=False: no output.weight — a tied head, read from token_embd)."""
    from safetensors.numpy import load_file
    from sentencepiece import SentencePieceProcessor

    cfg = json.loads((checkpoint / "config.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    L, Q, G = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(L)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(Q)
    writer.add_head_count_kv(G)
    writer.add_rope_dimension_count(cfg["hidden_size"] // Q)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_expert_count(cfg["num_local_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    writer.add_vocab_size(cfg["vocab_size"])
    if tokenizer:
        sp = SentencePieceProcessor(model_file=str(v1_tokenizer_path()))
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else
                 6 if sp.is_byte(i) else 1 for i in range(sp.vocab_size())]
        writer.add_token_types(types)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())

    rng = np.random.default_rng(7)

    def add(name, w, kind):
        t = GGMLQuantizationType[kind]
        if kind.endswith("_K"):  # gguf has no K-quant quantizer: random blocks of the tensor's shape
            elems, nbytes = GGML_QUANT_SIZES[t]
            rows = int(np.prod(w.shape[:-1]))
            data = random_blocks(t, rows * w.shape[-1] // elems, rng, scale=0.002).reshape(
                *w.shape[:-1], w.shape[-1] // elems * nbytes)
            writer.add_tensor(name, data, raw_dtype=t)
            return
        data = w.astype(np.float32) if kind == "F32" else reference_quantize(w.astype(np.float32), t)
        writer.add_tensor(name, data, raw_dtype=None if kind == "F32" else t)

    add("token_embd.weight", state["model.embed_tokens.weight"], qtype)
    add("output_norm.weight", state["model.norm.weight"], "F32")
    if head:
        add("output.weight", state["lm_head.weight"], qtype)
    for i in range(L):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], "F32")
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], "F32")
        add(f"blk.{i}.attn_q.weight", llama_permute(state[p + "self_attn.q_proj.weight"], Q), qtype)
        add(f"blk.{i}.attn_k.weight", llama_permute(state[p + "self_attn.k_proj.weight"], G), qtype)
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"], qtype)
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"], qtype)
        add(f"blk.{i}.ffn_gate_inp.weight", state[p + "block_sparse_moe.gate.weight"], "F32")
        kind = experts_qtype or qtype
        for gguf_name, w in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            stacked = np.stack([state[f"{p}block_sparse_moe.experts.{e}.{w}.weight"]
                                for e in range(cfg["num_local_experts"])])  # [E, out, in]
            add(f"blk.{i}.{gguf_name}.weight", stacked, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def original(checkpoint_factory):
    # 32 000 tokens (the v1 tokenizer's), sizes that are whole K-quant super-blocks (256)
    return checkpoint_factory(seed=3, vocab_size=32000, hidden_size=256, intermediate_size=512,
                              num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def prompt():
    return torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723, 415]])


def logits_of(path, ids, dtype="fp32"):
    model, _ = smoe.load(path, dtype=dtype)
    with torch.inference_mode():
        return model(ids).float()


def test_f16_file_gives_the_originals_logits_and_tokens(original, prompt, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    file = write_gguf(original, tmp_path / "model-f16.gguf", "F16")
    ref = logits_of(original, prompt)
    got = logits_of(file, prompt)
    # the original with its weights rounded to fp16 as the file stores them (norms and routers
    # were written in F32) is what the file must give back, to fp32 rounding
    model, _ = smoe.load(original, dtype="fp32", pack=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "router" not in name:
                p.copy_(p.half().float())
    with torch.inference_mode():
        rounded = model(prompt).float()
    torch.testing.assert_close(got, rounded, atol=1e-4, rtol=1e-4)
    assert (got - ref).abs().max() < 0.05  # fp16 rounding of the weights, nothing more
    m1, t1 = smoe.load(original, dtype="fp32")
    m2, t2 = smoe.load(file, dtype="fp32")
    ids = prompt[0].tolist()
    assert smoe.generate(m1, None, ids, max_tokens=12, ignore_eos=True).token_ids == \
        smoe.generate(m2, None, ids, max_tokens=12, ignore_eos=True).token_ids


@pytest.mark.parametrize("qtype,experts_qtype", [("Q8_0", None), ("Q4_0", None), ("F16", "Q8_0")])
def test_quantized_files_give_their_dequantized_weights(original, prompt, tmp_path, monkeypatch, qtype, experts_qtype):
    """Read back, each tensor equals gguf's own dequantization of it (in the HF layout)."""
    from smoe.formats.gguf import convert

    file = write_gguf(original, tmp_path / f"model-{qtype}.gguf", qtype, experts_qtype, tokenizer=False)
    out = convert(file, tmp_path / "out", dtype=torch.float32, progress=False)
    from safetensors.torch import load_file

    ours = load_file(str(out / "model.safetensors"))
    reader = gguf.GGUFReader(str(file))
    cfg = json.loads((original / "config.json").read_text())
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
    checked = 0
    for t in reader.tensors:  # every tensor equals gguf's reference dequantization, in the HF layout
        ref = torch.from_numpy(reference_dequantize(t.data, t.tensor_type).reshape(
            [int(n) for n in reversed(t.shape.tolist())]).astype(np.float32))
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind in heads:  # llama.cpp's interleaved rotary pairs back to halves
                H = ref.shape[0] // heads[kind]
                ref = ref.view(heads[kind], H // 2, 2, -1).transpose(1, 2).reshape(ref.shape)
            if kind.endswith("_exps"):
                for e in range(ref.shape[0]):
                    assert torch.equal(ours[f"model.layers.{i}.block_sparse_moe.experts.{e}.{names[kind]}.weight"], ref[e])
                    checked += 1
                continue
            mine = ours[f"model.layers.{i}.{names[kind]}.weight"]
        else:
            mine = ours[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                         "output.weight": "lm_head.weight"}[t.name]]
        assert torch.equal(mine, ref), t.name
        checked += 1
    assert checked == len(ours)
    # the F16 case above showed the layout gives the model's logits; these weights run too
    logits = logits_of(out, prompt)
    assert logits.isfinite().all()


def _mapped_from(path: Path, tensor: torch.Tensor) -> bool:
    """Whether tensor's memory lies in a mapping of the file `path` (/proc/self/maps): a view, no copy."""
    at = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= at < hi:
                return True
    return False


@pytest.mark.parametrize("qtype,experts_qtype", [("Q8_0", "Q4_0"), ("Q4_0", "Q4_K"), ("Q5_0", "Q3_K"),
                                                 ("Q4_1", "Q2_K"), ("Q5_1", "Q6_K"), ("Q8_0", "Q5_K")])
def test_gguf_in_place_uses_the_files_blocks(original, prompt, tmp_path, monkeypatch, qtype, experts_qtype):
    """smoe.load(file, gguf_in_place=True): every quantized matrix is a view of the file's blocks
    (no copy: q/k keep llama.cpp's row order, RoPE runs over its adjacent pairs), its dequantized
    weight gguf's dequantization bit for bit, and the model's logits those of the same file
    converted to fp32 (q/k reordered to Hugging Face's halves there; the same weights, products and
    attention sums in another order: fp32 rounding)."""
    from smoe.formats.gguf import convert
    from smoe.ggml import GGMLEmbedding, GGMLLinear, StackedGGML

    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    file = write_gguf(original, tmp_path / "m.gguf", qtype, experts_qtype, tokenizer=False)
    model, tokenizer = smoe.load(file, gguf_in_place=True, dtype="fp32", pack=False)  # the reference modules
    assert tokenizer is None  # (the file has none)
    assert not any((d / "config.json").exists() for d in (tmp_path / "cache" / "gguf").glob("*"))  # nothing converted
    reader = gguf.GGUFReader(str(file))
    tensors = {t.name: t for t in reader.tensors}
    cfg = json.loads((original / "config.json").read_text())

    def reference(name):
        t = tensors[name]
        return torch.from_numpy(reference_dequantize(t.data, t.tensor_type).reshape(
            [int(n) for n in reversed(t.shape.tolist())]).astype(np.float32))

    layer = model.layers[1]
    assert isinstance(layer.attn.q_proj, GGMLLinear) and layer.attn.q_proj.kind == qtype
    assert model.rope.pairs  # q/k in the file's row order too: RoPE over llama.cpp's adjacent pairs
    for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        linear = getattr(layer.attn, proj)
        assert torch.equal(linear.weight_in(torch.float32), reference(f"blk.1.{name}.weight"))
        assert _mapped_from(file, linear.blocks), proj
    experts = layer.moe.experts
    assert isinstance(experts.gate_up, StackedGGML) and experts.gate_up.kinds == [experts_qtype] * 2
    for e in (0, cfg["num_local_experts"] - 1):
        gate_up = torch.cat([reference("blk.1.ffn_gate_exps.weight")[e], reference("blk.1.ffn_up_exps.weight")[e]])
        assert torch.equal(experts.gate_up.weight_in(e, torch.float32), gate_up)
        assert torch.equal(experts.down.weight_in(e, torch.float32), reference("blk.1.ffn_down_exps.weight")[e])
    assert all(_mapped_from(file, getattr(stacked, f"blocks{i}"))
               for stacked, parts in ((experts.gate_up, 2), (experts.down, 1)) for i in range(parts))
    assert torch.equal(model.lm_head.weight_in(torch.float32), reference("output.weight"))
    # the embedding stays in its blocks (a view of the file): a looked-up row is gguf's row
    assert isinstance(model.embed_tokens, GGMLEmbedding) and _mapped_from(file, model.embed_tokens.blocks)
    assert torch.equal(model.embed_tokens(prompt)[0], reference("token_embd.weight")[prompt[0]])
    converted = smoe.load(str(convert(file, tmp_path / "converted", dtype=torch.float32, progress=False)))[0]
    with torch.inference_mode():
        ours, theirs = model(prompt).float(), converted(prompt).float()
    assert ours.isfinite().all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_a_tied_head_in_place_reads_the_embeddings_blocks(original, prompt, tmp_path, monkeypatch):
    """A file without output.weight (the head tied to token_embd): in place, the head is a GGMLLinear
    over the embedding's very blocks (nothing dequantized, nothing copied), and the logits are those
    of the file converted (which writes the head as a tensor of its own); the native bf16 model (its
    decode step reading both from those blocks) picks the same tokens."""
    from smoe.formats.gguf import convert
    from smoe.ggml import GGMLEmbedding, GGMLLinear

    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    file = write_gguf(original, tmp_path / "tied.gguf", "Q8_0", "Q4_K", tokenizer=False, head=False)
    model = smoe.load(file, gguf_in_place=True, dtype="fp32", pack=False)[0]
    assert model.config.tie_word_embeddings and isinstance(model.embed_tokens, GGMLEmbedding)
    assert isinstance(model.lm_head, GGMLLinear) and model.lm_head.blocks.data_ptr() == model.embed_tokens.blocks.data_ptr()
    assert _mapped_from(file, model.lm_head.blocks)
    converted = smoe.load(str(convert(file, tmp_path / "converted", dtype=torch.float32, progress=False)))[0]
    native = smoe.load(file, gguf_in_place=True)[0]
    with torch.inference_mode():
        ours, theirs = model(prompt).float(), converted(prompt).float()
        fast = native(prompt).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert (fast.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9


def test_gguf_in_place_says_what_it_does_not_combine_with(original, tmp_path):
    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0", tokenizer=False)
    env = {**os.environ, "SMOE_CACHE": str(tmp_path / "cache")}
    for extra, words in [(["--quant", "int4"], "--quant"), (["--compile"], "--compile")]:
        out = subprocess.run([sys.executable, "-m", "smoe", "generate", "--model", str(file), "--gguf-in-place",
                              "-p", "1 2 3", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 2 and words in out.stderr and "in place" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_tokenizer_rebuilt_from_the_file_gives_the_same_ids(original, tmp_path):
    from smoe.formats.gguf import convert
    from smoe.tokenizer import load_tokenizer

    file = write_gguf(original, tmp_path / "tok.gguf", "F16")
    out = convert(file, tmp_path / "out", progress=False)
    rebuilt = load_tokenizer(out)
    reference = load_tokenizer(v1_tokenizer_path())
    assert (rebuilt.bos_id, rebuilt.eos_id) == (reference.bos_id, reference.eos_id)
    for text in TEXTS:
        assert rebuilt.encode(text) == reference.encode(text), text
        assert rebuilt.decode(reference.encode(text)) == reference.decode(reference.encode(text))


def test_cli_convert_and_model_gguf(original, tmp_path):
    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0")
    env = {"SMOE_CACHE": str(tmp_path / "cache")}
    import os

    env = {**os.environ, **env}

    def smoe_cli(*args):
        return subprocess.run([sys.executable, "-m", "smoe", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    out = smoe_cli("convert", "--from", str(file), "--out", str(tmp_path / "conv"))
    assert out.returncode == 0, out.stderr
    assert "2 layers, 4 experts" in out.stdout and "tokenizer" in out.stdout
    a = smoe_cli("generate", "--model", str(tmp_path / "conv"), "-p", "Hello", "-n", "5", "--ignore-eos", "--json")
    b = smoe_cli("generate", "--model", str(file), "-p", "Hello", "-n", "5", "--ignore-eos", "--json")  # in place
    c = smoe_cli("generate", "--model", str(file), "--no-gguf-in-place", "-p", "Hello", "-n", "5", "--ignore-eos",
                 "--json")
    assert a.returncode == 0 and b.returncode == 0 and c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(c.stdout)["token_ids"]
    assert "converting" not in b.stderr and "converting" in c.stderr
    again = smoe_cli("generate", "--model", str(file), "--no-gguf-in-place", "-p", "Hello", "-n", "5", "--ignore-eos",
                     "--json")
    assert "converting" not in again.stderr  # cached
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    out = smoe_cli("generate", "--model", str(bad), "-p", "x")
    assert out.returncode == 2 and "bad.gguf" in out.stderr and "Traceback" not in out.stderr
    out = smoe_cli("convert", "--from", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "none.gguf" in out.stderr


def test_broken_files_are_one_line_naming_the_tensor(original, tmp_path):
    """A file cut short, a tensor in a type smoe cannot read (IQ2_XXS) and a tensor whose rows are
    not whole blocks: convert raises a CheckpointError naming the file and the tensor and saying
    what to do, leaves no partial directory, and the CLI exits 2 with that one line."""
    from smoe.errors import CheckpointError
    from smoe.formats.gguf import convert

    good = write_gguf(original, tmp_path / "good.gguf", "Q8_0")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 48), dtype=np.uint8), raw_shape=(4, 48),
                      raw_dtype=GGMLQuantizationType.I8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = bytearray(odd.read_bytes())  # the tensor's type id I8 (24) -> Q8_0 (8): 48 values, not blocks of 32
    at = raw.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4 + 2 * 8
    assert raw[at : at + 4] == (24).to_bytes(4, "little")
    raw[at : at + 4] = (8).to_bytes(4, "little")
    odd.write_bytes(bytes(raw))
    iq = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(iq), "llama")
    writer.add_tensor("output.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = {cut: ("blk.1.ffn_down_exps.weight", "truncated"), odd: ("blk.0.attn_q.weight", "whole number"),
             iq: ("output.weight", "IQ2_XXS")}
    for file, (tensor, what) in cases.items():
        with pytest.raises(CheckpointError) as err:
            convert(file, tmp_path / f"{file.stem}-out", progress=False)
        message = str(err.value)
        assert str(file) in message and tensor in message and what in message, message
        assert "\n" not in message
        assert not (tmp_path / f"{file.stem}-out").exists() and not (tmp_path / f"{file.stem}-out.partial").exists()
        out = subprocess.run([sys.executable, "-m", "smoe", "convert", "--from", str(file), "--out",
                              str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and tensor in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_conversion_that_the_disk_cannot_hold_is_refused_up_front(original, tmp_path, monkeypatch):
    """A conversion larger than the free space (Mixtral-8x7B's Q3_K file would become 93 GB of
    bf16) is one line saying how much it needs and where, before anything is written."""
    import collections

    from smoe.errors import CheckpointError
    from smoe.formats import gguf as gguf_format

    file = write_gguf(original, tmp_path / "m.gguf", "Q8_0")
    reader = gguf_format.GGUFFile.open(file)
    need = gguf_format.converted_bytes(reader, None)
    assert need == sum(int(t.n_elements) * (4 if t.kind == "F32" else 2) for t in reader.tensors)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(gguf_format.shutil, "disk_usage", lambda p: usage(need, 0, need - 1))
    with pytest.raises(CheckpointError, match=r"converting it needs .* GB .* are free .*SMOE_CACHE"):
        gguf_format.convert(file, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    monkeypatch.setattr(gguf_format.shutil, "disk_usage", lambda p: usage(need, 0, need))
    gguf_format.convert(file, tmp_path / "out", progress=False)
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert need <= written <= need + 64 * 1024  # the tensors, and safetensors' header


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M", "Q2_K"])  # (every type's blocks: test_ggml_quantize.py)
def test_smoe_quantize_writes_a_gguf_that_reads_back(original, tmp_path, qtype):
    """`smoe quantize --type T --out m.gguf`: the file llama.cpp's converter and quantizer would
    write — its names and metadata read back by `gguf`'s reader, q/k rows interleaved per head, each
    tensor in the preset's type (tensor_type: llama.cpp's rules; 4 experts here, so its dense
    attention rules) holding smoe's quantizer's blocks of the checkpoint's weights (`gguf`'s reference
    quantizer's, for the 32-value types; norms and routers F32), which `gguf`'s reader dequantizes to
    what smoe does — and smoe loading it gives those blocks' dequantized weights, converted or in place."""
    from safetensors.numpy import load_file

    from smoe.formats.gguf import dequantize

    out = tmp_path / "m.gguf"
    run = subprocess.run([sys.executable, "-m", "smoe", "quantize", "--model", str(original), "--type", qtype,
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "tensors" in run.stdout
    cfg = json.loads((original / "config.json").read_text())
    state = load_file(str(original / "model.safetensors"))
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == cfg["num_local_experts"]
    assert reader.fields["llama.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == FILE_TYPES[qtype]
    Q, G, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"]
    layers = cfg["num_hidden_layers"]
    kinds = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        kinds.update({
            f"blk.{i}.attn_q.weight": (llama_permute(state[p + "self_attn.q_proj.weight"], Q), "attn_q"),
            f"blk.{i}.attn_k.weight": (llama_permute(state[p + "self_attn.k_proj.weight"], G), "attn_k"),
            f"blk.{i}.attn_v.weight": (state[p + "self_attn.v_proj.weight"], "attn_v"),
            f"blk.{i}.attn_output.weight": (state[p + "self_attn.o_proj.weight"], "attn_output"),
            f"blk.{i}.ffn_down_exps.weight": (np.stack([state[f"{p}block_sparse_moe.experts.{e}.w2.weight"]
                                                        for e in range(E)]), "ffn_down_exps"),
            f"blk.{i}.ffn_up_exps.weight": (np.stack([state[f"{p}block_sparse_moe.experts.{e}.w3.weight"]
                                                      for e in range(E)]), "ffn_up_exps"),
            f"blk.{i}.ffn_gate_inp.weight": (state[p + "block_sparse_moe.gate.weight"], "ffn_gate_inp"),
        })
    kinds["output.weight"] = (state["lm_head.weight"], "output")
    kinds["token_embd.weight"] = (state["model.embed_tokens.weight"], "token_embd")
    seen = set()
    for name, (w, role) in kinds.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
        kind = tensor_type(qtype, role, w.shape[-1], layer, layers, experts=E, gqa=Q // G)
        t = tensors[name]
        assert t.tensor_type.name == kind, name
        seen.add(kind)
        data = np.asarray(t.data)
        w = w.astype(np.float32)
        if kind == "F32":
            assert np.array_equal(data.reshape(w.shape), w), name
            continue
        if name == "token_embd.weight":  # (32 000 rows: its type is checked; its type's blocks on the others)
            continue
        assert np.array_equal(data.reshape(-1), quantize(w, kind).reshape(-1)), name
        if kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            assert np.array_equal(data.reshape(-1), reference_quantize(w, GGMLQuantizationType[kind]).reshape(-1))
        assert np.array_equal(reference_dequantize(data, t.tensor_type).reshape(w.shape),
                              dequantize(data, kind, w.shape)), name
    assert seen >= {"F32", {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K"}.get(qtype, qtype)}
    from smoe.formats.gguf import convert
    from smoe.loader import build_gguf_model

    model, _ = smoe.load(str(convert(out, tmp_path / "back", dtype=torch.float32, progress=False)), pack=False)
    head, role = kinds["output.weight"]
    kind = tensors["output.weight"].tensor_type.name
    assert torch.equal(model.lm_head.weight, torch.from_numpy(dequantize(
        np.asarray(tensors["output.weight"].data), kind, head.shape)))
    down, _ = kinds["blk.1.ffn_down_exps.weight"]
    t = tensors["blk.1.ffn_down_exps.weight"]
    back = dequantize(np.asarray(t.data), t.tensor_type.name, down.shape)
    assert torch.equal(model.layers[1].moe.experts[3].w2.weight, torch.from_numpy(back[3]))
    ids = torch.tensor([[1, 415, 5565, 302, 4843]])
    # in place in fp32 (the reference modules), q/k reordered to halves as conversion reorders them: the
    # same logits, bit for bit (by default q/k keep the file's order and RoPE runs over its pairs: the
    # same to fp32 rounding, test_gguf_in_place_uses_the_files_blocks)
    in_place = build_gguf_model(out, dtype="fp32", rotary_pairs=False)
    with torch.inference_mode():
        a, b = in_place(ids).float(), model(ids).float()
    assert torch.equal(a, b)


def test_smoe_quantize_to_gguf_refuses_what_it_cannot_write(original, tmp_path):
    def smoe_cli(*args):
        return subprocess.run([sys.executable, "-m", "smoe", "quantize", "--model", str(original), *args],
                              capture_output=True, text=True, timeout=300)

    for args, words in [(["--type", "Q4_0", "--bits", "4", "--out", str(tmp_path / "a.gguf")], "--bits"),
                        (["--type", "Q4_0", "--out", str(tmp_path / "a.bin")], ".gguf"),
                        (["--type", "Q5_K_M", "--out", str(tmp_path / "a.gguf")], "--type"),
                        (["--out", str(tmp_path / "a.gguf")], "--type")]:
        out = smoe_cli(*args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "a.gguf.partial").exists()


def test_byte_level_bpe_tokenizer_rebuilt_from_a_gguf(tmp_path):
    """`tokenizer.ggml.model = gpt2` (tokens + merges), as llama.cpp stores a byte-level BPE such as
    the demo model's: rebuilt, it gives the demo tokenizer's ids."""
    from smoe.formats.gguf import GGUFFile, write_tokenizer
    from smoe.tokenizer import load_tokenizer

    spec = json.loads((smoe.DEMO_MODEL / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    out.mkdir()
    assert write_tokenizer(GGUFFile.open(tmp_path / "tok.gguf"), out)
    rebuilt, reference = load_tokenizer(out), load_tokenizer(smoe.DEMO_MODEL)
    assert (rebuilt.bos_id, rebuilt.eos_id) == (reference.bos_id, reference.eos_id)
    for text in TEXTS:
        assert rebuilt.encode(text) == reference.encode(text), text
        assert rebuilt.decode(reference.encode(text)) == reference.decode(reference.encode(text))


def test_a_quantized_file_runs_in_place_unless_the_load_needs_a_checkpoint(original, tmp_path):
    """gguf_in_place=None (the default): in place for a file whose experts are in block formats;
    converted for F16 experts, or when the load asks for what needs a checkpoint directory."""
    from smoe.loader import LoadOptions, gguf_in_place_for
    from smoe.options import QuantSpec

    quantized = write_gguf(original, tmp_path / "q.gguf", "Q8_0", "Q4_K", tokenizer=False)
    f16 = write_gguf(original, tmp_path / "f.gguf", "F16", tokenizer=False)
    assert gguf_in_place_for(quantized, LoadOptions())
    assert not gguf_in_place_for(f16, LoadOptions())
    assert not gguf_in_place_for(quantized, LoadOptions(quant=QuantSpec(8)))
    assert not gguf_in_place_for(quantized, LoadOptions(device="cuda"))
    assert not gguf_in_place_for(quantized, LoadOptions(gguf_in_place=False))
    assert gguf_in_place_for(quantized, LoadOptions(adapter=tmp_path / "adapter"))  # LoRA wraps the blocks
    assert gguf_in_place_for(f16, LoadOptions(gguf_in_place=True))  # asked: load_gguf_in_place says what it can
    assert not gguf_in_place_for(original, LoadOptions())  # a directory
