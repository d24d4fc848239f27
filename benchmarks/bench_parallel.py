"""Decode step time of one model split over 1, 2 and 4 processes on this machine (gloo over
loopback), under expert, tensor and expert x tensor parallelism. Each process runs one thread,
so 2 processes use the machine's 2 cores; 4 oversubscribe them (the figures say what the
exchange costs, not what 4 machines would give: docs/DISTRIBUTED.md models that).

    python benchmarks/bench_parallel.py                       # the benchmark checkpoint
    python benchmarks/bench_parallel.py --model smoe/assets/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def worker(model: str, spec: str, tokens: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import smoe
    from smoe.loader import LoadOptions, load_model
    from smoe.parallel import ParallelSpec

    parallel = ParallelSpec.parse(spec) if spec != "none" else None
    model_, _ = load_model(Path(model), LoadOptions(parallel=parallel))
    prompt = [1] + list(range(100, 131))
    smoe.generate(model_, None, prompt, max_tokens=8, ignore_eos=True)  # warm-up
    best = None
    for _ in range(3):
        r = smoe.generate(model_, None, prompt, max_tokens=tokens, ignore_eos=True)
        best = r if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s else best
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"decode_tokens_per_s": best.decode_tokens_per_s,
                                         "prefill_tokens_per_s": best.prefill_tokens_per_s}))


def run(model: Path, n: int, spec: str, tokens: int, tmp: Path) -> dict:
    from serving import free_port

    port = free_port()
    out = tmp / f"{n}-{spec}.json"
    procs = []
    for rank in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if n > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(model), spec, str(tokens), str(out)],
                                      env=env))
    for p in procs:
        p.wait()
    return json.loads(out.read_text())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return 0
    from bench_engines import commit, cpu

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / "out" / "bench-ckpt")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "out" / "parallel-bench")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, spec in ((1, "none"), (2, "expert"), (2, "tensor"), (4, "expert"), (4, "tensor"), (4, "expert,tensor")):
        t0 = time.perf_counter()
        r = run(args.model, n, spec, args.tokens, args.out)
        rows.append({"processes": n, "parallel": spec, **r, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"cpu": cpu(), "commit": commit(), "model": str(args.model),
            "command": " ".join(["bench_parallel.py", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['cpu']}\ncommit {meta['commit']}; {meta['command']}\n")
    print("| processes | parallel | decode tok/s | ms per token | prefill tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['parallel']} | {r['decode_tokens_per_s']:.1f} | "
              f"{1000 / r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
