"""smoe info, smoe quantize, smoe convert, smoe lora merge, smoe bench: checkpoints and their speed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smoe.checkpoint import save_checkpoint
from smoe.cli.common import check_new_dir, copy_tokenizer_files, quant_layout_args
from smoe.config import ModelConfig
from smoe.errors import SmoeError
from smoe.experts import Expert
from smoe.formats.gguf import convert
from smoe.formats.gguf_write import TYPES as GGUF_TYPES
from smoe.formats.gguf_write import check_type, check_writable, write_gguf
from smoe.loader import LoadOptions, build_model, load_model, model_path
from smoe.lora import load_adapter, merge_lora
from smoe.offload import format_bytes, module_bytes
from smoe.options import QuantSpec, parse_dtype
from smoe.quantize import quantize_expert, quantize_model
from smoe.tokenizer import load_tokenizer
from smoe.weights import format_named


def register(sub) -> None:
    i = sub.add_parser("info", help="describe a checkpoint",
                       description="Config, parameters and memory of a checkpoint.")
    i.add_argument("model", metavar="DIR", nargs="?", default=None,
                   help="checkpoint directory (default: the demo model)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--kernels", action="store_true",
                   help="load the model for inference and say which backend multiplies which weights, and why "
                        "the others were not asked")
    i.add_argument("--quant", choices=["int8", "int4"], default=None, help="with --kernels: quantize at load")
    i.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="with --kernels: the compute dtype (default: the checkpoint's own)")
    i.set_defaults(run=cmd_info)

    q = sub.add_parser("quantize", help="write an int8 or int4 weight-only quantized checkpoint, or a GGUF file",
                       description="Quantize the attention and expert weights (int8 per output channel, or int4 "
                                   "with a scale and zero per group of input columns); the router, norms, "
                                   "embeddings stay in high precision, the output head too where it is tied to them "
                                   "(otherwise it is int8 per channel unless --no-quant-head). "
                                   "Every verb loads the result directly. "
                                   "With --type instead of --bits: a GGUF file for llama.cpp in one of its presets "
                                   "(smoe quantize --type Q4_K_M --out model.gguf: 4-bit K-quant experts, attention "
                                   "and the output head at more bits, as llama-quantize mixes them), written tensor "
                                   "by tensor; smoe runs it in place (smoe generate --model model.gguf).")
    q.add_argument("--model", metavar="DIR", default=None, help="checkpoint directory (default: the demo model)")
    q.add_argument("--bits", type=int, choices=[8, 4], default=None, help="8 or 4 (smoe's int8 / int4)")
    q.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default=None,
                   help="write a GGUF file of this llama.cpp preset instead (--out FILE.gguf): Q8_0 (~8.5 bits a "
                        "weight), Q4_K_M (~4.8), Q4_0 (~4.5), Q3_K_M (~3.9), Q3_K_S (~3.5), Q2_K (~3.0)")
    quant_layout_args(q)
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the unquantized weights and scales (default: the checkpoint's)")
    q.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="where to write the quantized checkpoint (with --type: the .gguf file)")
    q.set_defaults(run=cmd_quantize)

    c = sub.add_parser("convert", help="convert a GGUF file (llama.cpp) into a checkpoint directory",
                       description="Read a Mixtral- or Llama-family GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K, "
                                   "dequantized) and write a Hugging Face-layout checkpoint with its tokenizer. "
                                   "(Every verb also takes --model FILE.gguf, converting once into a cache.)",
                       epilog="Example: smoe convert --from mixtral-8x7b.Q4_K_M.gguf --out Mixtral-8x7B/ && "
                              "smoe generate -m Mixtral-8x7B/ --quant int4 -p Hello")
    c.add_argument("--from", dest="source", required=True, type=Path, metavar="FILE", help="the .gguf file")
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the checkpoint")
    c.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: each tensor's own float type; quantized ones "
                        "are dequantized to bf16)")
    c.set_defaults(run=cmd_convert)

    lo = sub.add_parser("lora", help="LoRA adapter tools", description="LoRA adapter tools.")
    losub = lo.add_subparsers(dest="lora_command", metavar="ACTION")
    losub.required = True
    m = losub.add_parser("merge", help="merge an adapter into its base model and save a plain checkpoint")
    m.add_argument("--model", required=True, metavar="DIR", help="base checkpoint directory")
    m.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory (PEFT format)")
    m.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the merged checkpoint")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype to save (default: the base's)")
    m.set_defaults(run=cmd_lora)

    be = sub.add_parser("bench", help="speed vs llama.cpp and transformers (runs benchmarks/bench_engines.py)",
                        description="Prefill and decode tokens/s, time to first token and peak RSS of smoe, "
                                    "llama.cpp and transformers at bf16 / int8 / int4, with roofline fractions; "
                                    "needs a source checkout and `pip install -e '.[bench]'`. Extra arguments "
                                    "go to the script (see python benchmarks/bench_engines.py --help).")
    be.add_argument("--model", metavar="DIR", default=None,
                    help="checkpoint (default: the benchmark checkpoint, written if missing)")
    be.add_argument("rest", nargs=argparse.REMAINDER, help="more options for benchmarks/bench_engines.py")
    be.set_defaults(run=cmd_bench)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def cmd_info(args) -> int:
    import torch

    path = model_path(args.model)  # a directory, a hub id or a .gguf file
    if not path.is_dir():
        raise SmoeError(f"{path}: not a checkpoint directory")
    config = ModelConfig.from_dir(path)
    info = config.describe()
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if stored:
        info["stored_bytes"] = stored
    if (args.quant or args.dtype) and not args.kernels:
        raise SmoeError("--quant and --dtype say how --kernels loads the model: add --kernels")
    if args.kernels:  # the inference layout smoe.load makes here, and what it chose
        options = LoadOptions(dtype=parse_dtype(args.dtype), quant=QuantSpec.parse(args.quant) if args.quant else None)
        info["kernels"] = load_model(path, options)[0].kernels.report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = config
    print(f"{path}")
    print(f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads} "
          f"(kv {c.num_key_value_heads}, head dim {c.head_dim}), vocab {c.vocab_size}")
    print(f"  experts {c.num_local_experts} x ffn {c.intermediate_size}, top-{c.num_experts_per_tok} per token")
    print(f"  rope theta {c.rope_theta:g}, sliding window {c.sliding_window or 'none'}, "
          f"context {c.max_position_embeddings}")
    print(f"  parameters: {_count(info['parameters'])} total, "
          f"{_count(info['active_parameters_per_token'])} active per token "
          f"({info['expert_parameters'] / info['parameters']:.0%} of all weights are experts)")
    q = c.quantization
    # smoe's int8 / int4, or another registered weight format (smoe/weights.py), by its name
    fmt = None if not q or q.get("method") == "smoe" else format_named(q["format"]["name"])
    spec = None if not q else QuantSpec.from_config(q) if q.get("method") == "smoe" else \
        fmt and fmt.spec_from_config and fmt.spec_from_config(q)
    if q:
        kind = spec.describe() if isinstance(spec, QuantSpec) else \
            f"in the format {q['format']['name']} v{q['format']['version']}"
        print(f"  quantized: attention and expert weights {kind}; {format_bytes(stored)} on disk")
    print("  dtype   weights      read/token   KV cache/token" + ("   (unquantized, for comparison)" if q else ""))
    for dtype, m in info["memory"].items():
        weights, read = format_bytes(m["weights_bytes"]), format_bytes(m["bytes_read_per_token"])
        print(f"  {dtype:<6}  {weights:<11}  {read:<11}  "
              f"{m['kv_cache_bytes_per_token'] / 1024:.1f} KiB")
    # one expert as it is stored and loaded: its structure on meta (quantized like the checkpoint)
    expert = Expert(c.hidden_size, c.intermediate_size).to(device="meta", dtype=torch.bfloat16)
    if spec:
        expert = quantize_expert(expert, spec)
    n_experts = c.num_hidden_layers * c.num_local_experts
    size = module_bytes(expert)
    label = (f"int{q['bits']}" if q.get("method") == "smoe" else q["format"]["name"]) if q else "bf16"
    if not q or spec:  # a format this smoe does not have registered: its experts' size is not known here
        print(f"  offloading (--max-memory): {n_experts} experts of {format_bytes(size)} ({label}); "
              f"half of them in memory takes {format_bytes(size * n_experts // 2)}")
    for line in info.get("kernels", ()):
        print(f"  {line}")
    return 0


def cmd_quantize(args) -> int:
    import time

    if (args.bits is None) == (args.gguf_type is None):
        raise SmoeError("smoe quantize: give --bits 8|4 (a smoe checkpoint) or --type "
                        f"{'|'.join(GGUF_TYPES)} (a GGUF file)")
    if args.gguf_type is not None:
        return quantize_to_gguf(args)
    check_new_dir(args.out)
    spec = QuantSpec(args.bits, args.group_size, head=args.quant_head)

    source = str(model_path(args.model))
    start = time.perf_counter()
    model = build_model(source, dtype=args.dtype)  # memory-mapped: each weight is read once, as it is quantized
    if model.config.quantization:
        raise SmoeError(f"{source}: is already quantized ({model.config.quantization['bits']} bits)")
    before = sum(t.nbytes for t in model.state_dict().values())
    count = quantize_model(model, spec, progress=True)
    after = sum(t.nbytes for t in model.state_dict().values())
    save_checkpoint(model, args.out)
    copy_tokenizer_files(source, args.out)
    done = QuantSpec.from_config(model.config.quantization)  # what the model's shape resolved
    kind = ("int8 per channel" if done.bits == 8 else f"int4, group {done.group_size}") + (
        ", head int8" if done.head else "")
    print(f"quantized {count} linears ({kind}): {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"in {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


def quantize_to_gguf(args) -> int:
    import time

    if args.group_size is not None or args.quant_head is not None or args.dtype is not None:
        raise SmoeError("smoe quantize --type: --group-size, --quant-head and --dtype are for --bits")
    check_type(args.gguf_type)
    check_writable(args.out)
    source = model_path(args.model)
    start = time.perf_counter()
    model = build_model(source)  # memory-mapped: each weight is read when its tensor is written
    tokenizer = load_tokenizer(source)  # BOS / EOS as smoe reads them (tokenizer_config.json, else <s> / </s>)
    counts = write_gguf(model, source, args.out, args.gguf_type, bos_id=getattr(tokenizer, "bos_id", None),
                        eos_id=getattr(tokenizer, "eos_id", None))
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB; tensors {kinds}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_lora(args) -> int:

    check_new_dir(args.out)
    base = model_path(args.model)
    saved_dtype = parse_dtype(args.dtype) or build_model(base).dtype  # memory-mapped: no copy
    model = build_model(base, dtype="fp32")  # merge in fp32, then save in the wanted dtype
    load_adapter(model, args.adapter)
    merge_lora(model, unwrap=True)
    save_checkpoint(model, args.out, dtype=saved_dtype)
    copy_tokenizer_files(base, args.out)
    print(f"merged {args.adapter} into {args.model}; wrote {args.out}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engines.py"
    if not script.exists():
        raise SmoeError("smoe bench runs from a source checkout (benchmarks/bench_engines.py is not installed "
                        "with the package); clone the repository and run it there")
    model = ["--model", args.model] if args.model else []
    return subprocess.run([sys.executable, str(script), *model, *args.rest]).returncode


def cmd_convert(args) -> int:

    if not args.source.is_file():
        raise SmoeError(f"--from {args.source}: no such file")
    check_new_dir(args.out)
    out = convert(args.source, args.out, dtype=parse_dtype(args.dtype))
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}: {config['num_hidden_layers']} layers, {config['num_local_experts']} experts "
          f"(top-{config['num_experts_per_tok']}), hidden {config['hidden_size']}, vocabulary {config['vocab_size']}"
          f"{', with its tokenizer' if any((out / n).exists() for n in ('tokenizer.model', 'tokenizer.json')) else ''}")
    return 0
