"""Ship a training run as the bundled demo model: smoe/assets/demo/ in Hugging Face layout.

    python scripts/export_demo.py --run runs/demo --corpus data/corpus

Writes config.json, model.safetensors (bf16), tokenizer.json, generation_config.json,
eval_slice.jsonl (the fixed held-out slice the tests re-score) and README.md (the model
card: data, config, steps, wall time, losses, held-out perplexity per domain, samples,
expert-load figures of scripts/aux_experiment.py, and the command that reproduces it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

import smoe
from smoe.checkpoint import atomic_write, save_checkpoint
from smoe.data import read_jsonl, write_jsonl
from smoe.loader import build_model
from smoe.tokenizer import HFTokenizer
from smoe.train import heldout_perplexity, tokenize_documents

DEMO = Path(smoe.__file__).parent / "assets" / "demo"
SLICE_TOKENS = 4096  # predictions scored per domain
SLICE_SEQ_LEN = 256
SAMPLES = [
    ("Q: What is the meaning of life?\nA:", 0),
    ("Der Mensch ist", 0),
    ("def read_config(path):\n", 0),
]


def eval_slice(heldout: list[dict], tokenizer) -> list[dict]:
    """The first held-out documents of each domain, enough for SLICE_TOKENS predictions."""
    chosen, counts = [], Counter()
    for doc, tokens in zip(heldout, tokenize_documents(heldout, tokenizer), strict=True):
        if counts[doc["domain"]] <= SLICE_TOKENS:
            chosen.append({"domain": doc["domain"], "source": doc["source"], "text": doc["text"]})
            counts[doc["domain"]] += len(tokens)
    return chosen


def unigram_perplexity(docs: list[dict], tokenizer) -> dict[str, float]:
    """exp(entropy) of each domain's token frequencies on the slice itself (a generous baseline)."""
    out = {}
    for domain in sorted({d["domain"] for d in docs}):
        tokens = [t for d in tokenize_documents([x for x in docs if x["domain"] == domain], tokenizer) for t in d]
        tokens = tokens[: SLICE_TOKENS + 1][1:]
        counts = Counter(tokens)
        n = len(tokens)
        out[domain] = round(math.exp(-sum(c / n * math.log(c / n) for c in counts.values())), 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--aux-experiment", type=Path, default=Path("runs/aux-experiment/result.json"))
    p.add_argument("--out", type=Path, default=DEMO)
    args = p.parse_args()

    ckpt = args.run / (args.run / "latest").read_text().strip()
    history = json.loads((ckpt / "history.json").read_text())
    train_cfg = json.loads((args.run / "train_config.json").read_text())
    summary = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").exists() else {}

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(ckpt, dtype=torch.float32)
    save_checkpoint(model, out, dtype="bf16")
    shutil.copy(args.corpus / "tokenizer.json", out / "tokenizer.json")
    if (args.run / "loss.png").exists():
        shutil.copy(args.run / "loss.png", out / "loss.png")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "max_length": model.config.max_position_embeddings,
                  "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    atomic_write(out / "generation_config.json", lambda f: f.write_text(json.dumps(generation, indent=2) + "\n"))

    tokenizer = HFTokenizer(out / "tokenizer.json")
    slice_docs = eval_slice(read_jsonl(args.corpus / "heldout.jsonl"), tokenizer)
    write_jsonl(out / "eval_slice.jsonl", slice_docs)

    shipped, tok = smoe.load(out)  # what users get: bf16, packed for the CPU
    perplexity = heldout_perplexity(shipped, tok, slice_docs, SLICE_SEQ_LEN, SLICE_TOKENS)
    unigram = unigram_perplexity(slice_docs, tok)
    samples = []
    for prompt, seed in SAMPLES:
        r = smoe.generate(shipped, tok, prompt, max_tokens=60, temperature=0.7, top_p=0.9, seed=seed)
        samples.append((prompt, r.text))
    evals = {"slice": {"tokens_per_domain": SLICE_TOKENS, "seq_len": SLICE_SEQ_LEN,
                       "perplexity": perplexity, "unigram_perplexity": unigram}}
    atomic_write(out / "eval.json", lambda f: f.write_text(json.dumps(evals, indent=2) + "\n"))

    aux = json.loads(args.aux_experiment.read_text()) if args.aux_experiment.exists() else None
    card = model_card(model.config, train_cfg, history, summary, perplexity, unigram, samples, aux,
                      (out / "model.safetensors").stat().st_size)
    atomic_write(out / "README.md", lambda f: f.write_text(card))
    print(card)
    return 0


def model_card(config, train_cfg, history, summary, perplexity, unigram, samples, aux, size) -> str:
    train = [h for h in history if "ce" in h]
    evals = [h for h in history if "eval" in h]
    counts = config.parameter_counts()
    last = train[-1]
    final_ce = sum(h["ce"] for h in train[-10:]) / len(train[-10:])
    wall = summary.get("wall_s")
    lines = [
        "# smoe demo model", "",
        "A small Mixtral (sparse mixture of experts) trained from scratch by smoe on this",
        "repository's 2-core CPU, offline, so that `make run` shows real text with no download.",
        "It is a toy: it writes fortune-cookie-like English, German, Italian and Spanish, and",
        "Python that looks like the standard library. It is not an instruction-following model.", "",
        "## Reproduce", "",
        "```", "make demo", "```", "",
        "which runs `python scripts/build_corpus.py --out data/corpus`, `python scripts/aux_experiment.py`,",
        "`smoe train --config configs/demo.json` and `python scripts/export_demo.py`.", "",
        "## Data", "",
        "Built offline by `python scripts/build_corpus.py` (see `scripts/build_corpus.py`): Debian packages `fortunes`",
        "(English, BSD fortune cookies; texts presumed public domain), `fortunes-de` (German, GPL-2+),",
        "`fortunes-it` (Italian, \"freeware (public domain)\"), `fortunes-es` (Spanish, texts presumed",
        "public domain), fetched with `apt-get download` and unpacked with `dpkg -x`; and ~3 MB of the",
        "Python 3.11 standard library (PSF licence), tests excluded. One document per cookie or module,",
        "5 % held out per domain by a hash of the text.", "",
        "## Model", "",
        "| field | value |", "|---|---|",
        f"| architecture | Mixtral (`MixtralForCausalLM`), {config.num_local_experts} experts, top-{config.num_experts_per_tok} |",
        f"| layers / hidden / expert ffn | {config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size} |",
        f"| heads / kv heads / head dim | {config.num_attention_heads} / {config.num_key_value_heads} / {config.head_dim} (GQA) |",
        f"| RoPE theta / sliding window / context | {config.rope_theta:g} / {config.sliding_window} / {config.max_position_embeddings} |",
        f"| vocabulary | {config.vocab_size} (byte-level BPE trained on the corpus; `<unk>`=0, `<s>`=1, `</s>`=2) |",
        f"| parameters | {counts['total'] / 1e6:.1f} M total, {counts['active'] / 1e6:.1f} M active per token |",
        f"| file | `model.safetensors`, bf16, {size / 1e6:.1f} MB |", "",
        "## Training", "",
        f"{last['step']} steps of {train_cfg['batch_size'] * train_cfg['grad_accum']} × {train_cfg['seq_len']} tokens "
        f"({last['step'] * train_cfg['batch_size'] * train_cfg['grad_accum'] * train_cfg['seq_len'] / 1e6:.1f} M tokens), "
        f"AdamW (lr {train_cfg['lr']:g} → {train_cfg['min_lr']:g}, warmup {train_cfg['warmup_steps']}, cosine; "
        f"weight decay {train_cfg['weight_decay']}; clip {train_cfg['grad_clip']}), bf16 autocast, "
        f"load-balancing loss × {train_cfg['aux_loss_coef']}, router z-loss × {train_cfg['z_loss_coef']}, seed {train_cfg['seed']}.",
        "",
        f"- wall time: {wall / 60:.0f} min on 2 CPU cores" if wall else "- wall time: (not recorded)",
        f"- final training cross-entropy (mean of the last 10 logged steps): {final_ce:.3f} nats/token",
        f"- final load-balancing loss: {last['aux']:.3f} (top-{config.num_experts_per_tok}: {config.num_experts_per_tok}.0 = perfectly even)",
        "", "![loss curve](loss.png)", "",
        "## Held-out perplexity", "",
        f"On the fixed slice in `eval_slice.jsonl`: the first {SLICE_TOKENS} predicted tokens of each domain's held-out",
        f"documents, in windows of {SLICE_SEQ_LEN} tokens, scored with the shipped bf16 weights",
        "(`tests/test_demo.py` recomputes these). The unigram baseline is exp(entropy) of the slice's own",
        "token frequencies under the same tokenizer.", "",
        "| domain | perplexity | unigram baseline |", "|---|---|---|",
        *[f"| {d} | {perplexity[d]:.2f} | {unigram[d]:.1f} |" for d in sorted(perplexity)], "",
    ]
    if evals:
        lines += ["During training, on 8192 held-out tokens per domain:", "",
                  "| step | " + " | ".join(sorted(evals[0]["eval"])) + " |",
                  "|---|" + "---|" * len(evals[0]["eval"])]
        lines += [f"| {h['step']} | " + " | ".join(f"{h['eval'][d]:.2f}" for d in sorted(h["eval"])) + " |"
                  for h in evals]
        lines.append("")
    if aux:
        names = {"per_layer": "per-layer aux loss (smoe's default)", "pooled": "pooled aux loss (transformers' formulation)",
                 "without_aux": "no aux loss"}
        lines += [
            "## Does the load-balancing loss even out expert load?", "",
            f"`scripts/aux_experiment.py`: {aux['steps']}-step runs of a smaller model (hidden "
            f"{aux['model']['hidden_size']}, {aux['model']['num_hidden_layers']} layers, 8 experts, top-2), same seed and data, "
            "differing only in the load-balancing loss; load = share of top-2 slots per expert, per layer, on 8192 "
            "held-out tokens. CV = coefficient of variation of the 8 loads (0 = perfectly even), averaged over layers.", "",
            "| run | coefficient | CV of expert load | largest expert share in a layer | final train CE |",
            "|---|---|---|---|---|",
        ]
        for key in ("per_layer", "pooled", "without_aux"):
            if key in aux:
                r = aux[key]
                lines.append(f"| {names[key]} | {r['aux_loss_coef']} | {r['cv_mean']:.3f} | {r['max_share']:.3f} | "
                             f"{r['final_train_ce']:.3f} |")
        lines += ["", "transformers' `load_balancing_loss_func` pools the statistics of all layers before multiplying, so "
                  "layers that each collapse onto different experts look balanced to it; the per-layer loss "
                  "(mean over layers of the same quantity, as the Switch Transformer adds one loss per MoE layer) "
                  "sees them. A top-2 share of 0.5 means every token of that layer picks that expert.", ""]
    lines += ["## Samples", "", "Temperature 0.7, top-p 0.9, seed 0, 60 tokens:", ""]
    for prompt, text in samples:
        lines += ["```", prompt + text, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
