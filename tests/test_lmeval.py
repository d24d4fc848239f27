"""lm-evaluation-harness against `smoe serve` scores what its `hf` backend scores on the same
demo checkpoint: a loglikelihood task through `local-completions` (echo + logprobs, the server's
own tokenizer through /tokenize), a generate_until task through `local-completions` and
`local-chat-completions`. Both sides in fp32, so per-sample log-likelihoods agree to 1e-4 and
greedy generations are identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import smoe
from serving import Server

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "lmeval"
LIMIT = 20  # documents per task on both sides (the loglikelihood task has 40; each asks the server's /tokenize)
MC, GEN = "smoe_continuations_mc", "smoe_continuations_gen"
# the Mistral v1 instruct format as a Hugging Face chat template (smoe renders it itself)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                 "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def write_tasks(root: Path) -> None:
    common = "test_split: test\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
    (root / "mc.yaml").write_text(
        f"task: {MC}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA / 'continuations_mc.jsonl'}\n"
        f"{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        f"task: {GEN}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA / 'continuations_gen.jsonl'}\n"
        f"{common}output_type: generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n"
        "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n")


def hf_checkpoint(root: Path) -> Path:
    """The demo model as transformers reads it, with a tokenizer_config.json naming BOS/EOS and the chat template."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (root / name).symlink_to(smoe.DEMO_MODEL / name)
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def scores(result: dict) -> dict:
    """task -> (metric value, per-sample responses)."""
    out = {}
    for task, samples in result["samples"].items():
        metric = "acc,none" if task == MC else "exact_match,none"
        out[task] = (result["results"][task][metric], [s["filtered_resps"] for s in samples])
    return out


def test_lm_eval_through_the_server_scores_like_the_hf_backend(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_tasks(tmp_path)
    tm = TaskManager(include_path=str(tmp_path))
    (tmp_path / "hf").mkdir()
    hf = HFLM(pretrained=str(hf_checkpoint(tmp_path / "hf")), dtype="float32", device="cpu", batch_size=8)
    # the chat template renders the task's prompts to the ids smoe's own template gives
    tok = smoe.load()[1]
    for line in (DATA / "continuations_gen.jsonl").read_text().splitlines():
        messages = [{"role": "user", "content": json.loads(line)["context"]}]
        assert hf.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == \
            tok.apply_chat_template(messages)
    reference = scores(lm_eval.simple_evaluate(model=hf, tasks=[MC, GEN], task_manager=tm, log_samples=True,
                                               limit=LIMIT))
    chat_reference = scores(lm_eval.simple_evaluate(model=hf, tasks=[GEN], task_manager=tm, log_samples=True,
                                                    apply_chat_template=True))

    server = Server("--dtype", "fp32", "--max-batch", "4", key=None)
    try:
        completions = scores(lm_eval.simple_evaluate(
            model="local-completions", tasks=[MC, GEN], task_manager=tm, log_samples=True, limit=LIMIT,
            model_args=f"base_url={server.url}/v1/completions,model=smoe-demo,num_concurrent=4,batch_size=4"))
        chat = scores(lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=[GEN], task_manager=tm, log_samples=True, apply_chat_template=True,
            model_args=f"base_url={server.url}/v1/chat/completions,model=smoe-demo,num_concurrent=4"))
    finally:
        server.stop()

    acc, hf_acc = completions[MC][0], reference[MC][0]
    assert abs(acc - hf_acc) <= 0.005, (acc, hf_acc)
    for mine, theirs in zip(completions[MC][1], reference[MC][1], strict=True):  # each choice's log-likelihood
        assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert completions[GEN] == reference[GEN]
    assert chat[GEN] == chat_reference[GEN]
