"""smoe vs transformers on one random Mixtral checkpoint, in the same run.

    python benchmarks/bench_core.py                      # bf16 and fp32, best of 3
    python benchmarks/bench_core.py --dtypes bf16 --repeats 5

Decode: tokens/s over 128 greedy tokens after a 32-token prompt (the first token, which
comes out of prefill, is not counted). Prefill: tokens/s for a 512-token prompt up to its
first token's logits. Engines are interleaved and the best of --repeats runs is kept,
because this machine's memory bandwidth swings between runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from random_checkpoint import write  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def smoe_decode(model, prompt, n):
    import smoe

    return smoe.generate(model, None, prompt, max_tokens=n, ignore_eos=True).decode_tokens_per_s


def smoe_prefill(model, prompt):
    import smoe

    return smoe.generate(model, None, prompt, max_tokens=1).prefill_tokens_per_s


def hf_decode(model, prompt, n):
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    return (n - 1) / ((t2 - t1) - (t1 - t0))


def hf_prefill(model, prompt):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=True)
        return len(prompt) / (time.perf_counter() - t0)


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=HERE / "out" / "bench-ckpt")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=HERE / "out" / "core.json")
    args = p.parse_args()

    from transformers import MixtralForCausalLM

    import smoe

    torch.set_num_threads(args.threads)
    write(args.checkpoint, "bench", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=gen).tolist()
    prefill_prompt = torch.randint(3, 32000, (args.prefill_tokens,), generator=gen).tolist()

    results = {}
    for name in args.dtypes:
        dtype = DTYPES[name]
        ours, _ = smoe.load(args.checkpoint, dtype=dtype)
        theirs = MixtralForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        best = {k: 0.0 for k in ("smoe_decode", "hf_decode", "smoe_prefill", "hf_prefill")}
        smoe_decode(ours, decode_prompt, 4)  # warm-up
        hf_decode(theirs, decode_prompt, 4)
        for r in range(args.repeats):
            best["smoe_decode"] = max(best["smoe_decode"], smoe_decode(ours, decode_prompt, args.decode_tokens))
            best["hf_decode"] = max(best["hf_decode"], hf_decode(theirs, decode_prompt, args.decode_tokens))
            best["smoe_prefill"] = max(best["smoe_prefill"], smoe_prefill(ours, prefill_prompt))
            best["hf_prefill"] = max(best["hf_prefill"], hf_prefill(theirs, prefill_prompt))
            print(f"[{name} run {r + 1}/{args.repeats}] " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()),
                  file=sys.stderr, flush=True)
        results[name] = best
        del ours, theirs

    report = {
        "checkpoint": str(args.checkpoint), "commit": commit(), "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
        "prefill_tokens": args.prefill_tokens, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| dtype | smoe decode tok/s | transformers decode tok/s | ratio "
          "| smoe prefill tok/s | transformers prefill tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, b in results.items():
        print(f"| {name} | {b['smoe_decode']:.1f} | {b['hf_decode']:.1f} | {b['smoe_decode'] / b['hf_decode']:.2f}x "
              f"| {b['smoe_prefill']:.1f} | {b['hf_prefill']:.1f} | {b['smoe_prefill'] / b['hf_prefill']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
