"""Fine-tuning: held-out perplexity before/after, speed and peak memory of full, LoRA and QLoRA.

    python benchmarks/bench_finetune.py --model smoe/assets/demo --data it_train.jsonl \
        --heldout it_heldout.jsonl --steps 150 --out benchmarks/out/finetune-demo

Each method runs in its own process (so one's memory cannot hide in another's peak) through
the same `smoe.train.train` that `smoe finetune` calls. Peak memory is the process's
high-water resident set (VmHWM) at the end; `baseline` is the RSS after importing torch and
smoe, before any model is loaded. Results: a JSON file and a markdown table in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("full", "lora", "qlora")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(args) -> dict:
    import torch

    from smoe.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    baseline = rss_kib("VmRSS")
    lora = None if args.one == "full" else {
        "rank": args.rank, "alpha": 2.0 * args.rank, "targets": args.targets.split(","),
        "quantize": "nf4" if args.one == "qlora" else None,
    }
    lr = args.lr_full if args.one == "full" else args.lr
    cfg = TrainConfig(
        out=str(args.out / f"run-{args.one}{'-gc' if args.gradient_checkpointing else ''}"),
        init_from=str(args.model), train_data=str(args.data), heldout_data=args.heldout and str(args.heldout),
        tokenizer=None, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
        lr=lr, min_lr=lr / 10,
        warmup_steps=min(10, args.steps // 10), weight_decay=0.0, log_every=1, eval_every=args.steps,
        save_every=args.steps, eval_tokens=args.eval_tokens, gradient_checkpointing=args.gradient_checkpointing,
        lora=lora, seed=0,
    )
    start = time.perf_counter()
    summary = train(cfg, progress=False)
    wall = time.perf_counter() - start
    model = summary["model"]
    history = summary["history"]
    evals = [h for h in history if "eval" in h]
    steps = [h for h in history if "tokens_per_s" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "method": args.one, "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
        "ppl_before": evals[0]["eval"], "ppl_after": evals[-1]["eval"],
        "tokens_per_s": round(sorted(h["tokens_per_s"] for h in steps)[len(steps) // 2], 1),  # median step
        "wall_s": round(wall, 1), "trainable_params": trainable, "model_bytes": stored,
        "peak_rss_mib": round(rss_kib("VmHWM") / 1024), "baseline_rss_mib": round(baseline / 1024),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--heldout", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA / QLoRA learning rate")
    p.add_argument("--lr-full", type=float, default=1e-4, help="full fine-tuning learning rate")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--with-checkpointing", action="store_true", help="also run each method with gradient checkpointing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for method in args.methods.split(","):
        for gc in (False, True) if args.with_checkpointing else (args.gradient_checkpointing,):
            cmd = [sys.executable, __file__, "--one", method, *sys.argv[1:]]
            cmd = [c for c in cmd if c not in ("--with-checkpointing", "--gradient-checkpointing")]
            cmd += ["--gradient-checkpointing"] if gc else []
            print(f"running {method}{' + gradient checkpointing' if gc else ''} ...", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| method | grad. ckpt | steps | held-out ppl before → after | trainable params | tokens/s | "
             "peak RSS (MiB) | baseline RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ppl = ", ".join(f"{d} {r['ppl_before'][d]:.2f} → {p:.2f}" for d, p in r["ppl_after"].items())
        lines.append(f"| {r['method']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['steps']} | {ppl} | "
                     f"{r['trainable_params']:,} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']} | "
                     f"{r['baseline_rss_mib']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
