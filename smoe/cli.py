"""The `smoe` command: generate, chat, info.

User mistakes (bad path, bad flag value, broken checkpoint) print one line
`smoe: error: ...` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help=r"stop at this text (repeatable; \n and \t are understood)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", metavar="DIR", help="checkpoint directory")
    else:
        p.add_argument("--model", metavar="DIR", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle weights (.bin/.pt/.pth) with torch.load(weights_only=True)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="apply a LoRA adapter (PEFT format)")
    p.add_argument("--quant", choices=["int8", "int4"], default=None,
                   help="quantize the weights at load: int8 per channel, or int4 in groups (see --group-size)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256],
                   help="int4 group size (default 32)")
    o = p.add_argument_group("expert offloading (docs/OFFLOAD.md)")
    o.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="keep at most SIZE of experts in memory (e.g. 6GiB, 512MiB); read the rest from disk")
    o.add_argument("--cache-policy", choices=["lru", "lfu"], default="lru",
                   help="which expert leaves the cache first: least recently (default) or least often used")
    o.add_argument("--expert-profile", metavar="FILE", default=None,
                   help="pin the experts a `smoe profile` file shows used most")
    o.add_argument("--no-prefetch", action="store_true",
                   help="do not load the next layer's guessed experts in the background")
    o.add_argument("--max-cpu-memory", metavar="SIZE", default="0",
                   help="with --device cuda: a RAM tier of SIZE between disk and the GPU cache (default none)")
    o.add_argument("--stats", action="store_true",
                   help="print expert cache statistics at the end (hit rates, disk reads, prefetch accuracy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoe", description="Run Mixtral-family sparse mixture-of-experts models.",
        epilog="Example: smoe generate --model ./Mixtral-8x7B --prompt 'The capital of France is'",
    )
    parser.add_argument("--version", action="version", version=f"smoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="continue a prompt",
                       description="Continue a prompt and print tokens/s.")
    _model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text ('-' reads standard input)")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="prompt as comma-separated token ids (models without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and timings")
    g.add_argument("--trace-routing", type=Path, metavar="FILE", default=None,
                   help="write each token's experts, weights and router entropy per layer to FILE (JSON)")
    _sampling_args(g)

    c = sub.add_parser("chat", help="talk to the model",
                       description="Interactive multi-turn chat. /reset clears, /exit quits.")
    _model_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c)
    c.set_defaults(max_tokens=512)

    t = sub.add_parser("train", help="train a model (from scratch or a checkpoint)",
                       description="Train with next-token cross-entropy plus Mixtral's load-balancing loss.")
    t.add_argument("--config", required=True, metavar="FILE", help="training config (JSON), e.g. configs/demo.json")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")

    f = sub.add_parser("finetune", help="fine-tune a model with LoRA or QLoRA adapters",
                       description="Fine-tune with LoRA (or QLoRA: LoRA over a frozen 4-bit NF4 base) on plain text "
                                   "or chat data; writes a PEFT-format adapter to --out.")
    f.add_argument("--model", metavar="DIR", default=None, help="base checkpoint directory (default: the demo model)")
    f.add_argument("--data", required=True, metavar="FILE",
                   help="training data: JSONL with 'text' per line, a plain text file, or (with --chat) "
                        "JSONL with 'messages'")
    f.add_argument("--chat", action="store_true",
                   help="the data are conversations; learn only the assistant's tokens")
    f.add_argument("--heldout", metavar="FILE", default=None,
                   help="held-out data in the same format (default: every 20th example of --data)")
    f.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory; the adapter is saved here")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    lg = f.add_argument_group("adapters")
    lg.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default 8)")
    lg.add_argument("--lora-alpha", type=float, default=None, help="scale alpha; updates are scaled by alpha/r "
                    "(default 2r)")
    lg.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    lg.add_argument("--targets", default="attention",
                    help="comma-separated modules: q_proj, k_proj, v_proj, o_proj, w1, w2, w3 (every expert), "
                         "router; or the groups attention, experts, all (default attention)")
    lg.add_argument("--qlora", action="store_true", help="quantize the frozen base to NF4 (QLoRA)")
    lg.add_argument("--full", action="store_true", help="train every weight instead of adapters (saves checkpoints)")
    og = f.add_argument_group("optimisation")
    og.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    og.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    og.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, cosine-decayed to a tenth "
                    "(default 2e-4)")
    og.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    og.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    og.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    og.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    og.add_argument("--aux-loss-coef", type=float, default=0.02,
                    help="weight of the load-balancing loss (default 0.02; 0 = off)")
    og.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward: less memory, ~30%% more time")
    og.add_argument("--eval-every", type=int, default=None,
                    help="steps between held-out evaluations (default: 5 over the run)")
    og.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: 5 over the run)")
    og.add_argument("--seed", type=int, default=0, help="random seed (data order, adapter init)")

    d = sub.add_parser("data", help="build the demo corpus", description="Build the demo model's corpus offline.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    b = dsub.add_parser("build", help="download Debian fortune packages + the Python stdlib, split, train a tokenizer")
    b.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory, e.g. data/corpus")
    b.add_argument("--debs", type=Path, default=None, metavar="DIR",
                   help="use these .deb files instead of apt-get download")
    b.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")

    r = sub.add_parser("routes", help="analyse expert routing on a text",
                       description="Expert load, per-domain load and consecutive-token routing, "
                                   "as in the Mixtral paper.")
    _model_args(r)
    r.add_argument("--input", type=Path, metavar="FILE", help="text file, or JSONL with 'text' (and 'domain')")
    r.add_argument("--domains", type=Path, metavar="FILE", help="JSONL of documents labelled with 'domain'")
    r.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    r.add_argument("--layer", type=int, default=None, help="layer the HTML page colours by (default: the middle one)")
    r.add_argument("--max-tokens-per-doc", type=int, default=1024, help="truncate documents (default 1024 tokens)")
    r.add_argument("--max-docs", type=int, default=None, help="use at most this many documents per domain")

    pr = sub.add_parser("profile", help="record which experts a workload uses (for --expert-profile)",
                        description="Run a text through the model and count, per layer, the tokens each expert "
                                    "gets. Offloading with --expert-profile pins the most used experts.")
    _model_args(pr)
    pr.add_argument("--input", type=Path, required=True, metavar="FILE",
                    help="the workload: a text file, or JSONL with a 'text' field per line")
    pr.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the profile (JSON)")
    pr.add_argument("--max-input-tokens", type=int, default=None, help="use at most this many tokens of the input")
    pr.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")

    lo = sub.add_parser("lora", help="LoRA adapter tools", description="LoRA adapter tools.")
    losub = lo.add_subparsers(dest="lora_command", metavar="ACTION")
    losub.required = True
    m = losub.add_parser("merge", help="merge an adapter into its base model and save a plain checkpoint")
    m.add_argument("--model", required=True, metavar="DIR", help="base checkpoint directory")
    m.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory (PEFT format)")
    m.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the merged checkpoint")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype to save (default: the base's)")

    q = sub.add_parser("quantize", help="write an int8 or int4 weight-only quantized checkpoint",
                       description="Quantize the attention and expert weights (int8 per output channel, or int4 "
                                   "with a scale and zero per group of input columns); the router, norms, "
                                   "embeddings and output head stay in high precision. Every verb loads the "
                                   "result directly.")
    q.add_argument("--model", metavar="DIR", default=None, help="checkpoint directory (default: the demo model)")
    q.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 or 4")
    q.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=32,
                   help="int4: input columns per scale and zero (default 32)")
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the unquantized weights and scales (default: the checkpoint's)")
    q.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the quantized checkpoint")

    be = sub.add_parser("bench", help="speed vs llama.cpp and transformers (runs benchmarks/bench_engines.py)",
                        description="Prefill and decode tokens/s, time to first token and peak RSS of smoe, "
                                    "llama.cpp and transformers at bf16 / int8 / int4, with roofline fractions; "
                                    "needs a source checkout and `pip install -e '.[bench]'`. Extra arguments "
                                    "go to the script (see python benchmarks/bench_engines.py --help).")
    be.add_argument("--model", metavar="DIR", default=None,
                    help="checkpoint (default: the benchmark checkpoint, written if missing)")
    be.add_argument("rest", nargs=argparse.REMAINDER, help="more options for benchmarks/bench_engines.py")

    i = sub.add_parser("info", help="describe a checkpoint",
                       description="Config, parameters and memory of a checkpoint.")
    i.add_argument("model", metavar="DIR", nargs="?", default=None,
                   help="checkpoint directory (default: the demo model)")
    i.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _version() -> str:
    from smoe import __version__

    return __version__


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _sampling(args) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": [_unescape(s) for s in args.stop], "ignore_eos": args.ignore_eos,
    }


def _load(args):
    import smoe

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise smoe.SmoeError(f"--device {args.device}: no CUDA device is available; use --device cpu")
    quant = args.quant if args.quant != "int4" else f"int4-g{args.group_size}"
    if args.max_memory is None and (args.expert_profile or args.cache_policy != "lru" or args.stats):
        raise smoe.SmoeError("--expert-profile, --cache-policy and --stats work on offloaded experts: "
                             "add --max-memory SIZE")
    model, tokenizer = smoe.load(
        args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle, adapter=args.adapter,
        quant=quant, progress=True, max_memory=args.max_memory, cache_policy=args.cache_policy,
        expert_profile=args.expert_profile, prefetch=not args.no_prefetch, max_cpu_memory=args.max_cpu_memory)
    if args.max_memory is not None:
        from smoe.offload import format_bytes

        store, c = model.expert_store, model.config
        total = c.num_hidden_layers * c.num_local_experts
        fits = min(total, store.compute.budget // store.expert_bytes)
        how = f"{len(store.compute.pinned)} pinned from {args.expert_profile}, the rest " if args.expert_profile else ""
        how += args.cache_policy.upper() + (", no prefetch" if args.no_prefetch else ", prefetch on")
        print(f"offloading experts: {format_bytes(store.compute.budget)} holds {fits} of the {total} experts "
              f"({format_bytes(store.expert_bytes)} each); {how}", file=sys.stderr)
    if args.stats:
        _LOADED.append(model)
    return model, tokenizer


_LOADED: list = []  # models whose expert statistics --stats prints at the end


def _stats_line(r) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prefill_tokens_per_s:.1f} tokens/s | "
        f"generation: {len(r.token_ids)} tokens, {r.decode_tokens_per_s:.1f} tokens/s | "
        f"time to first token: {r.time_to_first_token_s * 1000:.0f} ms"
    )


def cmd_generate(args) -> int:
    import smoe
    from smoe.errors import SmoeError

    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise SmoeError("--prompt-ids must be comma-separated integers, e.g. 1,415,2936") from None
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    if isinstance(prompt, str) and tokenizer is None:
        raise SmoeError(f"{args.model}: this checkpoint has no tokenizer files; pass --prompt-ids instead")
    if args.chat:
        if tokenizer is None:
            raise SmoeError("--chat needs a tokenizer")
        if not isinstance(prompt, str):
            raise SmoeError("--chat takes --prompt text, not --prompt-ids")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    sampling = _sampling(args)
    if args.trace_routing is not None:
        return _generate_traced(args, model, tokenizer, prompt, sampling)
    if args.json or tokenizer is None:
        result = smoe.generate(model, tokenizer, prompt, **sampling)
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            print(" ".join(map(str, result.token_ids)))
            print(_stats_line(result), file=sys.stderr)
        return 0
    if isinstance(prompt, str):
        print(prompt, end="", flush=True)
    result = None
    for item in smoe.stream_generate(model, tokenizer, prompt, **sampling):
        if isinstance(item, str):
            print(item, end="", flush=True)
        else:
            result = item
    print()
    print(_stats_line(result), file=sys.stderr)
    return 0


def _generate_traced(args, model, tokenizer, prompt, sampling) -> int:
    import smoe
    from smoe.checkpoint import atomic_write
    from smoe.routing import token_pieces, trace_routing

    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    with trace_routing(model) as trace:
        result = smoe.generate(model, tokenizer, prompt_ids, **sampling)
    fed = prompt_ids + result.token_ids[:-1]  # the last token was sampled but never run through the model
    pieces = token_pieces(tokenizer, fed) if tokenizer is not None else None
    data = {"prompt_tokens": len(prompt_ids), **trace.to_json(fed, pieces)}
    atomic_write(args.trace_routing, lambda f: f.write_text(json.dumps(data) + "\n"))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print((prompt if isinstance(prompt, str) else "") + result.text if tokenizer else result.token_ids)
        print(_stats_line(result), file=sys.stderr)
        print(f"routing trace of {len(fed)} tokens written to {args.trace_routing}", file=sys.stderr)
    return 0


def cmd_routes(args) -> int:
    from collections import Counter

    from smoe.data import read_jsonl
    from smoe.errors import SmoeError
    from smoe.routing import run_routes

    if args.input is None and args.domains is None:
        raise SmoeError("give --input FILE and/or --domains FILE")
    docs: list[dict] = []
    for path in (args.input, args.domains):
        if path is None:
            continue
        if not path.is_file():
            raise SmoeError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            docs += read_jsonl(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                raise SmoeError(f"{path}: the file is empty")
            docs.append({"domain": path.stem, "text": text})
    if args.max_docs is not None:
        kept, seen = [], Counter()
        for d in docs:
            seen[d.get("domain", "text")] += 1
            if seen[d.get("domain", "text")] <= args.max_docs:
                kept.append(d)
        docs = kept
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise SmoeError(f"{args.model}: routes needs a tokenizer (tokenizer.json or tokenizer.model)")
    L = model.config.num_hidden_layers
    if args.layer is not None and not 0 <= args.layer < L:
        raise SmoeError(f"--layer must be between 0 and {L - 1}")
    report = run_routes(model, tokenizer, docs, args.out, layer=args.layer, max_tokens_per_doc=args.max_tokens_per_doc)
    base = report["random_baseline"]
    print(f"{report['tokens']} tokens in {len(docs)} documents; random baseline: same first expert "
          f"{base['consecutive_same_first']:.1%}, shared top-{report['top_k']} {base['consecutive_same_topk']:.1%}")
    print("layer  same-first  same-top-k  load CV")
    for layer in report["layers"]:
        print(f"{layer['layer']:>5}  {layer['consecutive_same_first']:>10.1%}  {layer['consecutive_same_topk']:>10.1%}"
              f"  {layer['load_cv']:>7.3f}")
    print(f"wrote {args.out}/routes.json, heatmap_*.png, routes.html")
    return 0


def cmd_profile(args) -> int:
    from smoe.data import read_jsonl
    from smoe.errors import SmoeError
    from smoe.offload import expert_usage, write_profile

    if args.window < 1:
        raise SmoeError("--window must be at least 1")
    docs = read_jsonl(args.input)
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise SmoeError(f"{args.model}: profile needs a tokenizer (tokenizer.json or tokenizer.model)")
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc["text"])
    if args.max_input_tokens is not None:
        ids = ids[: args.max_input_tokens]
    if not ids:
        raise SmoeError(f"{args.input}: no tokens to profile")
    counts = expert_usage(model, ids, window=args.window, progress=True)
    write_profile(args.out, counts, len(ids), source=str(args.input))
    share = counts.float() / counts.sum(1, keepdim=True)  # [L, E]
    half = share.sort(1, descending=True).values[:, : counts.shape[1] // 2].sum(1)  # [L]
    print(f"{len(ids)} tokens; the most used half of each layer's experts gets "
          f"{half.min():.1%}-{half.max():.1%} of its token slots (uniform: 50%)")
    print(f"wrote {args.out}")
    return 0


def cmd_chat(args) -> int:
    import smoe
    from smoe.errors import SmoeError

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise SmoeError("chat needs a tokenizer (tokenizer.json or tokenizer.model in the model directory)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("smoe chat — /reset to start over, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history.clear()
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(system + history)
        reply, result = "", None
        try:
            for item in smoe.stream_generate(model, tokenizer, ids, **_sampling(args)):
                if isinstance(item, str):
                    reply += item
                    print(item, end="", flush=True)
                else:
                    result = item
        except SmoeError as e:
            history.pop()
            print(f"smoe: error: {e}", file=sys.stderr)
            continue
        print()
        print(f"[{_stats_line(result)}]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def describe(config) -> dict:
    counts = config.parameter_counts()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    memory = {}
    for dtype, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        memory[dtype] = {
            "weights_bytes": counts["total"] * size,
            "bytes_read_per_token": config.bytes_per_token(dtype),
            "kv_cache_bytes_per_token": kv_per_token * size,
        }
    return {
        "config": {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)},
        "parameters": counts["total"],
        "active_parameters_per_token": counts["active"],
        "expert_parameters": counts["experts"],
        "memory": memory,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"



def cmd_info(args) -> int:
    import torch

    from smoe import DEMO_MODEL
    from smoe.config import ModelConfig
    from smoe.errors import SmoeError
    from smoe.model import Expert
    from smoe.offload import format_bytes, module_bytes
    from smoe.quantize import quantize_expert

    path = Path(args.model) if args.model is not None else DEMO_MODEL
    if not path.is_dir():
        raise SmoeError(f"{path}: not a checkpoint directory")
    config = ModelConfig.from_dir(path)
    info = describe(config)
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if stored:
        info["stored_bytes"] = stored
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
    if q:
        kind = "int8 per output channel" if q["bits"] == 8 else f"int4 in groups of {q['group_size']} columns"
        print(f"  quantized: attention and expert weights {kind}; {format_bytes(stored)} on disk")
    print("  dtype   weights      read/token   KV cache/token" + ("   (unquantized, for comparison)" if q else ""))
    for dtype, m in info["memory"].items():
        weights, read = format_bytes(m["weights_bytes"]), format_bytes(m["bytes_read_per_token"])
        print(f"  {dtype:<6}  {weights:<11}  {read:<11}  "
              f"{m['kv_cache_bytes_per_token'] / 1024:.1f} KiB")
    # one expert as it is stored and loaded: its structure on meta (quantized like the checkpoint)
    expert = Expert(c.hidden_size, c.intermediate_size).to(device="meta", dtype=torch.bfloat16)
    if q:
        expert = quantize_expert(expert, q["bits"], q.get("group_size"))
    n_experts = c.num_hidden_layers * c.num_local_experts
    size = module_bytes(expert)
    label = f"int{q['bits']}" if q else "bf16"
    print(f"  offloading (--max-memory): {n_experts} experts of {format_bytes(size)} ({label}); "
          f"half of them in memory takes {format_bytes(size * n_experts // 2)}")
    return 0


def cmd_train(args) -> int:
    from smoe.errors import SmoeError
    from smoe.train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise SmoeError("--max-steps must be at least 1")
        cfg.max_steps = args.max_steps
    for name in ("train_data", "tokenizer") + (("heldout_data",) if cfg.heldout_data else ()):
        if not Path(getattr(cfg, name)).exists():
            raise SmoeError(f"{args.config}: {name} '{getattr(cfg, name)}' does not exist; "
                            "build the corpus first: smoe data build --out data/corpus")
    summary = train(cfg, resume=args.resume)
    print(f"trained {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min; checkpoints in {cfg.out}")
    return 0


def finetune_config(args):
    """The TrainConfig that `smoe finetune` flags describe."""
    from smoe import DEMO_MODEL
    from smoe.config import ModelConfig
    from smoe.errors import SmoeError
    from smoe.lora import parse_targets
    from smoe.train import TrainConfig

    model = args.model or str(DEMO_MODEL)
    config = ModelConfig.from_dir(model)  # fails early, naming the directory, if it is not a checkpoint
    for flag in ("lora_rank", "batch_size", "grad_accum", "seq_len", "max_steps", "eval_every", "save_every",
                 "warmup_steps"):
        value, floor = getattr(args, flag), 0 if flag == "warmup_steps" else 1
        if value is not None and value < floor:
            raise SmoeError(f"--{flag.replace('_', '-')} must be at least {floor}, got {value}")
    if args.qlora and args.full:
        raise SmoeError("--qlora and --full exclude each other: QLoRA trains adapters over a frozen 4-bit base")
    if not 0 <= args.lora_dropout < 1:
        raise SmoeError("--lora-dropout must be in [0, 1)")
    if args.lr <= 0:
        raise SmoeError("--lr must be positive")
    seq_len = min(args.seq_len, config.max_position_embeddings)
    lora = None if args.full else {
        "rank": args.lora_rank, "alpha": args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        "dropout": args.lora_dropout, "targets": parse_targets(args.targets), "quantize": "nf4" if args.qlora else None,
    }
    cfg = TrainConfig(
        out=str(args.out), init_from=model, train_data=args.data, heldout_data=args.heldout, tokenizer=None,
        seq_len=seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps or 1, epochs=None if args.max_steps else (args.epochs or 1.0),
        lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps, weight_decay=0.0,
        aux_loss_coef=args.aux_loss_coef, seed=args.seed, log_every=1,
        eval_every=args.eval_every or 0, save_every=args.save_every or 0,
        chat=args.chat, gradient_checkpointing=args.gradient_checkpointing, lora=lora,
    )
    return cfg


def cmd_finetune(args) -> int:
    from smoe.errors import SmoeError
    from smoe.train import train

    cfg = finetune_config(args)
    if not args.resume and (args.out / "latest").exists():
        raise SmoeError(f"{args.out}: holds an earlier run; add --resume to continue it, or choose a new --out")
    summary = train(cfg, resume=args.resume)
    history = summary["history"]
    evals = [h["eval"] for h in history if "eval" in h]
    if len(evals) >= 2:
        print("held-out perplexity: " + ", ".join(f"{d} {evals[0][d]:.2f} -> {p:.2f}" for d, p in evals[-1].items()))
    kind = "model checkpoints" if cfg.lora is None else "adapter"
    print(f"fine-tuned {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min; {kind} in {args.out}")
    if cfg.lora is not None:
        print(f"use it: smoe generate --model {cfg.init_from} --adapter {args.out} --prompt ...")
    return 0


def cmd_data(args) -> int:
    from smoe.data import build

    stats = build(args.out, debs=args.debs, vocab_size=args.vocab_size)
    for split in ("train", "heldout"):
        parts = ", ".join(f"{d} {n} docs / {stats['bytes'][split][d] / 1e6:.2f} MB"
                          for d, n in stats["documents"][split].items())
        print(f"{split}: {parts}")
    print(f"wrote {args.out}/train.jsonl, heldout.jsonl, tokenizer.json (vocab {args.vocab_size})")
    return 0


def _copy_tokenizer_files(src, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json",
                 "generation_config.json"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, dst / name)


def _check_new_dir(path: Path) -> None:
    from smoe.errors import SmoeError

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SmoeError(f"{path}: exists and is not an empty directory; choose a new --out")


def cmd_quantize(args) -> int:
    import time

    from smoe import DEMO_MODEL
    from smoe.checkpoint import load_model, save_checkpoint
    from smoe.errors import SmoeError
    from smoe.quantize import quantize_model

    _check_new_dir(args.out)
    source = args.model or str(DEMO_MODEL)
    start = time.perf_counter()
    model = load_model(source, dtype=args.dtype)  # memory-mapped: each weight is read once, as it is quantized
    if model.config.quantization:
        raise SmoeError(f"{source}: is already quantized ({model.config.quantization['bits']} bits)")
    before = sum(t.nbytes for t in model.state_dict().values())
    count = quantize_model(model, args.bits, args.group_size if args.bits == 4 else None, progress=True)
    after = sum(t.nbytes for t in model.state_dict().values())
    save_checkpoint(model, args.out)
    _copy_tokenizer_files(source, args.out)
    kind = "int8 per channel" if args.bits == 8 else f"int4, group {args.group_size}"
    print(f"quantized {count} linears ({kind}): {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"in {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    from smoe.errors import SmoeError

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engines.py"
    if not script.exists():
        raise SmoeError("smoe bench runs from a source checkout (benchmarks/bench_engines.py is not installed "
                        "with the package); clone the repository and run it there")
    model = ["--model", args.model] if args.model else []
    return subprocess.run([sys.executable, str(script), *model, *args.rest]).returncode


def cmd_lora(args) -> int:
    from smoe.checkpoint import load_model, parse_dtype, save_checkpoint
    from smoe.lora import load_adapter, merge_lora

    _check_new_dir(args.out)
    saved_dtype = parse_dtype(args.dtype) or load_model(args.model).dtype  # memory-mapped: no copy
    model = load_model(args.model, dtype="fp32")  # merge in fp32, then save in the wanted dtype
    load_adapter(model, args.adapter)
    merge_lora(model, unwrap=True)
    save_checkpoint(model, args.out, dtype=saved_dtype)
    _copy_tokenizer_files(args.model, args.out)
    print(f"merged {args.adapter} into {args.model}; wrote {args.out}")
    return 0


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "train": cmd_train, "data": cmd_data,
    "routes": cmd_routes, "lora": cmd_lora, "finetune": cmd_finetune,
    "quantize": cmd_quantize, "bench": cmd_bench, "profile": cmd_profile,
}


def main(argv: list[str] | None = None) -> int:
    from smoe.errors import SmoeError

    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        for model in _LOADED:
            print(model.expert_store.stats.format(), file=sys.stderr)
        _LOADED.clear()
        return code
    except SmoeError as e:
        print(f"smoe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # unreadable file, permission denied, disk full
        print(f"smoe: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
