"""Quality of quantization: held-out perplexity per domain of the demo model in bf16, int8
and int4 (group 32, 64, 128) with the output head in bf16 (+keephead), and the defaults
(int8, int4: groups of 64) with the head int8.

    python benchmarks/bench_quality.py                       # the demo's held-out slice
    python benchmarks/bench_quality.py --heldout data/corpus/heldout.jsonl --tokens 8192

Every variant computes in bf16 (the quantized weights are dequantized into bf16); each
domain's documents are concatenated and scored in non-overlapping 256-token windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VARIANTS = ("bf16", "int8+keephead", "int4-g32+keephead", "int4-g64+keephead", "int4-g128+keephead", "int8", "int4")


def main() -> int:
    import smoe
    from smoe.data import read_jsonl
    from smoe.tokenizer import HFTokenizer
    from smoe.train import heldout_perplexity

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", type=Path, default=smoe.DEMO_MODEL / "eval_slice.jsonl")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "quality")
    args = p.parse_args()
    torch.set_num_threads(2)
    docs = read_jsonl(args.heldout)
    tokenizer = HFTokenizer(smoe.DEMO_MODEL / "tokenizer.json")
    results = {}
    for variant in VARIANTS:
        model, _ = smoe.load(dtype="bf16", quant=None if variant == "bf16" else variant, pack=False)
        results[variant] = heldout_perplexity(model, tokenizer, docs, 256, args.tokens)
        print(variant, results[variant], flush=True)
    domains = sorted(results["bf16"])
    lines = ["| weights | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for variant in VARIANTS:
        cells = []
        for d in domains:
            ppl, ref = results[variant][d], results["bf16"][d]
            cells.append(f"{ppl:.2f}" if variant == "bf16" else f"{ppl:.2f} ({ppl / ref - 1:+.2%})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
