"""`make run`'s generation speed: the native kernels in each variant this CPU runs against the
PyTorch fallback (SMOE_NATIVE=0), each run its own process, interleaved, best and median of
--repeats.

    python benchmarks/bench_make_run.py --repeats 5
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/bench_make_run.py --variants avx2,avx2-vnni --base-src /tmp/old-checkout

The command is the Makefile's `run` (the demo model, "The meaning of life is", 80 tokens at
temperature 0.7, top-p 0.9, seed 0); its last line reports generation tokens/s. --base-src runs
the fallback once more from another checkout's sources (e.g. a `git worktree` of an older
commit), so "the fallback before a change" is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["-m", "smoe", "generate", "--prompt", "The meaning of life is", "--max-tokens", "80",
           "--temperature", "0.7", "--top-p", "0.9", "--seed", "0"]


def generation_tok_s(env: dict, src: Path) -> tuple[float, int]:
    env = {**os.environ, **env, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, *COMMAND], env=env, cwd=src, capture_output=True, text=True, check=True)
    m = re.search(r"generation: (\d+) tokens, ([\d.]+) tokens/s", out.stdout + out.stderr)
    if m is None:
        raise RuntimeError(f"no generation figure in:\n{out.stdout}\n{out.stderr}")
    return float(m.group(2)), int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=None, help="comma-separated SMOE_ISA names (default: every one this CPU runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base-src", type=Path, default=None, help="another checkout whose fallback to measure too")
    args = p.parse_args()
    if args.variants is None:
        from smoe.kernels import ops
        variants = ops.variants()
    else:
        variants = args.variants.split(",")
    configs = [("fallback", {"SMOE_NATIVE": "0"}, ROOT)]
    if args.base_src is not None:
        configs.append((f"fallback ({args.base_src.name})", {"SMOE_NATIVE": "0"}, args.base_src.resolve()))
    configs += [(f"native {v}", {"SMOE_ISA": v}, ROOT) for v in variants]
    results: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        for label, env, src in configs:
            tok_s, n = generation_tok_s(env, src)
            results[label].append(tok_s)
            tokens[label] = n
            print(f"run {r + 1}/{args.repeats}  {label:<28} {tok_s:7.1f} tok/s ({n} tokens)", flush=True)
    base = max(results["fallback"])
    print("\n| run | generated tokens | best tok/s | median tok/s | best vs fallback |\n|---|---|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {tokens[label]} | {max(values):.1f} | {statistics.median(values):.1f} | "
              f"{max(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
