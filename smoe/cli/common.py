"""What every model verb shares: the model and sampling flags, turned once into typed
options (smoe/options.py) and a loaded model; the one-line timing summary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smoe import parallel
from smoe.errors import SmoeError
from smoe.loader import LoadOptions, gguf_in_place_for, load_model, model_path
from smoe.offload import format_bytes
from smoe.options import (
    DEFAULT_CACHE_POLICY,
    DEFAULT_INT4_GROUP_SIZE,
    FALLBACK_INT4_GROUP_SIZE,
    INT4_GROUP_SIZES,
    OffloadSpec,
    QuantSpec,
    parse_dtype,
)
from smoe.weights import parse_quant

EXIT_USAGE = 2
LOADED: list = []  # models whose expert statistics --stats prints at the end


def sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=int, default=256,
                   help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", "--temp", dest="temperature", type=float, default=0.0,
                   help="0 = greedy (default), higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", "--repeat-penalty", dest="repetition_penalty", type=float, default=1.0,
                   help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help=r"stop at this text (repeatable; \n and \t are understood)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def quant_layout_args(p: argparse.ArgumentParser) -> None:
    """--group-size and --quant-head / --no-quant-head (`smoe quantize` and --quant at load)."""
    p.add_argument("--group-size", type=int, default=None, choices=INT4_GROUP_SIZES,
                   help=f"int4: input columns per scale and zero (default {DEFAULT_INT4_GROUP_SIZE}: 4.5 bits per "
                        f"weight, llama.cpp Q4_0's size; {FALLBACK_INT4_GROUP_SIZE} where a width is not a multiple)")
    p.add_argument("--quant-head", action=argparse.BooleanOptionalAction, default=None,
                   help="the output head int8 per channel too (default: yes unless it is tied to the embeddings, "
                        "as llama.cpp and mlx-lm do; --no-quant-head keeps it in the model's precision)")


def model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", metavar="DIR", help="checkpoint directory")
    else:
        p.add_argument("-m", "--model", metavar="MODEL", default=None,
                       help="checkpoint directory, hub id (org/name[@revision]) or .gguf file "
                            "(default: the demo model)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle weights (.bin/.pt/.pth) with torch.load(weights_only=True)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="apply a LoRA adapter (PEFT format)")
    p.add_argument("--gguf-in-place", action=argparse.BooleanOptionalAction, default=None,
                   help="a .gguf model's quantized tensors used as the file holds them, memory-mapped (the "
                        "default whenever the file's experts are quantized and no option needs a converted "
                        "checkpoint); --no-gguf-in-place converts the file once to bf16 instead")
    p.add_argument("--compile", action="store_true",
                   help="compile each decode step whole with torch.compile (tens of seconds once; faster "
                        "decode where Python overhead dominates, e.g. small models in bf16/fp32)")
    p.add_argument("--quant", default=None, metavar="KIND",
                   help="quantize the weights at load: int8 per channel, or int4 in groups (see --group-size); "
                        "or the name of a registered weight format")
    quant_layout_args(p)
    p.add_argument("--parallel", default=None, metavar="HOW",
                   help="under torchrun: split the model over the processes by expert, tensor or expert,tensor "
                        "(default expert; docs/DISTRIBUTED.md)")
    o = p.add_argument_group("expert offloading (docs/OFFLOAD.md)")
    o.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="keep at most SIZE of experts in memory (e.g. 6GiB, 512MiB); read the rest from disk")
    o.add_argument("--cache-policy", choices=["lru", "lfu"], default=DEFAULT_CACHE_POLICY,
                   help="which expert leaves the cache first: least recently (default) or least often used")
    o.add_argument("--expert-profile", metavar="FILE", default=None,
                   help="pin the experts a `smoe profile` file shows used most")
    o.add_argument("--no-prefetch", action="store_true",
                   help="do not load the next layer's guessed experts in the background")
    o.add_argument("--max-cpu-memory", metavar="SIZE", default="0",
                   help="with --device cuda: a RAM tier of SIZE between disk and the GPU cache (default none)")
    o.add_argument("--stats", action="store_true",
                   help="print expert cache statistics at the end (hit rates, disk reads, prefetch accuracy)")


def unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def sampling(args) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": [unescape(s) for s in args.stop], "ignore_eos": args.ignore_eos, "compile": args.compile,
    }


def load(args):
    """The model and tokenizer the flags describe (smoe/loader.py applies the transforms)."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SmoeError(f"--device {args.device}: no CUDA device is available; use --device cpu")
    if args.max_memory is None and (args.expert_profile or args.cache_policy != DEFAULT_CACHE_POLICY or args.stats):
        raise SmoeError("--expert-profile, --cache-policy and --stats work on offloaded experts: "
                        "add --max-memory SIZE")
    offload = None if args.max_memory is None else OffloadSpec(
        args.max_memory, policy=args.cache_policy, profile=args.expert_profile, prefetch=not args.no_prefetch,
        max_cpu_memory=args.max_cpu_memory)
    if args.quant is None and (args.quant_head is not None or args.group_size is not None):
        flag = "--group-size" if args.group_size is not None else "--quant-head / --no-quant-head"
        raise SmoeError(f"{flag} sets how --quant int8 or --quant int4 quantizes; add --quant")
    if args.quant in ("int8", "int4"):
        quant = QuantSpec(8 if args.quant == "int8" else 4, args.group_size, head=args.quant_head)
    elif args.quant is not None:
        if args.quant_head is not None or args.group_size is not None:
            raise SmoeError(f"--group-size and --quant-head set how int8 / int4 quantize, not --quant {args.quant}")
        quant = parse_quant(args.quant)  # another registered weight format, or an error naming them
    else:
        quant = None

    spec = None
    if args.parallel is not None or parallel.launched():
        if not parallel.launched():
            raise SmoeError("--parallel splits the model over processes: start them with torchrun, e.g. "
                            "torchrun --nproc-per-node 2 -m smoe generate --parallel expert ...")
        spec = parallel.ParallelSpec.parse(args.parallel or "expert")
    options = LoadOptions(dtype=parse_dtype(args.dtype), device=args.device, allow_pickle=args.allow_pickle,
                          quant=quant, offload=offload, adapter=args.adapter and Path(args.adapter), progress=True,
                          compile=args.compile, parallel=spec, gguf_in_place=args.gguf_in_place)
    model, tokenizer = load_model(model_path(args.model, gguf_in_place_for(args.model, options)), options)
    if spec is not None:
        if hasattr(args, "seed"):  # every rank must draw the same tokens
            args.seed = parallel.broadcast_seed(args.seed)
        if parallel.dist.get_rank() != 0:  # rank 0 prints, so that --json output is one object
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if offload is not None:
        store, c = model.expert_store, model.config
        total = c.num_hidden_layers * c.num_local_experts
        fits = min(total, store.compute.budget // store.expert_bytes)
        how = f"{len(store.compute.pinned)} pinned from {args.expert_profile}, the rest " if args.expert_profile else ""
        how += args.cache_policy.upper() + (", no prefetch" if args.no_prefetch else ", prefetch on")
        print(f"offloading experts: {format_bytes(store.compute.budget)} holds {fits} of the {total} experts "
              f"({format_bytes(store.expert_bytes)} each); {how}", file=sys.stderr)
    if args.compile:
        print("--compile: the first generation compiles the decode step (10-30 s, once per model and "
              "cache length); its time is not in the tokens/s", file=sys.stderr)
    if args.stats:
        LOADED.append(model)
    return model, tokenizer


def verbose_stats(r) -> str:
    """The summary mlx-lm prints with --verbose: prompt and generation speed, peak memory."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GB
    return ("==========\n"
            f"Prompt: {r.prompt_tokens} tokens, {r.prefill_tokens_per_s:.3f} tokens-per-sec\n"
            f"Generation: {len(r.token_ids)} tokens, {r.decode_tokens_per_s:.3f} tokens-per-sec\n"
            f"Peak memory: {peak:.3f} GB")


def stats_line(r) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prefill_tokens_per_s:.1f} tokens/s | "
        f"generation: {len(r.token_ids)} tokens, {r.decode_tokens_per_s:.1f} tokens/s | "
        f"time to first token: {r.time_to_first_token_s * 1000:.0f} ms"
    )


def copy_tokenizer_files(src, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json",
                 "generation_config.json"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, dst / name)


def check_new_dir(path: Path) -> None:

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SmoeError(f"{path}: exists and is not an empty directory; choose a new --out")
