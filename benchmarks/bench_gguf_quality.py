"""Quality of smoe's GGUF quantizer (`smoe quantize --type ...`) against llama.cpp's: held-out
perplexity per domain of a checkpoint (the demo model by default) quantized to the same preset by
each, and the unquantized weights.

    python benchmarks/bench_gguf_quality.py                          # demo: Q8_0 Q4_K_M Q3_K_M Q3_K_S Q2_K
    python benchmarks/bench_gguf_quality.py --types Q4_K_M,Q2_K --tokens 2048

For each preset: smoe's file (`python -m smoe quantize --model M --type T --out smoe-T.gguf`, a
subprocess, timed) and llama.cpp's file (its own converter to F16, then `llama_model_quantize`
from llama-cpp-python: benchmarks/bench_gguf.py's make_files). Every file is scored twice on the
same token windows:
- by smoe, the file converted to fp32 (`gguf_in_place=False`: the weights are exactly the file's
  dequantized blocks, computed in fp32), so the two files differ only in their quantizer;
- by llama.cpp (llama-cpp-python, the file as it loads it), which shows that it loads smoe's files
  and agrees on their quality.
The held-out slice's documents (per domain) are tokenized with the checkpoint's tokenizer and scored
in non-overlapping windows of --seq-len (128: within the demo's sliding window, which a GGUF file
does not carry, so every row computes the same attention). "bf16" is the checkpoint as it ships.
Needs `pip install -e '.[bench]'`. Results: out/gguf-quality/quality.{json,md}, docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_engines import commit, cpu  # noqa: E402
from bench_gguf import make_files  # noqa: E402


def streams_of(model_dir: Path, heldout: Path) -> dict[str, list[int]]:
    from smoe.data import read_jsonl
    from smoe.tokenizer import load_tokenizer
    from smoe.train.batches import domain_streams, tokenize_documents

    docs = read_jsonl(heldout)
    return {d: s.tolist() for d, s in domain_streams(tokenize_documents(docs, load_tokenizer(model_dir)), docs).items()}


def windows(stream: list[int], seq_len: int, tokens: int) -> list[list[int]]:
    """Non-overlapping windows of seq_len + 1 tokens over the first tokens + 1 of a stream (as
    smoe.train.stream_perplexity takes them)."""
    stream = stream[: tokens + 1]
    return [stream[i : i + seq_len + 1] for i in range(0, len(stream) - 1, seq_len)]


def nll(logits: np.ndarray, targets: list[int]) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def smoe_perplexity(path: Path, streams: dict, seq_len: int, tokens: int, dtype: str = "fp32") -> dict[str, float]:
    import torch

    import smoe

    model, _ = smoe.load(path, dtype=dtype, gguf_in_place=False, pack=False)  # a .gguf: converted to dtype
    out = {}
    with torch.inference_mode():
        for domain, stream in streams.items():
            total, count = 0.0, 0
            for w in windows(stream, seq_len, tokens):
                logits = model(torch.tensor([w[:-1]]))[0].float().numpy()
                total, count = total + nll(logits, w[1:]), count + len(w) - 1
            out[domain] = round(math.exp(total / count), 4)
    return out


def llama_perplexity(path: Path, streams: dict, seq_len: int, tokens: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=seq_len + 8, logits_all=True, n_threads=threads, verbose=False)
    out = {}
    for domain, stream in streams.items():
        total, count = 0.0, 0
        for w in windows(stream, seq_len, tokens):
            llm.reset()
            llm.eval(w[:-1])
            logits = np.array(llm.scores[: len(w) - 1], dtype=np.float32)
            total, count = total + nll(logits, w[1:]), count + len(w) - 1
        out[domain] = round(math.exp(total / count), 4)
    return out


def smoe_quantize(model_dir: Path, kind: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smoe", "quantize", "--model", str(model_dir), "--type", kind,
                    "--out", str(out)], check=True, cwd=HERE.parent)
    return time.perf_counter() - start


def table(results: dict, domains: list[str], reference: str) -> list[str]:
    lines = ["| weights | " + " | ".join(domains) + " | mean Δ |", "|---|" + "---|" * (len(domains) + 1)]
    for name, ppl in results.items():
        if name == reference:
            lines.append(f"| {name} | " + " | ".join(f"{ppl[d]:.3f}" for d in domains) + " | |")
            continue
        rel = [ppl[d] / results[reference][d] - 1 for d in domains]
        cells = [f"{ppl[d]:.3f} ({r:+.2%})" for d, r in zip(domains, rel, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(rel):+.2%} |")
    return lines


def main() -> int:
    import smoe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=smoe.DEMO_MODEL)
    p.add_argument("--heldout", type=Path, default=smoe.DEMO_MODEL / "eval_slice.jsonl")
    p.add_argument("--types", default="Q8_0,Q4_K_M,Q3_K_M,Q3_K_S,Q2_K")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "gguf-quality")
    args = p.parse_args()
    types = args.types.split(",")
    files = args.out / "files"
    files.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SMOE_CACHE", str(args.out / "cache"))  # the fp32 conversions
    streams = streams_of(args.model, args.heldout)
    domains = sorted(streams)
    llama_files = make_files(args.model, files / "llama", types)
    smoe_seconds = {}
    for t in types:
        out = files / f"smoe-{t}.gguf"
        if not out.exists():
            smoe_seconds[t] = round(smoe_quantize(args.model, t, out), 1)
    by_smoe = {"bf16": smoe_perplexity(args.model, streams, args.seq_len, args.tokens, dtype="bf16")}
    by_llama = {}
    for t in types:
        for who, path in (("llama.cpp", llama_files[t]), ("smoe", files / f"smoe-{t}.gguf")):
            name = f"{t} {who}'s file"
            by_smoe[name] = smoe_perplexity(path, streams, args.seq_len, args.tokens)
            by_llama[name] = llama_perplexity(path, streams, args.seq_len, args.tokens, args.threads)
            print(name, "smoe:", by_smoe[name], "llama.cpp:", by_llama[name], flush=True)
    sizes = {t: {who: os.path.getsize(path) for who, path in (("llama.cpp", llama_files[t]),
                                                              ("smoe", files / f"smoe-{t}.gguf"))} for t in types}
    verdict = []
    for t in types:
        ours, theirs = by_smoe[f"{t} smoe's file"], by_smoe[f"{t} llama.cpp's file"]
        worst = max(ours[d] / theirs[d] - 1 for d in domains)
        verdict.append(f"{t}: smoe's file vs llama.cpp's, worst domain {worst:+.2%} (scored by smoe), "
                       f"mean {np.mean([ours[d] / theirs[d] - 1 for d in domains]):+.2%}; sizes "
                       f"{sizes[t]['smoe'] / 2**20:.2f} / {sizes[t]['llama.cpp'] / 2**20:.2f} MiB")
    md = ["Scored by smoe (files converted to fp32):", "", *table(by_smoe, domains, "bf16"), "",
          "Scored by llama.cpp (llama-cpp-python 0.3.36, each file as it loads it):", "",
          *table(by_llama, domains, next(iter(by_llama))), "", *verdict]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"commit": commit(), "cpu": cpu(), "model": str(args.model), "seq_len": args.seq_len,
            "tokens": args.tokens, "smoe_quantize_seconds": smoe_seconds, "sizes": sizes}
    (args.out / "quality.json").write_text(json.dumps({**meta, "by_smoe": by_smoe, "by_llama": by_llama}, indent=1))
    (args.out / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
