"""smoe routes, smoe profile: which experts the tokens of a text go to."""

from __future__ import annotations

from pathlib import Path

from smoe.cli.common import load, model_args
from smoe.data import read_jsonl
from smoe.errors import SmoeError
from smoe.offload import expert_usage, write_profile
from smoe.routing import run_routes


def register(sub) -> None:
    r = sub.add_parser("routes", help="analyse expert routing on a text",
                       description="Expert load, per-domain load and consecutive-token routing, "
                                   "as in the Mixtral paper.")
    model_args(r)
    r.add_argument("--input", type=Path, metavar="FILE", help="text file, or JSONL with 'text' (and 'domain')")
    r.add_argument("--domains", type=Path, metavar="FILE", help="JSONL of documents labelled with 'domain'")
    r.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    r.add_argument("--layer", type=int, default=None, help="layer the HTML page colours by (default: the middle one)")
    r.add_argument("--max-tokens-per-doc", type=int, default=1024, help="truncate documents (default 1024 tokens)")
    r.add_argument("--max-docs", type=int, default=None, help="use at most this many documents per domain")
    r.set_defaults(run=cmd_routes)

    pr = sub.add_parser("profile", help="record which experts a workload uses (for --expert-profile)",
                        description="Run a text through the model and count, per layer, the tokens each expert "
                                    "gets. Offloading with --expert-profile pins the most used experts.")
    model_args(pr)
    pr.add_argument("--input", type=Path, required=True, metavar="FILE",
                    help="the workload: a text file, or JSONL with a 'text' field per line")
    pr.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the profile (JSON)")
    pr.add_argument("--max-input-tokens", type=int, default=None, help="use at most this many tokens of the input")
    pr.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")
    pr.set_defaults(run=cmd_profile)


def cmd_routes(args) -> int:
    from collections import Counter

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
    model, tokenizer = load(args)
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

    if args.window < 1:
        raise SmoeError("--window must be at least 1")
    docs = read_jsonl(args.input)
    model, tokenizer = load(args)
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
