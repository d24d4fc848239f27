"""A random-weight Mixtral-8x7B-shaped GGUF file in llama.cpp's low-bit presets, written tensor by
tensor, and llama.cpp's speed on it: the bar for running such files in place (issue "Mixtral-8x7B
in 24 GiB").

    python benchmarks/mixtral_gguf.py --type Q3_K_S                  # write (once) and measure
    python benchmarks/mixtral_gguf.py --type Q2_K --layers 4         # a smaller file of the same widths
    python benchmarks/mixtral_gguf.py --type Q3_K_M --write-only

The file is what `llama-quantize` would write for Mixtral-8x7B (32 layers, hidden 4096, experts
8 × 14336, 32 query / 8 kv heads, 32k vocabulary, Mixtral's v1 tokenizer from mistral-common),
with each tensor's type chosen as llama.cpp's presets choose it for an 8-expert model (smoe's
`tensor_type`, smoe/formats/gguf_write.py: attn_k / attn_v Q8_0, attn_output Q5_K, output Q6_K,
norms and routers F32; ffn_down one step up in Q2_K / Q3_K_M) and random blocks whose fp16 scales are set
so that every weight has a standard deviation of ~0.02 (so activations stay finite through the 32
layers). It is never held whole: each tensor is made, written and dropped (`gguf`'s writer with
the tensor table first), so writing needs ~200 MB of memory and the file's size on disk (~16–21
GB; checked before writing).

Measured, each in its own process, best of --repeats: llama.cpp (llama-cpp-python, its C API as
benchmarks/bench_engines.py drives it) — prefill tokens/s of a --prefill-token prompt and decode
tokens/s of --decode greedy tokens, 2 threads, the file memory-mapped — and its peak RSS; and
smoe on the same file in place (`smoe.load(file, gguf_in_place=True)`: its blocks are the weights,
nothing converted), driven as benchmarks/bench_engines.py drives it. The engines interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPE = dict(vocab=32000, hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, experts=8, top_k=2,
             context=32768, rope_theta=1e6, eps=1e-5)
PRESETS = ("Q3_K_S", "Q3_K_M", "Q2_K")


def tensor_type(preset: str, role: str, layer: int, layers: int, columns: int = SHAPE["hidden"]) -> str:
    """The GGML type llama.cpp's preset gives this tensor of an 8-expert, 4-way-GQA model (the
    rules smoe quantize writes by: smoe/formats/gguf_write.py)."""
    from smoe.formats.gguf_write import tensor_type as preset_type

    return preset_type(preset, role, columns, layer, layers, experts=SHAPE["experts"],
                       gqa=SHAPE["heads"] // SHAPE["kv_heads"])


def tensors(preset: str, layers: int):
    """(name, numpy shape [outer .. inner], type) in the order llama.cpp's converter writes them."""
    s = SHAPE
    H, F, V, E = s["hidden"], s["ffn"], s["vocab"], s["experts"]
    D = H // s["heads"]
    yield "token_embd.weight", (V, H), tensor_type(preset, "token_embd", 0, layers)
    for i in range(layers):
        for role, shape in (("attn_norm", (H,)), ("attn_q", (H, H)), ("attn_k", (s["kv_heads"] * D, H)),
                            ("attn_v", (s["kv_heads"] * D, H)), ("attn_output", (H, H)), ("ffn_norm", (H,)),
                            ("ffn_gate_inp", (E, H)), ("ffn_gate_exps", (E, F, H)), ("ffn_up_exps", (E, F, H)),
                            ("ffn_down_exps", (E, H, F))):
            yield f"blk.{i}.{role}.weight", shape, tensor_type(preset, role, i, layers, shape[-1])
    yield "output_norm.weight", (H,), "F32"
    yield "output.weight", (V, H), tensor_type(preset, "output", 0, layers)


# where each block keeps its fp16 scales (byte offsets), set to small finite numbers
SCALES = {"Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def scale_for(kind: str, target_std: float = 0.02) -> float:
    """The fp16 block scale that gives random blocks of `kind` weights of ~target_std (measured
    with smoe's dequantization of random blocks at scale 1)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from smoe.formats.gguf import dequantize

    rng = np.random.default_rng(0)
    elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, size=(512, nbytes), dtype=np.uint8)
    for at in SCALES[kind]:
        raw[:, at : at + 2] = np.full((512, 1), 1.0, dtype=np.float16).view(np.uint8)
    return target_std / float(dequantize(raw, kind, (512 * elems,)).std())


def random_tensor(shape: tuple[int, ...], kind: str, scale: float, rng) -> np.ndarray:
    if kind == "F32":
        return (1.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32) if len(shape) == 1 \
            else (0.02 * rng.standard_normal(shape)).astype(np.float32)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rows = int(np.prod(shape[:-1]))
    blocks = rows * shape[-1] // elems
    raw = np.frombuffer(rng.bytes(blocks * nbytes), dtype=np.uint8).reshape(blocks, nbytes).copy()
    signs = np.where(rng.random((blocks, 1)) < 0.5, -1.0, 1.0) if kind in ("Q8_0", "Q3_K", "Q6_K") else 1.0
    d = (scale * (0.5 + rng.random((blocks, 1))) * signs).astype(np.float16).view(np.uint8)
    for at in SCALES[kind]:
        raw[:, at : at + 2] = d
    return raw.reshape(*shape[:-1], shape[-1] // elems * nbytes)


def mixtral_tokenizer(writer) -> None:
    import mistral_common
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else
                            6 if sp.is_byte(i) else 1 for i in range(sp.vocab_size())])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())


def file_bytes(preset: str, layers: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    total = 0
    for _, shape, kind in tensors(preset, layers):
        elems, nbytes = (1, 4) if kind == "F32" else GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        total += int(np.prod(shape)) // elems * nbytes
    return total


def write(path: Path, preset: str, layers: int) -> None:
    import gguf
    from tqdm import tqdm

    need = file_bytes(preset, layers)
    free = shutil.disk_usage(path.parent).free
    if free < need + (1 << 30):
        raise SystemExit(f"{path.parent}: {free / 2**30:.1f} GiB free, the file needs {need / 2**30:.1f} GiB")
    s = SHAPE
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"Mixtral-8x7B-shaped random {preset}")
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_dimension_count(s["hidden"] // s["heads"])
    writer.add_layer_norm_rms_eps(s["eps"])
    writer.add_rope_freq_base(s["rope_theta"])
    writer.add_expert_count(s["experts"])
    writer.add_expert_used_count(s["top_k"])
    writer.add_vocab_size(s["vocab"])
    writer.add_file_type({"Q3_K_S": 11, "Q3_K_M": 12, "Q2_K": 10}[preset])  # llama_ftype
    mixtral_tokenizer(writer)
    scales = {kind: scale_for(kind) for kind in SCALES}
    plan = list(tensors(preset, layers))
    for name, shape, kind in plan:  # the tensor table first: the data then streams in this order
        if kind == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
            byte_shape = (*shape[:-1], shape[-1] // elems * nbytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, kind in tqdm(plan, desc=f"writing {path.name}", unit="tensor", file=sys.stderr):
        writer.write_tensor_data(random_tensor(shape, kind, scales.get(kind, 0.0), rng))
    writer.close()
    tmp.rename(path)


def child(args) -> int:
    from benchmarks.bench_engines import peak_rss_mib, run_llama, run_smoe

    cfg = {"batches": [1], "prefill": args.prefill, "prompt": 16, "decode": args.decode}
    run = run_smoe if args.engine == "smoe" else run_llama  # smoe: the file's blocks in place
    out = run(str(args.file), "gguf", args.threads, cfg)[1]
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", default="Q3_K_S", choices=PRESETS)
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "mixtral-gguf")
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="smoe,llama.cpp", help="smoe (the file in place), llama.cpp")
    parser.add_argument("--engine", default="llama.cpp", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mixtral-8x7b-shaped-{args.layers}l-{args.type}.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        write(path, args.type, args.layers)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"using {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    if args.write_only:
        return 0
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for r in range(args.repeats):  # the engines interleaved, each in its own process
        for engine in engines:
            cmd = [sys.executable, __file__, "--child", "--engine", engine, "--file", str(path), "--prefill",
                   str(args.prefill), "--decode", str(args.decode), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent,
                                 env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            last = runs[engine][-1]
            print(f"run {r + 1}/{args.repeats}  {engine:<9}  decode {last['decode_tok_s']:.2f} tok/s  "
                  f"prefill {last['prefill_tok_s']:.2f} tok/s  peak RSS {last['peak_rss_mib']:.0f} MiB", flush=True)
    result = {"file": str(path), "type": args.type, "layers": args.layers, "file_gib": path.stat().st_size / 2**30}
    for engine, done in runs.items():
        result[engine] = {**{k: max(r[k] for r in done) for k in ("decode_tok_s", "prefill_tok_s")},
                          "peak_rss_mib": min(r["peak_rss_mib"] for r in done)}
    print(json.dumps(result, indent=1))
    (args.out / f"results-{args.type}-{args.layers}l.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
