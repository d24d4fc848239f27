"""Matrix-vector kernels for decode: bytes of weight read per second, and the streaming-read roofline.

    python benchmarks/bench_kernels.py                 # Mixtral-bench shapes, rows 1..16

For the benchmark checkpoint's expert shapes (1024 -> 3584 and back), times y = x · Wᵀ for a
few rows x with: plain bf16 F.linear, oneDNN-packed bf16, PyTorch's int8 weight-only kernel,
PyTorch's int4 kernel (in the layout it takes on this CPU capability: AtenInt4Linear), and
smoe's Int8Linear (that kernel for up to KERNEL_MAX_ROWS rows, dequantize + GEMM for more) /
Int4Linear (the stored format's plain twin: dequantize + GEMM). Each call uses the next of --copies
weights, so the weights come from memory, not from the caches.
The roofline is a streaming read of a large buffer (a copy, which reads and writes, counted
as 2 bytes moved per byte copied), best of several.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_time(fn, repeats: int = 30, inner: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def bandwidth_gbs(size_mb: int = 512) -> float:
    src = torch.empty(size_mb * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeats=10, inner=1)
    return 2 * src.nbytes / t / 1e9


def kernels(x, sets: list[tuple]) -> dict:
    """name -> (function, bytes of weight it reads); each call takes the next weight set."""
    turn = [0]

    def nxt() -> tuple:
        turn[0] = (turn[0] + 1) % len(sets)
        return sets[turn[0]]

    linear, _, _, q4, _ = sets[0]
    N, K = linear.weight.shape
    int4_bytes = N * K // 2 + q4.scales_and_zeros.nbytes
    return {
        "bf16 F.linear": (lambda: F.linear(x, nxt()[0].weight), 2 * N * K),
        "bf16 packed": (lambda: torch.ops.mkldnn._linear_pointwise(x, nxt()[1], None, "none", [], ""), 2 * N * K),
        "int8 aten kernel": (lambda: (lambda s: torch.ops.aten._weight_int8pack_mm(x, s.qweight, s.scales))(nxt()[2]),
                             N * K),
        "int8 smoe": (lambda: nxt()[2](x), N * K),
        "int4 aten kernel": (lambda: nxt()[3](x), int4_bytes),
        "int4 plain twin": (lambda: nxt()[4](x), int4_bytes),
    }


def main() -> int:
    from smoe.quantize import AtenInt4Linear, Int4Linear, Int8Linear

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x3584,3584x1024", help="in x out, comma-separated")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copies", type=int, default=24, help="distinct weights cycled through (default 24)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"streaming copy: {bandwidth_gbs():.1f} GB/s (read + write)")
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        sets = []
        for _ in range(args.copies):
            linear = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16).requires_grad_(False)
            int4 = Int4Linear.from_linear(linear, 32)
            sets.append((linear, torch.ops.mkldnn._reorder_linear_weight(linear.weight, 1),
                         Int8Linear.from_linear(linear), AtenInt4Linear(int4), int4))
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, K, dtype=torch.bfloat16)
            cases = kernels(x, sets)
            with torch.inference_mode():
                for name, (fn, nbytes) in cases.items():
                    t = best_time(fn)
                    print(f"{K}x{N} rows {rows:>2}  {name:<20} {t * 1e6:8.1f} us  "
                          f"{nbytes / t / 1e9:6.1f} GB/s of weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
