"""Where a decode step's time goes: a per-op profile of smoe's decode at batch 1.

    python benchmarks/profile_decode.py --model benchmarks/out/bench-ckpt
    python benchmarks/profile_decode.py --model DIR-int8 --steps 32 --top 15

Prefills a 32-token prompt, then profiles --steps decode steps (torch.profiler, CPU) and
prints the ops with the most self time, their share of the step, and the step time.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    import smoe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    p.add_argument("--quant", default=None, help="int8 or int4 (quantize at load)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = smoe.load(args.model, dtype="bf16", quant=args.quant)
    engine = smoe.Engine(model, None, max_batch_size=1, max_seq_len=32 + args.steps + 8)
    params = smoe.SamplingParams(max_tokens=args.steps + 4, ignore_eos=True)
    engine.add(list(range(3, 35)), params)
    for _ in range(2):
        engine.step()  # warm-up
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - t0) / args.steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"decode step: {step * 1e3:.2f} ms ({1 / step:.1f} tokens/s; profiled, so slower than unprofiled)")
    print(f"{'op':<44} {'calls/step':>10} {'self ms/step':>12} {'share':>7}")
    for e in events[: args.top]:
        print(f"{e.key[:44]:<44} {e.count / args.steps:>10.1f} {e.self_cpu_time_total / 1e3 / args.steps:>12.3f} "
              f"{e.self_cpu_time_total / total:>7.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
