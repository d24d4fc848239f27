"""Expert cache policies on the demo model: hit rates, prefetch accuracy, speed.

    python benchmarks/bench_offload.py                    # budget: half the experts, 4 domains
    python benchmarks/bench_offload.py --experts 12 --tokens 256 --domains it

For each domain of the demo's evaluation slice (smoe/assets/demo/eval_slice.jsonl) the
documents are split in two: every other document goes to the profile (`smoe profile`'s
counting, smoe.offload.expert_usage), the rest is the workload. The workload is run token
by token through the KV cache (what decoding does, with the text's own next tokens) and the
expert cache is measured under each policy: LRU, LFU, pinned from a profile of the workload
itself, of the domain's other documents, and of another domain, each without prefetch (so the hit rate
is the cache's alone), and LRU with prefetch (its guess accuracy, and the hit rate it adds).
Statistics cover the whole run from a cold cache; pinned experts are loaded before it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smoe  # noqa: E402
from smoe.cache import KVCache  # noqa: E402
from smoe.offload import expert_usage, write_profile  # noqa: E402

SLICE = ROOT / "smoe" / "assets" / "demo" / "eval_slice.jsonl"


def run_workload(model, ids: list[int]) -> float:
    """Feed the tokens one at a time through a KV cache; returns tokens/s."""
    cache = KVCache(model.config, 1, len(ids), dtype=model.dtype, device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, t in enumerate(ids):
            model(torch.tensor([[t]]), torch.tensor([[i]]), cache)
    return len(ids) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=None, help="budget in experts (default: half of them)")
    p.add_argument("--tokens", type=int, default=512, help="workload tokens per domain (default 512)")
    p.add_argument("--domains", default="de,en,es,it")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--pin-share", type=float, default=None,
                   help=f"share of the budget pinned from a profile (default {smoe.offload.PIN_SHARE})")
    p.add_argument("--sweep", type=Path, default=None, metavar="PNG",
                   help="instead: hit rate against the budget (6 to 42 experts) for each policy, as a chart")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.pin_share is not None:
        smoe.offload.PIN_SHARE = args.pin_share

    resident, tokenizer = smoe.load()
    config = resident.config
    total = config.num_hidden_layers * config.num_local_experts
    n = args.experts or total // 2
    docs = [json.loads(line) for line in SLICE.read_text().splitlines() if line.strip()]
    domains = args.domains.split(",")
    profiles, workloads = {}, {}
    tmp = ROOT / "benchmarks" / "out" / "offload"
    tmp.mkdir(parents=True, exist_ok=True)
    for d in domains + ["python"]:
        mine = [doc["text"] for doc in docs if doc["domain"] == d]
        profile_ids = [t for text in mine[::2] for t in tokenizer.encode(text)]
        workloads[d] = [t for text in mine[1::2] for t in tokenizer.encode(text)][: args.tokens]
        profiles[d] = tmp / f"profile-{d}.json"
        write_profile(profiles[d], expert_usage(resident, profile_ids), len(profile_ids), source=f"{SLICE}:{d}")
        profiles[d + "-self"] = tmp / f"profile-{d}-self.json"
        write_profile(profiles[d + "-self"], expert_usage(resident, workloads[d]), len(workloads[d]))
    probe, _ = smoe.load(max_memory=10 << 30, prefetch=False)
    expert_bytes = probe.expert_store.expert_bytes
    budget = n * expert_bytes
    del probe
    if args.sweep:
        return sweep(args.sweep, domains, workloads, profiles, expert_bytes, total)
    print(f"demo model: {total} experts of {smoe.offload.format_bytes(budget // n)}; budget {n} experts "
          f"({smoe.offload.format_bytes(budget)}); {args.tokens} workload tokens per domain")

    rows = []
    for d in domains:
        other = "python" if d != "python" else "en"
        variants = [
            ("LRU", dict(cache_policy="lru", prefetch=False)),
            ("LFU", dict(cache_policy="lfu", prefetch=False)),
            ("pinned, profile of this text", dict(expert_profile=profiles[d + "-self"], prefetch=False)),
            (f"pinned, {d} profile", dict(expert_profile=profiles[d], prefetch=False)),
            (f"pinned, {other} profile", dict(expert_profile=profiles[other], prefetch=False)),
            ("LRU + prefetch", dict(cache_policy="lru", prefetch=True)),
            (f"pinned ({d}) + prefetch", dict(expert_profile=profiles[d], prefetch=True)),
        ]
        base_tps = run_workload(resident, workloads[d])
        for name, kw in variants:
            model, _ = smoe.load(max_memory=budget, **kw)
            tps = run_workload(model, workloads[d])
            model.expert_store.wait()
            s = model.expert_store.stats
            row = {"domain": d, "policy": name, "hit_rate": s.tiers[0].hit_rate,
                   "prefetch_accuracy": s.prefetch_accuracy if kw["prefetch"] else None,
                   "disk_mb_per_token": s.disk_bytes / len(workloads[d]) / 2**20, "tokens_per_s": tps,
                   "resident_tokens_per_s": base_tps, "stall_s": s.stall_s}
            rows.append(row)
            acc = f"{row['prefetch_accuracy']:.1%}" if row["prefetch_accuracy"] is not None else "-"
            print(f"{d:7} {name:24} hit {row['hit_rate']:6.1%}  prefetch guess {acc:>6}  "
                  f"disk {row['disk_mb_per_token']:6.2f} MiB/token  {tps:6.1f} tok/s (resident {base_tps:.1f})",
                  flush=True)
            model.expert_store.close()
    if args.json:
        args.json.write_text(json.dumps({"budget_experts": n, "total_experts": total, "rows": rows}, indent=1))

    print("\n| domain | policy | hit rate | prefetch guess accuracy | read from disk (MiB/token) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['prefetch_accuracy']:.1%}" if r["prefetch_accuracy"] is not None else "–"
        print(f"| {r['domain']} | {r['policy']} | {r['hit_rate']:.1%} | {acc} | {r['disk_mb_per_token']:.2f} | "
              f"{r['tokens_per_s']:.1f} |")


def sweep(png: Path, domains: list[str], workloads: dict, profiles: dict, expert_bytes: int, total: int) -> None:
    """Hit rate (mean over the domains) against the budget, per policy; no prefetch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = {
        "LRU": lambda d: dict(cache_policy="lru"),
        "LFU": lambda d: dict(cache_policy="lfu"),
        "pinned, same-language profile": lambda d: dict(expert_profile=profiles[d]),
        "pinned, python profile": lambda d: dict(expert_profile=profiles["python"]),
    }
    sizes = [6, 12, 18, 24, 30, 36, 42]
    curves = {name: [] for name in policies}
    for n in sizes:
        for name, kw in policies.items():
            rates = []
            for d in domains:
                model, _ = smoe.load(max_memory=n * expert_bytes, prefetch=False, **kw(d))
                run_workload(model, workloads[d])
                rates.append(model.expert_store.stats.tiers[0].hit_rate)
                model.expert_store.close()
            curves[name].append(sum(rates) / len(rates))
            print(f"{n:>3} experts  {name:<32} {curves[name][-1]:.1%}", flush=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, ys in curves.items():
        ax.plot([100 * n / total for n in sizes], [100 * y for y in ys], marker="o", label=name)
    ax.set_xlabel(f"budget (% of the {total} experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(f"demo model, token by token over {', '.join(domains)} text (mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
