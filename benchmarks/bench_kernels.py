"""Matrix-vector kernels for decode: bytes of weight read per second, and the streaming-read roofline.

    python benchmarks/bench_kernels.py                 # Mixtral-bench shapes, rows 1..16

For one linear of the benchmark checkpoint's expert shape (1024 -> 3584 and back), times
y = x · Wᵀ for a few rows x with: plain bf16 F.linear, oneDNN-packed bf16, PyTorch's int8
and int4 weight-only kernels, smoe's compiled int8 / int4 kernels, and dequantize + GEMM.
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


def kernels(x, linear, packed, q8, q4) -> dict:
    """name -> (function, bytes of weight it reads)."""
    N, K = linear.weight.shape
    int4_bytes = N * K // 2 + q4.scales_and_zeros.nbytes
    return {
        "bf16 F.linear": (lambda: F.linear(x, linear.weight), 2 * N * K),
        "bf16 packed": (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 2 * N * K),
        "int8 aten kernel": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8.qweight, q8.scales), N * K),
        "int8 smoe module": (lambda: q8(x), N * K),
        "int8 dequant+GEMM": (lambda: F.linear(x, q8.dequantize(x.dtype)), N * K),
        "int4 aten kernel": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, q4.qweight, 32, q4.scales_and_zeros), int4_bytes),
        "int4 smoe module": (lambda: q4(x), int4_bytes),
        "int4 dequant+GEMM": (lambda: F.linear(x, q4.dequantize(x.dtype)), int4_bytes),
    }


def main() -> int:
    from smoe.quantize import KERNEL_MAX_ROWS, Int4Linear, Int8Linear

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x3584,3584x1024", help="in x out, comma-separated")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"streaming copy: {bandwidth_gbs():.1f} GB/s (read + write)   KERNEL_MAX_ROWS = {KERNEL_MAX_ROWS}")
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        linear = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight, 1)
        q8, q4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 32)
        q4.qweight = q4.qweight.clone()
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, K, dtype=torch.bfloat16)
            cases = kernels(x, linear, packed, q8, q4)
            with torch.inference_mode():
                for name, (fn, nbytes) in cases.items():
                    t = best_time(fn)
                    print(f"{K}x{N} rows {rows:>2}  {name:<20} {t * 1e6:8.1f} us  "
                          f"{nbytes / t / 1e9:6.1f} GB/s of weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
