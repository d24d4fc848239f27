"""Serving under concurrency: `smoe serve` against llama.cpp's own server (llama-cpp-python's
`llama_cpp.server`, built from source), the same workload, each server in its own process,
interleaved, best of several.

Workload: C concurrent clients (C = 1, 4, 16), each sending R streaming completions one after
another: a P-token prompt, greedy, exactly N new tokens (EOS banned). Measured per level:
aggregate decode throughput (completion tokens / wall time), time to first token (p50, p95),
and each stream's own tokens/s.

    python benchmarks/bench_serve.py                       # the demo model, both engines
    python benchmarks/bench_serve.py --engines smoe --streams 1,16

llama.cpp reads a BF16 GGUF of the same weights with a stand-in vocabulary of the same size
(bench_engines.py makes it): prompts are " p1 p2 ..." (one token per word there) and token
ids for smoe, so both prefill the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engines import commit, cpu, gguf_files  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests"))
from serving import free_port  # noqa: E402


class ServerProcess:
    def __init__(self, engine: str, model: Path, gguf: Path | None, threads: int, max_batch: int) -> None:
        self.engine, self.port = engine, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if engine == "smoe":
            cmd = [sys.executable, "-m", "smoe", "serve", "--model", str(model), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--log-level", "warning", "--max-queue", "256"]
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(self.port),
                   "--n_ctx", "1024", "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--verbose", "False", "--interrupt_requests", "False"]  # queue requests, do not cut them
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{engine} server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                ready = "/health" if engine == "smoe" else "/v1/models"  # smoe lists its model while loading
                if httpx.get(self.url + ready, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{engine} server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request_body(engine: str, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True}
    if engine == "smoe":
        return {**body, "prompt": prompt_ids, "ignore_eos": True, "stream_options": {"include_usage": True}}
    words = " ".join(f"p{i % 7000}" for i in prompt_ids[1:])  # one stand-in piece per word; llama.cpp adds BOS
    return {**body, "prompt": words, "logit_bias": {"2": -100.0}}


def one_request(url: str, body: dict) -> dict:
    """One streamed completion: time to the first token, tokens, decode time. Raw bytes are
    scanned for event boundaries, not parsed (but the last events, for usage), so that the 16
    clients take as little as they can of the two cores the server computes on."""
    started = time.perf_counter()
    first, tail = None, b""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for raw in r.iter_raw():
            first = first or time.perf_counter()
            tail = (tail + raw)[-4096:]
    end = time.perf_counter()
    usage = None
    for event in tail.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage"' in event:
            usage = json.loads(event[6:]).get("usage") or usage
    # EOS is banned (ignore_eos / logit_bias), so a server that sends no usage made max_tokens
    tokens = usage["completion_tokens"] if usage else body["max_tokens"]
    first = first or end
    return {"ttft": first - started, "tokens": tokens, "decode_s": end - first, "total_s": end - started}


def workload(url: str, engine: str, streams: int, per_stream: int, prompt_len: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for r in range(per_stream):
            prompt = [1] + [100 + (k * 31 + r * 7 + i) % 5000 for i in range(prompt_len - 1)]
            out = one_request(url, request_body(engine, prompt, max_tokens))
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    per_stream_rate = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["decode_s"] > 0 and r["tokens"] > 1]
    return {"streams": streams, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "throughput": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "stream_tokens_per_s": statistics.median(per_stream_rate) if per_stream_rate else 0.0}


def main() -> int:
    import smoe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=smoe.DEMO_MODEL)
    p.add_argument("--engines", default="smoe,llama.cpp")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--per-stream", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="rounds (engines interleaved); the best round counts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "serve-bench")
    args = p.parse_args()
    engines = args.engines.split(",")
    levels = [int(s) for s in args.streams.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = gguf_files(args.model, args.out / f"gguf-{args.model.name}", ["bf16"])["bf16"] if "llama.cpp" in engines \
        else None
    best: dict[tuple[str, int], dict] = {}
    for round_ in range(args.repeats):
        for engine in engines:
            server = ServerProcess(engine, args.model, gguf, args.threads, max(levels))
            try:
                workload(server.url, engine, 1, 1, args.prompt_tokens, 8)  # warm-up
                for c in levels:
                    r = workload(server.url, engine, c, args.per_stream, args.prompt_tokens, args.max_tokens)
                    print(f"round {round_ + 1} {engine:9s} streams={c:2d}: {r['throughput']:7.1f} tok/s aggregate, "
                          f"{r['stream_tokens_per_s']:6.1f} tok/s per stream, TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms "
                          f"p95 {r['ttft_p95'] * 1000:6.0f} ms", flush=True)
                    key = (engine, c)
                    if key not in best or r["throughput"] > best[key]["throughput"]:
                        best[key] = r
            finally:
                server.stop()
    meta = {"cpu": cpu(), "commit": commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "model": str(args.model), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "per_stream": args.per_stream, "repeats": args.repeats, "threads": args.threads}
    rows = [{"engine": e, **r} for (e, _), r in sorted(best.items())]
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['cpu']}\ncommit {meta['commit']}; {meta['command']}\n")
    print("| engine | streams | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['streams']} | {r['throughput']:.1f} | {r['stream_tokens_per_s']:.1f} | "
              f"{r['ttft_p50'] * 1000:.0f} | {r['ttft_p95'] * 1000:.0f} |")
    if ("smoe", 1) in best and ("smoe", max(levels)) in best:
        gain = best["smoe", max(levels)]["throughput"] / best["smoe", 1]["throughput"]
        print(f"\nsmoe: {max(levels)} streams give {gain:.1f}x the aggregate throughput of one")
    for c in levels:
        if ("smoe", c) in best and ("llama.cpp", c) in best:
            print(f"streams={c}: smoe / llama.cpp aggregate = "
                  f"{best['smoe', c]['throughput'] / best['llama.cpp', c]['throughput']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
