"""smoe vs transformers vs llama.cpp on one checkpoint, at matching precisions, in one run.

    python benchmarks/bench_engines.py                                   # the benchmark checkpoint
    python benchmarks/bench_engines.py --model smoe/assets/demo --repeats 3
    smoe bench --model DIR                                               # the same

Precisions: bf16 (llama.cpp BF16), then anything `--quant` / `smoe.load(quant=...)` reads:
int8 (smoe int8 per channel; llama.cpp Q8_0), int4 (smoe's default int4: groups of 64, 4.5 bits
per weight, Q4_0's size; llama.cpp Q4_0), int4-g32 (groups of 32: 5 bits per weight, Q4_1's
size; against Q4_0 again). smoe quantizes its output head to int8 by default, as llama.cpp
quantizes its output tensor (Q6_K in Q4_0 files, Q8_0 in Q8_0 files); "+keephead" (e.g.
int4-g32+keephead) keeps it in bf16. transformers runs bf16 only (it has no CPU int8/int4
path of its own). llama.cpp gets the checkpoint through the converter in llama-cpp-python's
source distribution (`pip download llama-cpp-python==0.3.36 --no-binary :all:`), then
`llama_model_quantize` for Q4_0.

Measured per engine and precision, each in its own process (so peak RSS is its own), the
engines interleaved, best of --repeats:
- prefill: tokens/s of a 512-token prompt up to its last position's logits (batch 1), and
  of 8 such prompts (batch 8);
- decode: tokens/s over 128 greedy tokens after a 32-token prompt (the first token comes
  from prefill and is not counted), at batch 1 and batch 8 (8 sequences stepped together);
- time to first token of the 512-token prompt; peak RSS.
llama.cpp is driven through its C API with a greedy argmax over llama_get_logits_ith.

Rooflines: decode bytes per token (each engine's stored weights times the share one token
reads: attention, routers, output head, and its experts — at batch 8 the expected number of
distinct experts per layer, shared by the 8 sequences) ÷ the machine's streaming-read
bandwidth; prefill FLOPs per token (2 × active parameters) ÷ the measured bf16 GEMM
throughput. Output: a table, results.json and a
PNG chart in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

LLAMA_VERSION = "0.3.36"
LLAMA_TYPES = {"bf16": "LLAMA_FTYPE_MOSTLY_BF16", "int8": "LLAMA_FTYPE_MOSTLY_Q8_0", "int4": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 32000)) for _ in range(length)] for _ in range(batch)]


# ----------------------------------------------------------------------------- engines


def run_smoe(model_dir: str, precision: str, threads: int, cfg: dict) -> dict:
    import torch

    import smoe

    torch.set_num_threads(threads)
    # int8 / int4: a checkpoint written by `smoe quantize`; a .gguf file: its blocks used in place
    model, _ = smoe.load(model_dir, dtype="bf16", gguf_in_place=str(model_dir).endswith(".gguf"))
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        for batch in cfg["batches"]:
            engine = smoe.Engine(model, None, max_batch_size=batch,
                                 max_seq_len=max(cfg["prefill"], cfg["prompt"] + cfg["decode"]) + 1)
            params = smoe.SamplingParams(max_tokens=1, ignore_eos=True)
            long = prompts(vocab, batch, cfg["prefill"])
            engine.remove(engine.add(long[0][:16], params))  # warm-up
            t0 = time.perf_counter()
            seqs = [engine.add(p, params) for p in long]
            t1 = time.perf_counter()
            for s in seqs:
                engine.remove(s)
            params = smoe.SamplingParams(max_tokens=cfg["decode"] + 1, ignore_eos=True)
            seqs = [engine.add(p, params) for p in prompts(vocab, batch, cfg["prompt"], seed=1)]
            steps = 0
            t2 = time.perf_counter()
            while engine.active:
                engine.step()
                steps += 1
            t3 = time.perf_counter()
            out[batch] = {"prefill_tok_s": batch * cfg["prefill"] / (t1 - t0), "ttft_s": (t1 - t0) / batch,
                          "decode_tok_s": batch * steps / (t3 - t2)}
            del engine, seqs  # this batch size's KV cache goes before the next one's is made
    return out


def run_transformers(model_dir: str, precision: str, threads: int, cfg: dict) -> dict:
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    out = {}
    with torch.inference_mode():
        for batch in cfg["batches"]:
            ids = torch.tensor(prompts(vocab, batch, cfg["prefill"]))
            model(ids[:, :16], logits_to_keep=1)  # warm-up
            t0 = time.perf_counter()
            for row in ids:  # one prompt at a time, as the other engines prefill
                model(row[None], logits_to_keep=1, use_cache=True)
            t1 = time.perf_counter()
            short = torch.tensor(prompts(vocab, batch, cfg["prompt"], seed=1))
            t2 = time.perf_counter()
            model.generate(short, max_new_tokens=1, min_new_tokens=1, **kw)
            t3 = time.perf_counter()
            model.generate(short, max_new_tokens=cfg["decode"] + 1, min_new_tokens=cfg["decode"] + 1, **kw)
            t4 = time.perf_counter()
            out[batch] = {"prefill_tok_s": batch * cfg["prefill"] / (t1 - t0), "ttft_s": (t1 - t0) / batch,
                          "decode_tok_s": batch * cfg["decode"] / ((t4 - t3) - (t3 - t2))}
    return out


def run_llama(gguf: str, precision: str, threads: int, cfg: dict) -> dict:
    import ctypes

    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(gguf.encode(), mparams)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    B = max(cfg["batches"])
    cparams = L.llama_context_default_params()
    cparams.n_ctx = B * (max(cfg["prefill"], cfg["prompt"] + cfg["decode"]) + 8)
    cparams.n_batch = cparams.n_ubatch = max(cfg["prefill"], B)
    cparams.n_seq_max = B
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    batch = L.llama_batch_init(cparams.n_batch, 0, B)

    def submit(items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, want logits)."""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        row = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).argmax())

    memory = L.llama_get_memory(ctx)
    out = {}
    for b in cfg["batches"]:
        L.llama_memory_clear(memory, True)
        submit([(t, p, 0, p == 15) for p, t in enumerate(prompts(vocab, 1, 16)[0])])  # warm-up
        L.llama_memory_clear(memory, True)
        t0 = time.perf_counter()
        for s, p in enumerate(prompts(vocab, b, cfg["prefill"])):
            submit([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
            argmax(-1)
        t1 = time.perf_counter()
        L.llama_memory_clear(memory, True)
        short = prompts(vocab, b, cfg["prompt"], seed=1)
        nxt = []
        for s, p in enumerate(short):
            submit([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
            nxt.append(argmax(-1))
        t2 = time.perf_counter()
        for step in range(cfg["decode"]):
            submit([(nxt[s], cfg["prompt"] + step, s, True) for s in range(b)])
            nxt = [argmax(s) for s in range(b)]
        t3 = time.perf_counter()
        out[b] = {"prefill_tok_s": b * cfg["prefill"] / (t1 - t0), "ttft_s": (t1 - t0) / b,
                  "decode_tok_s": b * cfg["decode"] / (t3 - t2)}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


# ------------------------------------------------------------------------- preparation


def llama_source(cache: Path) -> Path:
    """llama.cpp's converter and gguf-py, from llama-cpp-python's source distribution."""
    root = cache / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    if (root / "conversion").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_VERSION}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(cache), "-q"], check=True)
    subprocess.run(["tar", "xzf", str(cache / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"), "-C", str(cache),
                    *(f"llama_cpp_python-{LLAMA_VERSION}/vendor/llama.cpp/{part}"
                      for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"))], check=True)
    return root


def sentencepiece_stand_in(vocab_size: int, path: Path) -> None:
    """A SentencePiece model with `vocab_size` pieces (<unk>, <s>, </s>, the 256 bytes, then
    placeholders). The benchmark feeds token ids, so llama.cpp needs a vocabulary of the
    right size, not the model's real tokenizer (which its converter may not recognise)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.add_dummy_prefix = True
    pieces = [("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
              ("</s>", pb.ModelProto.SentencePiece.CONTROL)]
    pieces += [(f"<0x{b:02X}>", pb.ModelProto.SentencePiece.BYTE) for b in range(256)]
    pieces += [(f"\u2581p{i}", pb.ModelProto.SentencePiece.NORMAL) for i in range(vocab_size - len(pieces))]
    for i, (text, kind) in enumerate(pieces):
        piece = m.pieces.add()
        piece.piece, piece.type, piece.score = text, kind, -float(i)
    path.write_bytes(m.SerializeToString())


def stage_for_converter(model_dir: Path, work: Path) -> Path:
    """The checkpoint's files (links) beside a tokenizer.model that llama.cpp's converter reads."""
    from smoe.config import ModelConfig

    work.mkdir(parents=True, exist_ok=True)
    staged = work / "hf"
    staged.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != "tokenizer.json" and not (staged / f.name).exists():
            (staged / f.name).symlink_to(f.resolve())
    if not (staged / "tokenizer.model").exists():
        sentencepiece_stand_in(ModelConfig.from_dir(model_dir).vocab_size, staged / "tokenizer.model")
    return staged


def gguf_files(model_dir: Path, work: Path, precisions: list[str]) -> dict[str, Path]:
    """Convert the checkpoint to GGUF (BF16, Q8_0) and quantize Q4_0 from the BF16 file."""
    import llama_cpp as L

    model_dir = stage_for_converter(model_dir, work)
    files = {p: work / f"model-{p}.gguf" for p in precisions}
    src = llama_source(work.parent / "llama-src")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    for precision, outtype in (("bf16", "bf16"), ("int8", "q8_0")):
        wanted = precision in files or (precision == "bf16" and "int4" in files)  # Q4_0 is made from BF16
        if wanted and not (work / f"model-{precision}.gguf").exists():
            print(f"converting to GGUF {outtype} ...", flush=True)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                            "--outfile", str(work / f"model-{precision}.gguf")], check=True, env=env,
                           stdout=subprocess.DEVNULL)
    if "int4" in files and not files["int4"].exists():
        print("quantizing GGUF Q4_0 ...", flush=True)
        params = L.llama_model_quantize_default_params()
        params.ftype = getattr(L, LLAMA_TYPES["int4"])
        params.nthread = os.cpu_count() or 2
        if L.llama_model_quantize(str(work / "model-bf16.gguf").encode(), str(files["int4"]).encode(), params):
            raise RuntimeError("llama_model_quantize failed")
    return files


def quant_spec(precision: str):
    """smoe's QuantSpec of a precision other than bf16 (the strings smoe.load's quant= reads)."""
    from smoe.options import QuantSpec

    return QuantSpec.parse(precision)


def llama_precision(precision: str) -> str:
    """The GGUF file a precision is measured against: bf16, int8 (Q8_0) or int4 (Q4_0)."""
    return "bf16" if precision == "bf16" else f"int{quant_spec(precision).bits}"


def smoe_checkpoint(model_dir: Path, out: Path, precision: str) -> Path:
    """The checkpoint quantized by smoe (made once, like the GGUF files; made again where one
    made before holds another quantization, e.g. from before a default changed)."""
    import shutil

    from smoe.config import ModelConfig
    from smoe.options import QuantSpec
    from smoe.quantize import resolve_quant as resolve

    spec = resolve(quant_spec(precision), ModelConfig.from_dir(model_dir))
    if (out / "config.json").exists() and QuantSpec.from_config(ModelConfig.from_dir(out).quantization) != spec:
        shutil.rmtree(out)
    if not (out / "config.json").exists():
        print(f"smoe quantize {precision} ...", flush=True)
        extra = ["--group-size", str(spec.group_size)] if spec.bits == 4 else []
        extra += ["--quant-head" if spec.head else "--no-quant-head"]
        subprocess.run([sys.executable, "-m", "smoe.cli", "quantize", "--model", str(model_dir),
                        "--bits", str(spec.bits), *extra, "--out", str(out)], check=True)
    return out


def rooflines(model_dir: Path, threads: int) -> dict:
    """Streaming-read bandwidth (GB/s) and bf16 GEMM throughput (GFLOP/s) of this machine."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(1 << 28, dtype=torch.uint8)  # 256 MiB
    dst = torch.empty_like(src)

    def best(fn, n):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    copy = 2 * src.nbytes / best(lambda: dst.copy_(src), 10) / 1e9  # a copy reads and writes each byte
    words = src.view(torch.int64)
    read = words.nbytes / best(lambda: torch.bitwise_xor(words[::1], 0, out=dst.view(torch.int64)), 10) / 1e9 * 2
    a = torch.randn(512, 1024, dtype=torch.bfloat16)
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(3584, 1024, dtype=torch.bfloat16), 1)
        t = best(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""), 10)
        gemm = "bf16"
    except RuntimeError:  # no bf16 packing without AVX-512 BW/VL/DQ or AVX-NE-CONVERT: fp32, what smoe uses there
        a, w = a.float(), torch.randn(3584, 1024)
        t = best(lambda: torch.nn.functional.linear(a, w), 10)
        gemm = "fp32"
    return {"bandwidth_gbs": round(max(copy, read), 1), "gemm_bf16_gflops": round(2 * 512 * 1024 * 3584 / t / 1e9, 1),
            "gemm_dtype": gemm}


def active_fraction(model_dir: Path, batch: int) -> float:
    """Share of the stored weights one decode step reads per sequence: attention, routers and
    the output head always; of the experts, the expected number of distinct ones the batch
    routes to per layer (E·(1 - (1 - K/E)^B)); the embedding only a row."""
    from smoe.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    counts = c.parameter_counts()
    E, K = c.num_local_experts, c.num_experts_per_tok
    distinct = E * (1 - (1 - K / E) ** batch)
    embed = c.vocab_size * c.hidden_size
    read = counts["total"] - embed - counts["experts"] * (1 - distinct / E)
    return read / counts["total"] / batch


def weight_bytes(path: Path) -> int:
    """Bytes of weights an engine holds: its safetensors or GGUF files."""
    files = [path] if path.is_file() else [*path.glob("*.safetensors")]
    return sum(f.stat().st_size for f in files)


def flops_per_token(model_dir: Path) -> float:
    from smoe.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    return 2 * (c.parameter_counts()["active"] - c.hidden_size)


# ------------------------------------------------------------------------------- driver


def child(args) -> int:
    cfg = {"batches": [int(b) for b in args.batches.split(",")], "prefill": args.prefill, "prompt": args.prompt,
           "decode": args.decode}
    runner = {"smoe": run_smoe, "transformers": run_transformers, "llama.cpp": run_llama}[args.engine]
    result = runner(args.target, args.precision, args.threads, cfg)
    print(json.dumps({"result": result, "peak_rss_mib": round(peak_rss_mib())}))
    return 0


def cpu() -> str:
    """The CPU model and the instruction sets the engines can use (from /proc/cpuinfo, as lscpu
    shows them), and which kernels smoe runs on it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
    from smoe.kernels import ops

    kernels = f"native ({ops.variant()})" if ops.available() else f"PyTorch ({ops.unavailable_reason()})"
    return f"{model}; {' '.join(f for f in wanted if f in flags)}; smoe kernels: {kernels}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return "unknown"


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = ["smoe", "llama.cpp", "transformers"]
    precisions = ["bf16", "int8", "int4"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "decode_tok_s", "decode tokens/s (batch 1)"),
                              (axes[1], "prefill_tok_s", "prefill tokens/s (512-token prompt, batch 1)")):
        for i, engine in enumerate(engines):
            values = [next((r[metric] for r in rows if r["engine"] == engine and r["precision"] == p
                            and r["batch"] == 1), 0) for p in precisions]
            ax.bar([x + (i - 1) * 0.27 for x in range(3)], values, width=0.27, label=engine)
        ax.set_xticks(range(3), precisions)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: the benchmark checkpoint, made if missing)")
    p.add_argument("--engines", default="smoe,llama.cpp,transformers")
    p.add_argument("--precisions", default="bf16,int8,int4")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "engines")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        return child(args)

    from smoe.errors import SmoeError

    for precision in args.precisions.split(","):
        try:
            precision == "bf16" or quant_spec(precision)
        except SmoeError as e:
            p.error(f"--precisions: {e}")
    if args.model is None:
        from random_checkpoint import write

        args.model = write(HERE / "out" / "bench-ckpt", "bench", __import__("torch").bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    engines, precisions = args.engines.split(","), args.precisions.split(",")
    ggufs = {}
    if "llama.cpp" in engines:  # int4, int4-g32 and the +keephead variants are measured against the same GGUFs
        made = gguf_files(args.model, args.out / f"gguf-{args.model.name}",
                          list(dict.fromkeys(llama_precision(p) for p in precisions)))
        ggufs = {p: made[llama_precision(p)] for p in precisions}
    quantized = {"bf16": args.model}
    for precision in precisions:
        if precision != "bf16" and "smoe" in engines:
            quantized[precision] = smoe_checkpoint(args.model, args.out / f"smoe-{args.model.name}-{precision}",
                                                   precision)
    first = {llama_precision(p): p for p in reversed(precisions)}  # llama.cpp runs each GGUF file once
    combos = [(e, pr) for pr in precisions for e in engines if not (e == "transformers" and pr != "bf16")
              and not (e == "llama.cpp" and first[llama_precision(pr)] != pr)]
    best: dict[tuple, dict] = {}
    for r in range(args.repeats):
        for engine, precision in combos:
            target = str(ggufs[precision] if engine == "llama.cpp" else quantized[precision])
            cmd = [sys.executable, __file__, "--engine", engine, "--precision", precision, "--target", target,
                   "--threads", str(args.threads), "--batches", args.batches, "--prefill", str(args.prefill),
                   "--prompt", str(args.prompt), "--decode", str(args.decode)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{engine} {precision} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            report = json.loads(done.stdout.strip().splitlines()[-1])
            for batch, m in report["result"].items():
                key = (engine, precision, int(batch))
                old = best.get(key)
                merged = {"peak_rss_mib": report["peak_rss_mib"], **m}
                if old:
                    merged = {"prefill_tok_s": max(old["prefill_tok_s"], m["prefill_tok_s"]),
                              "decode_tok_s": max(old["decode_tok_s"], m["decode_tok_s"]),
                              "ttft_s": min(old["ttft_s"], m["ttft_s"]),
                              "peak_rss_mib": min(old["peak_rss_mib"], report["peak_rss_mib"])}
                best[key] = merged
            b1 = report["result"]["1"] if "1" in report["result"] else next(iter(report["result"].values()))
            print(f"run {r + 1}/{args.repeats}  {engine:<12} {precision:<8} decode {b1['decode_tok_s']:7.1f} tok/s  "
                  f"prefill {b1['prefill_tok_s']:7.1f} tok/s", flush=True)

    for (engine, precision, batch), m in list(best.items()):
        if engine == "llama.cpp":  # the same file's figures for every precision measured against it
            for other in precisions:
                if llama_precision(other) == llama_precision(precision):
                    best[(engine, other, batch)] = m
    roof = rooflines(args.model, args.threads)
    flops = flops_per_token(args.model)
    rows = []
    for (engine, precision, batch), m in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        stored = weight_bytes(ggufs[precision] if engine == "llama.cpp" else quantized[precision])
        bytes_per_token = stored * active_fraction(args.model, batch)
        rows.append({"engine": engine, "precision": precision, "batch": batch,
                     **{k: round(v, 3) for k, v in m.items()},
                     "decode_roofline": round(m["decode_tok_s"] * bytes_per_token / 1e9 / roof["bandwidth_gbs"], 3),
                     "bytes_per_token": int(bytes_per_token),
                     "prefill_gemm": round(m["prefill_tok_s"] * flops / 1e9
                                           / roof["gemm_bf16_gflops"], 3)})
    lines = [f"model: {args.model}  commit: {commit()}  machine: {cpu()}, "
             f"{args.threads} threads  bandwidth {roof['bandwidth_gbs']} GB/s  "
             f"{roof['gemm_dtype']} GEMM {roof['gemm_bf16_gflops']} "
             "GFLOP/s", "",
             "| precision | batch | engine | decode tok/s | of roofline | prefill tok/s | of GEMM | TTFT 512 (ms) | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['engine']} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_roofline']:.0%} | {r['prefill_tok_s']:.1f} | {r['prefill_gemm']:.0%} | "
                     f"{r['ttft_s'] * 1000:.0f} | {r['peak_rss_mib']:.0f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    summary = {"rooflines": roof, "rows": rows, "commit": commit(), "cpu": cpu(), "model": str(args.model)}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(rows, args.out / "engines.png",
          f"{args.model.name}: smoe vs llama.cpp vs transformers ({args.threads} threads)")
    print(f"wrote {args.out}/results.md, results.json, engines.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
