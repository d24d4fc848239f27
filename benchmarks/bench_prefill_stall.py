"""How long a running stream stalls while the server prefills a long prompt that arrives
mid-stream, with chunked prefill (--prefill-chunk 64, 256) and without (one chunk of 1024).

A greedy stream of 300 tokens runs; after its 50th token a 900-token prompt arrives. Reported:
the stream's longest gap between two tokens (and its median), and the long prompt's time to
first token.

    python benchmarks/bench_prefill_stall.py
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_engines import commit, cpu  # noqa: E402

from serving import Server  # noqa: E402


def run(chunk: int) -> dict:
    server = Server("--prefill-chunk", str(chunk), "--max-batch", "2", key=None)
    try:
        long_prompt = [1] + [100 + i % 5000 for i in range(899)]
        httpx.post(server.url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}, timeout=120)  # warm
        times, ttft = [], {}

        def long_request() -> None:
            t0 = time.perf_counter()
            with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                              json={"prompt": long_prompt, "max_tokens": 4, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ttft["s"] = time.perf_counter() - t0
                        break

        body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    if len(times) == 50:
                        threading.Thread(target=long_request).start()
        gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
        return {"prefill_chunk": chunk, "max_gap_ms": max(gaps) * 1000, "median_gap_ms": statistics.median(gaps) * 1000,
                "long_prompt_ttft_ms": ttft.get("s", float("nan")) * 1000}
    finally:
        server.stop()


def main() -> int:
    rows = [run(chunk) for chunk in (64, 256, 1024)]
    for r in rows:
        print(json.dumps(r), flush=True)
    print(f"\n{cpu()}\ncommit {commit()}; bench_prefill_stall.py\n")
    print("| --prefill-chunk | stream's longest gap | median gap | the long prompt's first token |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['prefill_chunk']} | {r['max_gap_ms']:.0f} ms | {r['median_gap_ms']:.1f} ms | "
              f"{r['long_prompt_ttft_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
