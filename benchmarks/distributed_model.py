"""A computed model of Mixtral-8x7B and 8x22B spread over 2-16 machines (docs/DISTRIBUTED.md):
per machine, the weight bytes it holds and reads per decoded token (batch 1, bf16), the bytes it
exchanges per token under EP, TP and EP x TP, and what the network must do for the exchange to
take no longer than reading the weights: the largest per-message latency (infinitely fast link)
and the smallest bandwidth (zero latency) — and both at half each.

    python benchmarks/distributed_model.py [--mem-bandwidth 50]   # GB/s each machine reads weights at
"""

from __future__ import annotations

import argparse
import math

MODELS = {  # hidden, layers, experts, top-k, ffn, query heads, kv heads, head dim, vocab
    "Mixtral-8x7B": dict(H=4096, L=32, E=8, K=2, F=14336, Q=32, G=8, D=128, V=32000),
    "Mixtral-8x22B": dict(H=6144, L=56, E=8, K=2, F=16384, Q=48, G=8, D=128, V=32768),
}
BYTES = 2  # bf16


def layout(ep: int, tp: int, m: dict) -> dict:
    H, L, E, K, F, Q, G, D, V = (m[k] for k in "HLEKFQGDV")
    attn = H * Q * D * 2 + H * G * D * 2  # q, o; k, v
    expert = 3 * H * F
    n = ep * tp
    held = (L * (attn / tp + E / ep * expert / tp + H * E) + 2 * V * H) * BYTES
    # decode: each token's K experts; the busiest EP group holds both with probability p
    per_group = E // ep
    p_same = (per_group - 1) / (E - 1) if ep > 1 else 1.0
    busiest = K if ep == 1 else 1 + p_same  # experts the slowest machine reads per layer (expected)
    read = (L * (attn / tp + busiest * expert / tp + H * E) + V * H) * BYTES
    # all-reduces of one token's hidden state (H values): after the experts (over all n ranks),
    # and under TP also after attention (over the tp group)
    reduces = [(n, 1)] if n > 1 else []
    if tp > 1:
        reduces.append((tp, 1))
    sent = sum(L * 2 * (k - 1) / k * H * BYTES for k, _ in reduces)  # ring: 2(k-1)/k of the message, each way
    steps = sum(L * 2 * math.ceil(math.log2(k)) for k, _ in reduces)  # latency-bound: recursive doubling
    return {"machines": n, "ep": ep, "tp": tp, "held_gb": held / 1e9, "read_gb": read / 1e9, "sent_kb": sent / 1e3,
            "latency_steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mem-bandwidth", type=float, default=50.0, help="GB/s each machine reads weights at")
    args = p.parse_args()
    for name, m in MODELS.items():
        print(f"\n### {name} (bf16; each machine reads weights at {args.mem_bandwidth:g} GB/s)\n")
        print("| machines | split | weights held / machine | read / token | weight time / token | "
              "sent / token / machine | exchanges / token | max latency (fast link) | min bandwidth (no latency) "
              "| both at half |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        one = layout(1, 1, m)
        t1 = one["read_gb"] / args.mem_bandwidth * 1e3
        print(f"| 1 | - | {one['held_gb']:.1f} GB | {one['read_gb']:.2f} GB | {t1:.0f} ms | - | - | - | - | - |")
        for n in (2, 4, 8, 16):
            for ep, tp, label in ((n, 1, "EP"), (1, n, "TP"), (*_grid(n, m), "EP x TP")):
                if ep > m["E"] or tp > m["G"] or ep * tp != n or (label == "EP x TP" and min(ep, tp) == 1):
                    continue
                r = layout(ep, tp, m)
                t = r["read_gb"] / args.mem_bandwidth * 1e3  # ms
                lat = t / r["latency_steps"] * 1e3  # µs per exchange step
                bw = r["sent_kb"] / 1e3 / t  # MB per ms = GB/s
                split = label if label != "EP x TP" else f"EP {ep} x TP {tp}"
                print(f"| {n} | {split} | {r['held_gb']:.1f} GB | {r['read_gb']:.2f} GB | {t:.0f} ms | "
                      f"{r['sent_kb']:.0f} KB | {r['latency_steps']} | {lat:.0f} µs | {bw * 1e3:.0f} MB/s | "
                      f"{lat / 2:.0f} µs + {bw * 2e3:.0f} MB/s |")


def _grid(n: int, m: dict) -> tuple[int, int]:
    tp = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    while n // tp > m["E"]:
        tp *= 2
    return n // tp, tp


if __name__ == "__main__":
    main()
