"""smoe finetune: adapters trained by smoe load in peft with the same logits; chat data trains
only assistant tokens; resume retraces; bad data names the file and line."""

from __future__ import annotations

import json

import pytest
import torch

from smoe.cli import main
from smoe.data import read_examples, split_heldout
from smoe.errors import SmoeError
from smoe.loader import build_model
from smoe.lora import apply_lora, load_adapter, lora_modules, merge_lora, save_adapter, unmerge_lora
from smoe.options import LoraSpec
from smoe.tokenizer import SentencePieceTokenizer, chat_training_ids
from smoe.train import ExampleStream, TrainConfig, train

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse mixtures of experts route each token to two of eight experts.",
    "Il gatto dorme sul divano mentre piove.",
    "def add(a, b):\n    return a + b\n",
] * 10

CHATS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Italy?"},
                  {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And France?"},
                  {"role": "assistant", "content": "Paris."}]},
] * 12


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(model_dir, data, out, *extra):
    return main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--seq-len", "64", "--batch-size", "4", *extra])


def test_peft_loads_an_adapter_trained_by_smoe(chat_checkpoint, tmp_path, capsys):
    pytest.importorskip("peft")
    from conftest import peft_logits

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--max-steps", "4", "--lr", "1e-2",
                    "--targets", "attention", "--lora-rank", "4") == 0
    assert "held-out perplexity" in capsys.readouterr().out
    adapter = tmp_path / "run"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and config["r"] == 4

    ids = torch.randint(0, 32000, (2, 13), generator=torch.Generator().manual_seed(0))
    model = build_model(chat_checkpoint)
    load_adapter(model, adapter)
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())  # training moved B
    expected, plain = peft_logits(chat_checkpoint, adapter, ids)
    with torch.no_grad():
        got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (expected - plain).abs().max().item() > 1e-3  # the trained adapter changes the output


def test_chat_examples_learn_only_assistant_tokens(chat_checkpoint):
    tokenizer = SentencePieceTokenizer(chat_checkpoint / "tokenizer.model")
    messages = CHATS[1]["messages"]
    ids, trained = chat_training_ids(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages)
    answers = [i for i, t in zip(ids, trained, strict=True) if t]
    assert answers == tokenizer.encode("Rome.", bos=False) + [2] + tokenizer.encode("Paris.", bos=False) + [2]

    stream = ExampleStream([chat_training_ids(tokenizer, c["messages"]) for c in CHATS[:2]], 64, 0, pad_id=2)
    x, y, valid = stream.rows([0, 1])
    assert x.shape == y.shape == valid.shape == (2, len(ids) - 1)
    assert valid[0].sum() == len(chat_training_ids(tokenizer, CHATS[0]["messages"])[0]) - 1
    assert y[1][y[1] != -100].tolist() == answers  # targets are exactly the assistant tokens
    assert (y[0][~valid[0]] == -100).all()  # padding learns nothing


def test_chat_masks_agree_with_mistral_common(chat_checkpoint):
    pytest.importorskip("mistral_common")
    from smoe.tokenizer import MistralCommonTokenizer

    sp = SentencePieceTokenizer(chat_checkpoint / "tokenizer.model")
    mc = MistralCommonTokenizer(chat_checkpoint / "tokenizer.model")
    for chat in CHATS[:2]:
        assert chat_training_ids(mc, chat["messages"]) == chat_training_ids(sp, chat["messages"])


def test_chat_finetune_lowers_assistant_loss(chat_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--chat", "--max-steps", "6", "--lr", "3e-2",
                    "--targets", "q_proj,v_proj,w2,router", "--eval-every", "6") == 0
    history = json.loads((tmp_path / "run" / "ckpt-0000006" / "history.json").read_text())
    evals = [h["eval"]["assistant"] for h in history if "eval" in h]
    assert evals[-1] < evals[0]  # the held-out conversations repeat the training ones
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["smoe_expert_targets"] == ["w2"] and config["smoe_router"] is True


def test_resume_retraces_an_uninterrupted_lora_run(chat_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])

    def cfg(out, **kw):
        return TrainConfig(out=str(out), init_from=str(chat_checkpoint), train_data=str(data), tokenizer=None,
                           heldout_data=None, seq_len=32, batch_size=2, max_steps=4, lr=1e-2, warmup_steps=1,
                           save_every=2, eval_every=2, log_every=1, autocast="none",
                           lora={"rank": 2, "alpha": 4, "targets": ["q_proj", "w1"], "dropout": 0.1}, **kw)

    straight = train(cfg(tmp_path / "a"), progress=False)["model"]
    train(cfg(tmp_path / "b"), progress=False, stop_after=2)
    assert (tmp_path / "b" / "latest").read_text().strip() == "ckpt-0000002"
    assert not (tmp_path / "b" / "ckpt-0000002" / "model.safetensors").exists()  # adapter-only checkpoints
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False)["model"]
    a, b = lora_modules(straight), lora_modules(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].lora_B.weight, b[name].lora_B.weight), name


def test_qlora_trains_adapters_over_an_nf4_base(chat_checkpoint, tmp_path):
    from smoe.nf4 import NF4Linear

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    cfg = TrainConfig(out=str(tmp_path / "q"), init_from=str(chat_checkpoint), train_data=str(data), tokenizer=None,
                      heldout_data=None, seq_len=32, batch_size=2, max_steps=3, lr=1e-2, warmup_steps=0,
                      save_every=3, eval_every=3, lora={"rank": 2, "targets": ["attention"], "quantize": "nf4"})
    model = train(cfg, progress=False)["model"]
    assert isinstance(model.layers[0].attn.q_proj.base, NF4Linear)
    assert isinstance(model.layers[0].moe.experts[0].w1, NF4Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    trained = build_model(chat_checkpoint)  # the adapter also applies to the unquantized base
    load_adapter(trained, tmp_path / "q")
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(trained).values())


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint_factory):
    from smoe.train import train_step_loss

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(out="unused", init_from="x", autocast="none", aux_loss_coef=0.1)
    grads = []
    for checkpointing in (False, True):
        model = build_model(checkpoint_factory())
        apply_lora(model, LoraSpec(rank=2, alpha=4, targets=("q_proj", "w1", "router",)))
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(2))
        model.gradient_checkpointing = checkpointing
        model.train()
        loss, _ = train_step_loss(model, ids[:, :-1], ids[:, 1:], cfg)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_router_lora_merges_and_round_trips(checkpoint_factory, tmp_path):
    path = checkpoint_factory()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    base = build_model(path)(ids)
    model = build_model(path)
    apply_lora(model, LoraSpec(rank=2, alpha=2, targets=("router",)))
    assert torch.equal(model(ids), base)  # B = 0: routing unchanged
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=1.0, generator=torch.Generator().manual_seed(4))
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-3  # different routing, different output
    save_adapter(model, tmp_path / "r")
    reloaded = build_model(path)
    load_adapter(reloaded, tmp_path / "r")
    assert torch.equal(reloaded(ids), adapted)
    merge_lora(model)
    assert (model(ids) - adapted).abs().max().item() <= 1e-5
    unmerge_lora(model)
    assert (model(ids) - adapted).abs().max().item() <= 1e-5


def test_bad_data_names_the_file_and_line(chat_checkpoint, tmp_path, capsys):
    cases = {
        "broken.jsonl": ('{"text": "ok"}\n{"text": oops}\n', [], "broken.jsonl:2: invalid JSON"),
        "missing.jsonl": ('{"text": "ok"}\n\n{"body": "x"}\n', [], "missing.jsonl:3: missing field 'text'"),
        "chat_as_text.jsonl": (json.dumps(CHATS[0]) + "\n", [], "add --chat"),
        "empty.jsonl": ("\n", [], "empty.jsonl: the file is empty"),
        "no_answer.jsonl": ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["--chat"],
                            "no_answer.jsonl:1: no assistant message"),
        "bad_role.jsonl": ('{"messages": [{"role": "bot", "content": "hi"}]}\n', ["--chat"],
                           "bad_role.jsonl:1: message 0: 'role' must be"),
    }
    for name, (content, flags, message) in cases.items():
        (tmp_path / name).write_text(content)
        code = finetune(chat_checkpoint, tmp_path / name, tmp_path / f"out-{name}", "--max-steps", "1", *flags)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err)
        assert "Traceback" not in err
    assert finetune(chat_checkpoint, tmp_path / "nope.jsonl", tmp_path / "o", "--max-steps", "1") == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert finetune(chat_checkpoint, tmp_path / "broken.jsonl", tmp_path / "o", "--lora-rank", "0") == 2
    assert "--lora-rank must be at least 1" in capsys.readouterr().err
    assert finetune(chat_checkpoint, tmp_path / "broken.jsonl", tmp_path / "o", "--targets", "gate_proj") == 2
    assert "unknown LoRA target 'gate_proj'" in capsys.readouterr().err


def test_plain_text_file_and_heldout_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "book.txt").write_text(text)
    docs = read_examples(tmp_path / "book.txt")
    assert docs == [{"text": text}]
    train_docs, heldout = split_heldout(docs)
    assert train_docs[0]["text"] + heldout[0]["text"] == text and heldout[0]["text"].startswith("line 9")
    rows = [{"text": str(i)} for i in range(40)]
    train_rows, held = split_heldout(rows)
    assert len(held) == 2 and len(train_rows) == 38 and not set(map(str, held)) & set(map(str, train_rows))
    with pytest.raises(SmoeError, match="empty"):
        (tmp_path / "blank.txt").write_text("  \n")
        read_examples(tmp_path / "blank.txt")


def test_refuses_to_overwrite_a_run_without_resume(chat_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--max-steps", "1") == 0
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--max-steps", "2") == 2
    assert "add --resume" in capsys.readouterr().err
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--max-steps", "2", "--resume") == 0
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-0000002"


def test_full_finetune_writes_model_checkpoints(chat_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    assert finetune(chat_checkpoint, data, tmp_path / "run", "--full", "--max-steps", "2", "--lr", "1e-3") == 0
    assert "model checkpoints in" in capsys.readouterr().out
    ckpt = tmp_path / "run" / "ckpt-0000002"
    assert (ckpt / "model.safetensors").exists() and not (tmp_path / "run" / "adapter_config.json").exists()
    trained, base = build_model(ckpt), build_model(chat_checkpoint)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("experts" in n for n in changed) and any("attn" in n for n in changed)  # every weight trains
    assert finetune(chat_checkpoint, data, tmp_path / "x", "--full", "--qlora", "--max-steps", "1") == 2
    assert "exclude each other" in capsys.readouterr().err
