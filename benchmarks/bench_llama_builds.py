"""How far llama.cpp is from itself: the same GGUF files and prompt through llama.cpp built two ways
— the build installed in this environment (-march=native: its AVX2 / AVX-512 kernels) and another
build given by --other (llama-cpp-python installed with `pip install --target DIR`, e.g. a portable
build without SIMD) — and through smoe (the file in place, fp32: llama.cpp's arithmetic), each in
its own process, plus smoe with half of the embedding's values moved one ulp (how far one rounding
difference carries through the 8-bit activation codes). Top-1 agreement over the prompt's positions
and mean |Δlogit| for each pair: the floor that a "same argmax as llama.cpp" line stands on.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX512=OFF" \\
        pip install --target /tmp/llama-portable --no-deps llama-cpp-python==0.3.36
    python benchmarks/bench_llama_builds.py --other /tmp/llama-portable --model smoe/assets/demo --prompt text

The files are bench_gguf.py's (llama.cpp's converter and quantizer). Results: docs/FORMATS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engines import commit, cpu  # noqa: E402
from bench_gguf import files_and_prompt, llama_run, smoe_run  # noqa: E402


def child(args) -> int:
    prompt = json.loads(args.prompt_ids)
    if args.engine == "smoe":
        logits = smoe_run(args.file, prompt, 1, "fp32", in_place=True)[0]
    elif args.engine == "smoe-ulp":  # half the embedding's values one ulp up: how far a rounding carries
        import torch

        import smoe

        model, _ = smoe.load(args.file, dtype="fp32", gguf_in_place=True)
        g = torch.Generator().manual_seed(0)
        model.embed_tokens.register_forward_hook(
            lambda m, a, y: y * (1 + (torch.rand(y.shape, generator=g) < 0.5).float() * 2.0**-23))
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]))[0].float().numpy()
    else:
        logits = llama_run(args.file, prompt, 0, args.threads)[0]
    np.save(args.save, logits.astype(np.float32))
    return 0


def logits_of(engine: str, file: Path, prompt: list[int], threads: int, other: Path | None) -> np.ndarray:
    env = dict(os.environ)
    if other is not None:  # this build's llama_cpp package first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(other), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        save = Path(tmp) / "logits.npy"
        subprocess.run([sys.executable, __file__, "--child", "--engine", engine, "--file", str(file), "--prompt-ids",
                        json.dumps(prompt), "--save", str(save), "--threads", str(threads)], check=True, env=env)
        return np.load(save)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", type=Path, help="a directory holding another build's llama_cpp package")
    p.add_argument("--model", type=Path, default=HERE.parent / "smoe" / "assets" / "demo")
    p.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    p.add_argument("--prompt", choices=["random", "text"], default="text")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "gguf-bench")
    # the child process: one engine's logits into --save
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.other is None or not (args.other / "llama_cpp").is_dir():
        print("--other: a directory with another build's llama_cpp package (pip install --target DIR ...)",
              file=sys.stderr)
        return 2
    types, files, prompt = files_and_prompt(args)
    rows = []
    for t in types:
        got = {"llama.cpp": logits_of("llama", files[t], prompt, args.threads, None),
               "llama.cpp (other build)": logits_of("llama", files[t], prompt, args.threads, args.other),
               "smoe fp32 in place": logits_of("smoe", files[t], prompt, args.threads, None),
               "smoe, embedding 1 ulp off": logits_of("smoe-ulp", files[t], prompt, args.threads, None)}
        row = {"type": t}
        for a, b in (("llama.cpp (other build)", "llama.cpp"), ("smoe fp32 in place", "llama.cpp"),
                     ("smoe fp32 in place", "llama.cpp (other build)"),
                     ("smoe, embedding 1 ulp off", "smoe fp32 in place")):
            row[f"{a} vs {b}"] = {"top1": float((got[a].argmax(-1) == got[b].argmax(-1)).mean()),
                                  "mean_abs": float(np.abs(got[a] - got[b]).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"cpu": cpu(), "commit": commit(), "command": " ".join(["bench_llama_builds.py", *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llama-builds.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    pairs = [k for k in rows[0] if k != "type"]
    print(f"\n{meta['cpu']}\ncommit {meta['commit']}; {meta['command']}\n")
    print("| file | " + " | ".join(f"{k}: top-1 / mean \\|Δ\\|" for k in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for r in rows:
        print(f"| {r['type']} | " + " | ".join(f"{r[k]['top1']:.3f} / {r[k]['mean_abs']:.4f}" for k in pairs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
