"""Evaluate AMD's zentorch fused MoE op as a backend for smoe's stacked experts (not adopted).

    pip install zentorch==2.13.0.2        # the release built against torch 2.13 (not a smoe dependency)
    python benchmarks/eval_zentorch.py    # correctness over shapes, then speed against smoe's CPU path

`torch.ops.zentorch.zentorch_fused_moe(out, x, w13 [E, 2F, H], w2 [E, H, F], None, None,
topk_weights fp32 [N, K], topk_ids int32 [N, K], False, "silu")` takes smoe's stacked layout as
it is. Part 1 runs it on fresh weights for every shape (hidden/ffn 64/96, 256/384, 1024/3584;
E/K 4/1, 8/2, 8/3, 16/2, 16/4; 1, 3, 8, 40 tokens) against the reference loop. Part 2 times one
token and 512 tokens through a Mixtral-like layer against smoe's default CPU path
(oneDNN-packed experts called one by one), and then calls zentorch again on the same weights
with another token count. What this measured is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time

import torch

from smoe.experts import Expert, ExpertList


def experts(hidden: int, ffn: int, num_experts: int) -> ExpertList:
    torch.manual_seed(0)
    reference = ExpertList(Expert(hidden, ffn) for _ in range(num_experts))
    for p in reference.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return reference.bfloat16().requires_grad_(False)


def routing(tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    indices = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g) + 0.05
    return indices, weights / weights.sum(-1, keepdim=True), g


def zentorch_moe(x, indices, weights, gate_up, down) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.zentorch.zentorch_fused_moe(out, x, gate_up, down, None, None, weights.float(),
                                          indices.to(torch.int32), False, "silu")
    return out


def check(hidden: int, ffn: int, num_experts: int, top_k: int, tokens: int) -> str:
    reference = experts(hidden, ffn, num_experts)
    stacked = copy.deepcopy(reference).for_inference(pack=False)
    indices, weights, g = routing(tokens, num_experts, top_k)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    expected = reference(x, indices, weights).float()
    try:
        got = zentorch_moe(x, indices, weights, stacked.gate_up.weight, stacked.down.weight).float()
    except RuntimeError as e:
        return f"error: {str(e).splitlines()[0][:80]}"
    err = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    return "ok" if err < 2e-2 else f"wrong (max error {err:.2f} of the largest output)"


def best_ms(fn, n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        import zentorch  # noqa: F401  (registers torch.ops.zentorch)
    except ImportError:
        print("eval_zentorch: error: zentorch is not installed; pip install zentorch==2.13.0.2", file=sys.stderr)
        return 2

    torch.set_num_threads(2)
    shapes = list(itertools.product([(64, 96), (256, 384), (1024, 3584)], [(4, 1), (8, 2), (8, 3), (16, 2), (16, 4)],
                                    [1, 3, 8, 40]))
    bad = []
    for (hidden, ffn), (num_experts, top_k), tokens in shapes:
        status = check(hidden, ffn, num_experts, top_k, tokens)
        if status != "ok":
            bad.append(f"  hidden {hidden}, ffn {ffn}, {num_experts} experts, top-{top_k}, {tokens} tokens: {status}")
    print(f"correctness: {len(shapes) - len(bad)} of {len(shapes)} shapes equal the reference loop")
    print("\n".join(bad))

    reference = experts(1024, 3584, 8)
    plain = copy.deepcopy(reference).for_inference(pack=False)
    packed = copy.deepcopy(reference).for_inference(pack=True)
    for tokens in (1, 512):
        indices, weights, g = routing(tokens, 8, 2)
        x = torch.randn(tokens, 1024, generator=g).bfloat16()
        args = (x, indices, weights)
        zen = best_ms(lambda a=args: zentorch_moe(*a, plain.gate_up.weight, plain.down.weight),
                      200 if tokens == 1 else 10)
        ours = best_ms(lambda a=args: packed(*a), 200 if tokens == 1 else 10)
        print(f"speed, hidden 1024 / ffn 3584, 8 experts, top-2, {tokens} tokens: zentorch {zen:.2f} ms, "
              f"smoe (oneDNN-packed experts) {ours:.2f} ms")
    indices, weights, g = routing(3, 8, 2)
    x = torch.randn(3, 1024, generator=g).bfloat16()
    expected = reference(x, indices, weights).float()
    try:
        got = zentorch_moe(x, indices, weights, plain.gate_up.weight, plain.down.weight).float()
        print(f"same weights, then 3 tokens: max error {(got - expected).abs().max().item():.3f}")
    except RuntimeError as e:
        print(f"same weights, then 3 tokens: error: {str(e).splitlines()[0][:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
