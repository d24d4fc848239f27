"""Same file, two engines: smoe running a GGUF file in place (`smoe.load(file, gguf_in_place=True)`:
its blocks are the weights, nothing converted) against llama.cpp on that very file.

    python benchmarks/bench_gguf_speed.py                                   # the benchmark checkpoint
    python benchmarks/bench_gguf_speed.py --types Q4_K_M,Q2_K --repeats 3
    python benchmarks/bench_gguf_speed.py --model smoe/assets/demo --types Q4_0

The files are llama.cpp's own (benchmarks/bench_gguf.py's make_files: its converter to F16, then
`llama_model_quantize`). Each engine and type runs in its own process (benchmarks/bench_engines.py's
child: prefill tokens/s of a 512-token prompt, decode tokens/s over 128 greedy tokens after a 32-token
prompt, at batch 1 and 8, peak RSS), the engines interleaved, best of --repeats. The table gives
smoe / llama.cpp ratios and smoe's peak RSS against the file's size. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engines import commit, cpu  # noqa: E402
from bench_gguf import make_files  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the benchmark checkpoint)")
    p.add_argument("--types", default="Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "gguf-speed")
    args = p.parse_args()
    if args.model is None:
        from random_checkpoint import write

        args.model = write(HERE / "out" / "bench-ckpt", "bench", __import__("torch").bfloat16)
    types = args.types.split(",")
    files = make_files(args.model, args.out / f"files-{args.model.name}", types)
    best: dict[tuple[str, str, str], dict] = {}
    rss: dict[tuple[str, str], float] = {}
    for r in range(args.repeats):
        for t in types:
            for engine in ("smoe", "llama.cpp"):
                cmd = [sys.executable, str(HERE / "bench_engines.py"), "--engine", engine, "--precision", t,
                       "--target", str(files[t]), "--threads", str(args.threads), "--batches", args.batches,
                       "--prefill", str(args.prefill), "--prompt", str(args.prompt), "--decode", str(args.decode)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{engine} {t} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                report = json.loads(done.stdout.strip().splitlines()[-1])
                rss[engine, t] = min(rss.get((engine, t), 1e18), report["peak_rss_mib"])
                for batch, m in report["result"].items():
                    old = best.get((engine, t, batch), {})
                    best[engine, t, batch] = {k: max(old.get(k, 0), m[k])
                                              for k in ("prefill_tok_s", "decode_tok_s")}
                b1 = report["result"]["1"] if "1" in report["result"] else next(iter(report["result"].values()))
                print(f"run {r + 1}/{args.repeats}  {t:<7} {engine:<9} decode {b1['decode_tok_s']:7.1f} tok/s  "
                      f"prefill {b1['prefill_tok_s']:7.1f} tok/s  peak RSS {report['peak_rss_mib']:.0f} MiB",
                      flush=True)
    lines = [f"model: {args.model}  commit: {commit()}  machine: {cpu()}, {args.threads} threads", "",
             "| file | batch | smoe decode | llama.cpp decode | ratio | smoe prefill | llama.cpp prefill | ratio | "
             "file (MiB) | smoe peak RSS (MiB) | llama.cpp peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for t in types:
        for batch in args.batches.split(","):
            s, ll = best["smoe", t, batch], best["llama.cpp", t, batch]
            row = {"type": t, "batch": int(batch), "smoe": s, "llama.cpp": ll,
                   "file_mib": files[t].stat().st_size / 2**20,
                   "smoe_rss_mib": rss["smoe", t], "llama_rss_mib": rss["llama.cpp", t]}
            rows.append(row)
            lines.append(f"| {t} | {batch} | {s['decode_tok_s']:.1f} | {ll['decode_tok_s']:.1f} | "
                         f"{s['decode_tok_s'] / ll['decode_tok_s']:.2f}x | {s['prefill_tok_s']:.1f} | "
                         f"{ll['prefill_tok_s']:.1f} | {s['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x | "
                         f"{row['file_mib']:.0f} | {row['smoe_rss_mib']:.0f} | {row['llama_rss_mib']:.0f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    summary = {"commit": commit(), "cpu": cpu(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
