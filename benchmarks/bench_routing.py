"""What routing traces cost: decode tokens/s with tracing off and on, interleaved, best of N.

    python benchmarks/bench_routing.py [--checkpoint DIR] [--repeats 5]

"Off" is the normal engine: each MoE layer checks `self.trace is not None` once per
forward. That check is also timed on its own, to bound what tracing costs when off.
"""

from __future__ import annotations

import argparse
import sys
import timeit

import torch

import smoe
from smoe.routing import trace_routing


def decode_tps(model, prompt, n, trace: bool) -> float:
    if trace:
        with trace_routing(model):
            return smoe.generate(model, None, prompt, max_tokens=n, ignore_eos=True).decode_tokens_per_s
    return smoe.generate(model, None, prompt, max_tokens=n, ignore_eos=True).decode_tokens_per_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="default: the bundled demo model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    model, _ = smoe.load(args.checkpoint)
    prompt = torch.randint(3, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    decode_tps(model, prompt, 8, False)
    best = {"off": 0.0, "on": 0.0}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            best[mode] = max(best[mode], decode_tps(model, prompt, args.tokens, mode == "on"))
    moe = model.layers[0].moe
    check_s = min(timeit.repeat(lambda: moe.trace is not None, number=100_000, repeat=5)) / 100_000
    per_token_check = check_s * len(model.layers)
    print(f"checkpoint: {args.checkpoint or 'demo'}; decode tokens/s, best of {args.repeats}:")
    print(f"  tracing off {best['off']:.1f}, tracing on {best['on']:.1f} ({best['on'] / best['off'] - 1:+.1%})")
    print(f"  the off-check: {per_token_check * 1e9:.0f} ns per token = "
          f"{per_token_check * best['off']:.5%} of a decode step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
