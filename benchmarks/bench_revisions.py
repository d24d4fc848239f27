"""smoe against an earlier revision of itself, in the same run: speed and greedy tokens.

    python benchmarks/bench_revisions.py --base aa4c24c                      # demo model, every variant
    python benchmarks/bench_revisions.py --base aa4c24c --model benchmarks/out/bench-ckpt \\
        --variants bf16,int8,int4,offload --repeats 3

The base revision is checked out into a git worktree (benchmarks/out/rev-BASE) and each
measurement runs in its own process with PYTHONPATH on one tree or the other, interleaved
(base, current, base, current, ...), keeping the best of --repeats, because this machine's
memory bandwidth swings between runs. Every process also generates --check-tokens greedy
tokens from a fixed prompt; the table says whether both trees produced the same ones.

Variants: bf16 (the checkpoint as it loads), int8 / int4 (quantized at load), offload
(experts offloaded with half of them fitting in memory), lora (a random adapter on the
attention projections and every expert's w1, written once by the current tree), gguf (the
checkpoint written as an F16 GGUF file once, by tests/test_formats_gguf.py's writer, and loaded
from it: each tree converts it into its own cache), ep (expert parallelism: two processes under
torch.distributed.run, one thread each).
Prefill: tokens/s of a --prefill-token prompt up to its first token (best of three in the
process: the first one after loading pays for first-touch allocations); decode: tokens/s of
--decode greedy tokens after a 32-token prompt (the first token, from prefill, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args) -> int:
    import torch

    import smoe

    torch.set_num_threads(args.threads if args.variant != "ep" else 1)
    kwargs = {}
    if args.variant in ("int8", "int4"):
        kwargs["quant"] = args.variant
    if args.variant == "lora":
        kwargs["adapter"] = args.adapter
    if args.variant == "offload":
        kwargs["max_memory"] = args.max_memory
    if args.variant == "ep":  # this rank's share of the experts
        from smoe.loader import LoadOptions, load_model
        from smoe.parallel import ParallelSpec

        model, _ = load_model(Path(args.model), LoadOptions(parallel=ParallelSpec.parse("expert")))
    else:
        model, _ = smoe.load(args.gguf if args.variant == "gguf" else args.model, **kwargs)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    long = torch.randint(3, vocab, (args.prefill,), generator=g).tolist()
    short = torch.randint(3, vocab, (32,), generator=g).tolist()
    smoe.generate(model, None, short[:8], max_tokens=4, ignore_eos=True)  # warm-up
    # the first long prefill after loading pays for first-touch allocations: best of three
    prefill = max(smoe.generate(model, None, long, max_tokens=1, ignore_eos=True).prefill_tokens_per_s
                  for _ in range(3))
    decode = smoe.generate(model, None, short, max_tokens=args.decode + 1, ignore_eos=True).decode_tokens_per_s
    tokens = smoe.generate(model, None, short, max_tokens=args.check_tokens, ignore_eos=True).token_ids
    try:
        from smoe.kernels import ops as native
    except ImportError:  # a tree before smoe/kernels/
        from smoe import native
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"prefill_tok_s": prefill, "decode_tok_s": decode, "tokens": tokens,
                          "native": native.available()}))
    return 0


def write_gguf_of(model: Path, out: Path) -> Path:
    """The checkpoint as an F16 GGUF file (llama.cpp's names and q/k row order), written once."""
    if out.exists():
        return out
    import tempfile

    import smoe
    from smoe.checkpoint import save_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    from test_formats_gguf import write_gguf

    with tempfile.TemporaryDirectory() as tmp:
        plain, _ = smoe.load(model, pack=False, dtype="fp32")
        save_checkpoint(plain, tmp, max_shard_bytes=1 << 62)
        write_gguf(Path(tmp), out.with_suffix(".part"), "F16", tokenizer=False)
    out.with_suffix(".part").rename(out)
    return out


def worktree(base: str) -> Path:
    rev = subprocess.run(["git", "rev-parse", "--short", base], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = HERE / "out" / f"rev-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    if (path / "smoe" / "csrc").exists() and not list((path / "smoe").glob("_native*.so")):
        # the native kernels are not in git: built for the base tree as `make install` builds them
        subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=path, check=True,
                       capture_output=True)
    return path


def make_adapter(model: Path, out: Path) -> Path:
    import torch

    import smoe
    from smoe.lora import apply_lora, save_adapter
    from smoe.options import LoraSpec

    if (out / "adapter_config.json").exists():
        return out
    plain, _ = smoe.load(model, pack=False)
    apply_lora(plain, LoraSpec(rank=8, targets=("q_proj", "v_proj", "w1")), seed=0)
    g = torch.Generator().manual_seed(1)
    for m in plain.modules():
        if hasattr(m, "lora_B"):
            with torch.no_grad():
                m.lora_B.weight.normal_(0, 0.02, generator=g)
    save_adapter(plain, out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare with (a commit or branch)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--variants", default="bf16,int8,int4,offload,lora,gguf,ep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--check-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-memory", default=None, help="offload budget (default: half of the experts)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "revisions.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import smoe
    from smoe.config import ModelConfig

    model = (args.model or smoe.DEMO_MODEL).resolve()
    config = ModelConfig.from_dir(model)
    expert_bytes = 3 * config.hidden_size * config.intermediate_size * 2
    max_memory = args.max_memory or str(expert_bytes * config.num_hidden_layers * config.num_local_experts // 2)
    adapter = make_adapter(model, HERE / "out" / f"adapter-{Path(model).name}")
    trees = {"base": worktree(args.base), "current": ROOT}
    variants = args.variants.split(",")
    gguf = write_gguf_of(model, HERE / "out" / f"{Path(model).name}-F16.gguf") if "gguf" in variants else model
    best: dict = {v: {t: None for t in trees} for v in variants}
    for r in range(args.repeats):
        for variant in variants:
            for name, tree in trees.items():
                cmd = [sys.executable, str(HERE / "bench_revisions.py"), "--child", "--base", args.base,
                       "--model", str(model), "--variant", variant, "--adapter", str(adapter), "--gguf", str(gguf),
                       "--max-memory", max_memory, "--prefill", str(args.prefill), "--decode", str(args.decode),
                       "--check-tokens", str(args.check_tokens), "--threads", str(args.threads)]
                if variant == "ep":
                    cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                # each tree converts the GGUF file into a cache of its own
                env = {**os.environ, "PYTHONPATH": str(tree), "SMOE_CACHE": str(HERE / "out" / f"cache-{name}"),
                       "OMP_NUM_THREADS": "1" if variant == "ep" else str(args.threads)}
                run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
                if run.returncode:
                    print(run.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{name} {variant} failed")
                got = json.loads(run.stdout.strip().splitlines()[-1])
                old = best[variant][name]
                if old is None:
                    best[variant][name] = got
                else:
                    old["prefill_tok_s"] = max(old["prefill_tok_s"], got["prefill_tok_s"])
                    old["decode_tok_s"] = max(old["decode_tok_s"], got["decode_tok_s"])
                    assert old["tokens"] == got["tokens"], f"{name} {variant}: tokens differ between runs"
                print(f"repeat {r + 1} {variant:>8} {name:>7}: prefill {got['prefill_tok_s']:7.1f} tok/s, "
                      f"decode {got['decode_tok_s']:6.1f} tok/s, native kernels {got['native']}", flush=True)
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{model}; base {base_rev}, current {head.strip()} + working tree; {cpu}; {args.threads} threads; "
          f"best of {args.repeats}")
    print("| variant | prefill base | prefill now | ratio | decode base | decode now | ratio | greedy tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        b, c = best[variant]["base"], best[variant]["current"]
        first_diff = next((i for i, (x, y) in enumerate(zip(b["tokens"], c["tokens"], strict=True)) if x != y), None)
        same = "identical" if first_diff is None else f"differ from token {first_diff}"
        print(f"| {variant} | {b['prefill_tok_s']:.1f} | {c['prefill_tok_s']:.1f} | "
              f"{c['prefill_tok_s'] / b['prefill_tok_s']:.2f}x | {b['decode_tok_s']:.1f} | {c['decode_tok_s']:.1f} | "
              f"{c['decode_tok_s'] / b['decode_tok_s']:.2f}x | {same} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(model), "base": base_rev, "results": best}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
