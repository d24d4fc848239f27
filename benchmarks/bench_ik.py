"""ik_llama.cpp (a llama.cpp fork focused on CPU kernels) on the GGUF files bench_engines.py made,
for the figures beside smoe's and llama.cpp's in docs/BENCHMARKS.md.

ik_llama.cpp is not a dependency: bring its source (e.g. the `fetch` tool, or `git clone
https://github.com/ikawrakow/ik_llama.cpp`), build its llama-bench once, and point --bench at it:

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF          # -DGGML_NATIVE=OFF -DGGML_AVX2=ON
    cmake --build build --target llama-bench -j2                        # -DGGML_AVXVNNI=ON for an AVX2 build
    python benchmarks/bench_ik.py --bench /path/to/ik_llama.cpp/build/bin/llama-bench \\
        --gguf benchmarks/out/engines/gguf-bench-ckpt --repeats 3

Runs `llama-bench -t 2 -p 512 -n 128 -rtr 1 -fmoe 1` (run-time repacking of the rows for its
kernels, the fused MoE up/gate op) on each file, best of --repeats (each run its own process),
and prints prefill (pp512) and decode (tg128) tokens/s per file, batch 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

FILES = {"bf16": "model-bf16.gguf", "int8": "model-int8.gguf", "int4": "model-int4.gguf"}


def run(bench: Path, gguf: Path, threads: int) -> dict[str, float]:
    out = subprocess.run([str(bench), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "1",
                          "-rtr", "1", "-fmoe", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout[out.stdout.index("["):])
    return {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="ik_llama.cpp's llama-bench binary")
    p.add_argument("--gguf", type=Path, required=True, help="the folder bench_engines.py wrote its GGUF files to")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    best: dict[str, dict[str, float]] = {}
    for r in range(args.repeats):
        for precision, name in FILES.items():
            if not (args.gguf / name).exists():
                continue
            got = run(args.bench, args.gguf / name, args.threads)
            mine = best.setdefault(precision, {"prefill": 0.0, "decode": 0.0})
            for key, value in got.items():
                mine[key] = max(mine[key], value)
            print(f"run {r + 1}/{args.repeats}  ik_llama.cpp {precision:<6} decode {got['decode']:7.1f} tok/s  "
                  f"prefill {got['prefill']:7.1f} tok/s", flush=True)
    print(json.dumps(best, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
