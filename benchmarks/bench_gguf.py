"""smoe reading GGUF files that llama.cpp itself made: a checkpoint through llama.cpp's
`convert_hf_to_gguf.py` (F16, Q8_0) and its quantizer (Q4_0, Q4_K_M, Q3_K_M, Q2_K from the F16
file), each file then read by smoe (`smoe.load("file.gguf")`, converted; with --in-place its
blocks used in place, `gguf_in_place=True`) and by llama.cpp (llama-cpp-python, built from
source); the two engines' logits on the same prompt and their greedy tokens compared.

    python benchmarks/bench_gguf.py                                # the benchmark checkpoint
    python benchmarks/bench_gguf.py --model smoe/assets/demo --types F16,Q8_0
    python benchmarks/bench_gguf.py --model smoe/assets/demo --types F16,Q4_K_M,Q3_K_M,Q2_K --in-place
    python benchmarks/bench_gguf.py --model smoe/assets/demo --in-place --dtype fp32 --prompt text --prompt-tokens 256

Needs `pip install -e '.[bench]'` (llama-cpp-python). Results: docs/FORMATS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engines import commit, cpu, llama_source, stage_for_converter  # noqa: E402

QUANTIZE = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
            "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
            "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}


def make_files(model_dir: Path, work: Path, types: list[str]) -> dict[str, Path]:
    import llama_cpp as L

    staged = stage_for_converter(model_dir, work)
    src = llama_source(work.parent / "llama-src")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    files = {t: work / f"model-{t}.gguf" for t in types}
    for t, outtype in (("F16", "f16"), ("Q8_0", "q8_0")):
        needed = t in files or (t == "F16" and any(k in QUANTIZE for k in files))
        if needed and not (work / f"model-{t}.gguf").exists():
            print(f"llama.cpp convert_hf_to_gguf.py --outtype {outtype} ...", flush=True)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(staged), "--outtype", outtype,
                            "--outfile", str(work / f"model-{t}.gguf")], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for t, ftype in QUANTIZE.items():
        if t in files and not files[t].exists():
            print(f"llama.cpp llama_model_quantize {t} ...", flush=True)
            params = L.llama_model_quantize_default_params()
            params.ftype = getattr(L, ftype)
            params.nthread = os.cpu_count() or 2
            if L.llama_model_quantize(str(work / "model-F16.gguf").encode(), str(files[t]).encode(), params):
                raise RuntimeError(f"llama_model_quantize {t} failed")
    return files


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def llama_run(path: Path, prompt: list[int], new: int, threads: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for every prompt position [P, V] and its greedy continuation."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new + 8, logits_all=True, n_threads=threads,
                verbose=False)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    tokens = []
    for _ in range(new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(nxt)
        llm.eval([nxt])
    return logits, tokens


def smoe_run(path: Path, prompt: list[int], new: int, dtype: str, in_place: bool = False
             ) -> tuple[np.ndarray, list[int], float]:
    import torch

    import smoe

    t0 = time.perf_counter()
    model, _ = smoe.load(path, dtype=dtype, gguf_in_place=in_place and path.name != "model-F16.gguf")
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0].float().numpy()
    tokens = smoe.generate(model, None, prompt, max_tokens=new, ignore_eos=True).token_ids
    return logits, tokens, load_s


def make_prompt(model: Path, kind: str, n: int) -> list[int]:
    if kind == "random":
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        return [1] + np.random.default_rng(0).integers(3, vocab, n - 1).tolist()
    import smoe
    from smoe.data import read_jsonl
    from smoe.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    docs = read_jsonl(smoe.DEMO_MODEL / "eval_slice.jsonl")[::7]  # a spread of the slice's documents and domains
    ids = tokenizer.encode("\n\n".join(d["text"] for d in docs))
    if len(ids) < n:
        raise SystemExit(f"the held-out text gives {len(ids)} tokens; ask fewer than {n}")
    return ids[:n]


def files_and_prompt(args) -> tuple[list[str], dict[str, Path], list[int]]:
    """--types, llama.cpp's files of --model in them (made once under --out, smoe's cache there too)
    and the --prompt's --prompt-tokens token ids."""
    os.environ.setdefault("SMOE_CACHE", str(args.out / "smoe-cache"))
    types = args.types.split(",")
    files = make_files(args.model, args.out / f"files-{args.model.name}", types)
    return types, files, make_prompt(args.model, args.prompt, args.prompt_tokens)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / "out" / "bench-ckpt")
    p.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "gguf-bench")
    p.add_argument("--prompt", choices=["random", "text"], default="random",
                   help="random token ids (a random-weight checkpoint has no text), or the first --prompt-tokens "
                        "tokens of the demo's held-out text (every 7th document of eval_slice.jsonl) by the "
                        "model's tokenizer")
    p.add_argument("--in-place", action="store_true", help="smoe uses the quantized files' blocks in place")
    p.add_argument("--dtype", default="fp32", help="smoe's dtype: fp32 (the file's weights, no rounding of smoe's "
                   "own) or bf16 (in place: the native kernels, activations quantized as llama.cpp does)")
    args = p.parse_args()
    if not (args.model / "config.json").exists():
        print(f"{args.model}: no checkpoint (make one: python benchmarks/random_checkpoint.py --preset bench "
              f"--out {args.model})", file=sys.stderr)
        return 2
    types, files, prompt = files_and_prompt(args)
    rows = []
    llama_f16 = llama_run(files["F16"], prompt, args.new_tokens, args.threads)[0] if "F16" in files else None
    for t in types:
        ref_logits, ref_tokens = llama_run(files[t], prompt, args.new_tokens, args.threads)
        # smoe in fp32 by default, so that the comparison shows the file's weights, not smoe's rounding
        logits, tokens, load_s = smoe_run(files[t], prompt, args.new_tokens, args.dtype, args.in_place)
        diff = np.abs(logits - ref_logits)
        scale = np.abs(ref_logits).max()
        agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        row = {"type": t, "tensors": tensor_types(files[t]), "size_mib": files[t].stat().st_size / 2**20,
               "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "logit_scale": float(scale),
               "top1_agreement": agree, "greedy_same_prefix": same, "greedy_tokens": len(tokens),
               "smoe_first_load_s": load_s,
               # llama.cpp's own distance from its F16 run: the file's quantization plus llama.cpp's 8-bit
               # activations (it quantizes activations for Q8_0/Q4_x/K-quant products; smoe does not)
               "llama_vs_its_f16_max": float(np.abs(ref_logits - llama_f16).max()) if llama_f16 is not None else None,
               "llama_vs_its_f16_mean": float(np.abs(ref_logits - llama_f16).mean()) if llama_f16 is not None
               else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"cpu": cpu(), "commit": commit(), "model": str(args.model), "in_place": args.in_place, "dtype": args.dtype,
            "command": " ".join(["bench_gguf.py", *sys.argv[1:]]), "prompt_tokens": args.prompt_tokens,
            "prompt": args.prompt}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['cpu']}\ncommit {meta['commit']}; {meta['command']}\n")
    print("| file | tensor types | MiB | smoe vs llama.cpp: max / mean \\|Δlogit\\| | top-1 agree | greedy equal "
          "| llama.cpp vs its F16: max / mean |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["tensors"].items()))
        own = (f"{r['llama_vs_its_f16_max']:.3f} / {r['llama_vs_its_f16_mean']:.4f}"
               if r["llama_vs_its_f16_max"] is not None else "-")
        print(f"| {r['type']} | {kinds} | {r['size_mib']:.0f} | {r['max_abs_diff']:.3f} / {r['mean_abs_diff']:.4f} "
              f"(logits up to {r['logit_scale']:.1f}) | {r['top1_agreement']:.3f} | "
              f"{r['greedy_same_prefix']}/{r['greedy_tokens']} | {own} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
