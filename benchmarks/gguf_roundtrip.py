"""Files `smoe quantize --type` writes, run by llama.cpp: do both engines compute the same thing?

    python benchmarks/gguf_roundtrip.py                       # the demo model, Q8_0 and Q4_0
    python benchmarks/gguf_roundtrip.py --model DIR --types Q4_0

For each type: `smoe quantize --model DIR --type T --out F.gguf`; llama.cpp (llama-cpp-python
0.3.36) loads F and scores a --tokens-token prompt (smoe's tokenizer's ids, BOS first) at every
position; smoe loads the same file (its GGUF reader, dequantized to fp32) and scores the same ids.
Reported: how often the two argmaxes agree, the mean and largest |Δlogit| (llama.cpp multiplies
8-bit activations by the blocks; smoe the dequantized weights in fp32), whether llama.cpp's
tokenizer gives smoe's ids for the prompt's text, and the greedy continuation of a short prompt
from each engine (llama.cpp's text generation API; smoe.generate at temperature 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--types", default="Q8_0,Q4_0")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", default="The meaning of life is")
    args = parser.parse_args()

    import llama_cpp
    import torch

    import smoe
    from smoe.formats.gguf import convert

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            path = Path(tmp) / f"model-{kind}.gguf"
            cmd = [sys.executable, "-m", "smoe", "quantize", "--type", kind, "--out", str(path)]
            if args.model:
                cmd[4:4] = ["--model", args.model]
            subprocess.run(cmd, check=True, capture_output=True)
            model, tok = smoe.load(str(convert(path, Path(tmp) / kind, dtype=torch.float32, progress=False)))
            text = (HERE.parent / "smoe" / "assets" / "demo" / "README.md").read_text()
            ids = tok.encode(text)[: args.tokens]
            llm = llama_cpp.Llama(str(path), n_ctx=max(512, args.tokens + 64), logits_all=True, verbose=False,
                                  n_threads=2)
            same_ids = llm.tokenize(tok.decode(ids[1:]).encode()) == ids
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
            with torch.inference_mode():
                ours = model(torch.tensor([ids]))[0].float().numpy()
            delta = np.abs(theirs - ours)
            llm.reset()
            theirs_text = llm(args.prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
            ours_text = smoe.generate(model, tok, args.prompt, max_tokens=24, temperature=0).text
            rows.append({"type": kind, "file_mib": round(path.stat().st_size / 2**20, 1), "positions": len(ids),
                         "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
                         "mean_abs_dlogit": float(delta.mean()), "max_abs_dlogit": float(delta.max()),
                         "logit_scale": float(np.abs(ours).max()), "tokenizer_same_ids": bool(same_ids),
                         "llama_cpp_text": theirs_text, "smoe_text": ours_text,
                         "same_text": theirs_text.strip() == ours_text.strip()})
            print(json.dumps(rows[-1]))
    print("\n| type | file | argmax agree | mean / max abs dlogit | same greedy text |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['file_mib']} MiB | {r['argmax_agree']:.3f} | {r['mean_abs_dlogit']:.4f} / "
              f"{r['max_abs_dlogit']:.3f} | {'yes' if r['same_text'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
