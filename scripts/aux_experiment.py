"""Does the load-balancing loss even out expert load? Two short runs, same seed and data,
with and without it; expert load measured on held-out text.

    python scripts/aux_experiment.py --out runs/aux-experiment

Writes result.json: per run, the coefficient of variation of expert load (0 = perfectly
even) per layer and on average, and the largest single-expert share.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smoe.data import read_jsonl
from smoe.routing import observe_routing
from smoe.tokenizer import HFTokenizer
from smoe.train import TrainConfig, expert_load, tokenize_documents, train

MODEL = {
    "vocab_size": 8192, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 256, "sliding_window": 64,
}


@torch.no_grad()
def measure_load(model, tokenizer, docs, tokens: int = 8192) -> dict:
    ids = torch.tensor([t for d in tokenize_documents(docs, tokenizer) for t in d][:tokens])
    model.eval()
    loads = torch.zeros(model.config.num_hidden_layers, model.config.num_local_experts)  # [L, E]
    logits = [None] * model.config.num_hidden_layers

    def keep(layer, router_logits, expert_weights, expert_indices):
        logits[layer] = router_logits

    with observe_routing(model, keep):
        for start in range(0, len(ids) - 128, 128):
            model(ids[None, start : start + 128])
            loads += expert_load(logits, model.config.num_experts_per_tok)
    loads = loads / loads.sum(-1, keepdim=True)  # [L, E] share of slots
    cv = (loads.std(-1, unbiased=False) / loads.mean(-1)).tolist()
    return {"cv_per_layer": [round(c, 3) for c in cv], "cv_mean": round(sum(cv) / len(cv), 3),
            "max_share": round(loads.max().item(), 3), "load": [[round(x, 3) for x in row] for row in loads.tolist()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/aux-experiment"))
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    tokenizer = HFTokenizer(args.corpus / "tokenizer.json")
    heldout = read_jsonl(args.corpus / "heldout.jsonl")
    result = {"steps": args.steps, "model": MODEL}
    runs = (("per_layer", 0.02, True), ("pooled", 0.02, False), ("without_aux", 0.0, True))
    for name, coef, per_layer in runs:
        cfg = TrainConfig(out=str(args.out / name), model=MODEL, train_data=str(args.corpus / "train.jsonl"),
                          heldout_data=None, tokenizer=str(args.corpus / "tokenizer.json"), seq_len=128,
                          batch_size=8, max_steps=args.steps, warmup_steps=30, lr=3e-3, min_lr=3e-4,
                          aux_loss_coef=coef, aux_loss_per_layer=per_layer, save_every=10**9, log_every=50,
                          threads=args.threads)
        summary = train(cfg, progress=False)
        final = [h for h in summary["history"] if "ce" in h][-1]
        result[name] = {"aux_loss_coef": coef, "per_layer": per_layer, "final_train_ce": final["ce"],
                        **measure_load(summary["model"], tokenizer, heldout)}
        print(name, result[name]["cv_mean"], result[name]["max_share"], final["ce"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
