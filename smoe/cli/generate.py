"""smoe generate, smoe chat: continue a prompt, or talk to the model."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import smoe
from smoe.cli.common import load, model_args, sampling, sampling_args, stats_line, verbose_stats
from smoe.errors import SmoeError
from smoe.fsutil import atomic_write
from smoe.generate import TextPiece
from smoe.routing import token_pieces, trace_routing


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt",
                       description="Continue a prompt and print tokens/s.")
    model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text ('-' reads standard input)")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="prompt as comma-separated token ids (models without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system prompt (implies --chat: the prompt becomes the user message)")
    g.add_argument("--verbose", action="store_true",
                   help="after the text, prompt and generation tokens/s and peak memory (as mlx-lm prints them)")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and timings")
    g.add_argument("--trace-routing", type=Path, metavar="FILE", default=None,
                   help="write each token's experts, weights and router entropy per layer to FILE (JSON)")
    sampling_args(g)
    g.set_defaults(run=cmd_generate)

    c = sub.add_parser("chat", help="talk to the model",
                       description="Interactive multi-turn chat. /reset clears, /exit quits.")
    model_args(c)
    c.add_argument("--system", "--system-prompt", dest="system", default=None, help="system prompt")
    sampling_args(c)
    c.set_defaults(max_tokens=512)
    c.set_defaults(run=cmd_chat)


def cmd_generate(args) -> int:

    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise SmoeError("--prompt-ids must be comma-separated integers, e.g. 1,415,2936") from None
    else:
        prompt = read_prompt(args.prompt)
    model, tokenizer = load(args)
    if isinstance(prompt, str) and tokenizer is None:
        raise SmoeError(f"{args.model}: this checkpoint has no tokenizer files; pass --prompt-ids instead")
    if args.chat or args.system_prompt is not None:
        flag = "--chat" if args.chat else "--system-prompt"
        if tokenizer is None:
            raise SmoeError(f"{flag} needs a tokenizer")
        if not isinstance(prompt, str):
            raise SmoeError(f"{flag} takes --prompt text, not --prompt-ids")
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        prompt = tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt}])
    params = sampling(args)
    if args.trace_routing is not None and args.compile:
        raise SmoeError("--trace-routing observes each layer from Python, which a compiled step cannot; "
                        "drop --compile")
    if args.trace_routing is not None:
        return _generate_traced(args, model, tokenizer, prompt, params)
    if args.json or tokenizer is None:
        result = smoe.generate(model, tokenizer, prompt, **params)
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            print(" ".join(map(str, result.token_ids)))
            print(summary(args, result), file=sys.stderr)
        return 0
    stream = smoe.stream_generate(model, tokenizer, prompt, **params)
    first = next(stream)  # the request is checked before anything is printed
    if isinstance(prompt, str):
        print(prompt, end="", flush=True)
    result = None
    for item in itertools.chain([first], stream):
        if isinstance(item, TextPiece):
            print(item.text, end="", flush=True)
        else:
            result = item
    print()
    print(summary(args, result), file=sys.stderr)
    return 0


def summary(args, result) -> str:
    return verbose_stats(result) if getattr(args, "verbose", False) else stats_line(result)


def read_prompt(prompt: str) -> str:
    """--prompt text ('-': standard input), which must be UTF-8."""

    try:
        text = sys.stdin.buffer.read().decode("utf-8") if prompt == "-" else prompt
        text.encode("utf-8")  # arguments that were not UTF-8 arrive as lone surrogates
    except UnicodeError:
        where = "standard input" if prompt == "-" else "--prompt"
        raise SmoeError(f"{where} is not valid UTF-8 text; pass UTF-8, or token ids with --prompt-ids") from None
    return text


def _generate_traced(args, model, tokenizer, prompt, params) -> int:

    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    with trace_routing(model) as trace:
        result = smoe.generate(model, tokenizer, prompt_ids, **params)
    fed = prompt_ids + result.token_ids[:-1]  # the last token was sampled but never run through the model
    pieces = token_pieces(tokenizer, fed) if tokenizer is not None else None
    data = {"prompt_tokens": len(prompt_ids), **trace.to_json(fed, pieces)}
    atomic_write(args.trace_routing, lambda f: f.write_text(json.dumps(data) + "\n"))
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print((prompt if isinstance(prompt, str) else "") + result.text if tokenizer else result.token_ids)
        print(summary(args, result), file=sys.stderr)
        print(f"routing trace of {len(fed)} tokens written to {args.trace_routing}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:

    model, tokenizer = load(args)
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
            for item in smoe.stream_generate(model, tokenizer, ids, **sampling(args)):
                if isinstance(item, TextPiece):
                    reply += item.text
                    print(item.text, end="", flush=True)
                else:
                    result = item
        except SmoeError as e:
            history.pop()
            print(f"smoe: error: {e}", file=sys.stderr)
            continue
        print()
        print(f"[{stats_line(result)}]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0
