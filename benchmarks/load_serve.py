"""Load test of `smoe serve`: many concurrent clients, random parameters, some invalid
requests, some clients that hang up mid-stream. What must hold (docs/SERVING.md):

- no response is a 5xx;
- none is lost or mixed up: every greedy request returns exactly what that prompt returns alone
  (asked once per prompt before the load starts), streamed or not;
- no cache row leaks: when the clients are done the server reports 0 running and 0 waiting;
- resident memory stays flat (sampled from /proc through the run).

    python benchmarks/load_serve.py                          # 64 clients x 20 requests, the demo model
    python benchmarks/load_serve.py --clients 16 --requests 5
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_engines import commit, cpu  # noqa: E402

from serving import KEY, MODEL, Server  # noqa: E402

PROMPTS = ["The meaning of life is", "Once upon a time", "def fibonacci(n):", "The capital of France",
           "In 1905, Einstein", "Roses are red,", "import numpy as np\n", "The quick brown fox",
           "Dear Sir or Madam,", "Water boils at", "My favourite food is", "To be or not to be"]
CHATS = ["What is the meaning of life?", "Write a poem about the sea.", "Tell me about Python."]
BAD = [  # (body, path, headers override) -> a 4xx expected
    ({"prompt": "x", "temperature": -1}, "/v1/completions", None),
    ({"prompt": "x", "max_tokens": "many"}, "/v1/completions", None),
    ({"prompt": [1, 99999999]}, "/v1/completions", None),
    ({"prompt": "x", "model": "gpt-9"}, "/v1/completions", None),
    ({"messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions", None),
    ({"prompt": "word " * 900, "max_tokens": 500}, "/v1/completions", None),
    ({"prompt": "x"}, "/v1/completions", {"Authorization": "Bearer wrong"}),
    ({"prompt": "x", "n": 99}, "/v1/completions", None),
]


def server_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else 0.0


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.mismatches: list = []
        self.lost: list = []
        self.server_errors: list = []

    def record(self, kind: str, status: int | str, detail=None) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[status] += 1
            if isinstance(status, int) and status >= 500:
                self.server_errors.append((kind, status, detail))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "out" / "load-serve.json")
    args = p.parse_args()

    server = Server("--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients))
    headers = {"Authorization": f"Bearer {KEY}"}
    tally = Tally()
    rss: list[tuple[float, float]] = []
    try:
        http = httpx.Client(base_url=server.url, headers=headers, timeout=300)
        expected = {}
        for prompt in PROMPTS:  # what each prompt gives alone, greedy
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": args.max_tokens,
                                                   "temperature": 0}).json()
            expected[prompt] = r["choices"][0]["text"]
        for chat in CHATS:
            r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": args.max_tokens,
                                                        "messages": [{"role": "user", "content": chat}],
                                                        "temperature": 0}).json()
            expected[chat] = r["choices"][0]["message"]["content"]
        rss_start = server_rss_mib(server.proc.pid)
        done = threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not done.is_set():
                rss.append((time.perf_counter() - t0, server_rss_mib(server.proc.pid)))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def client(k: int) -> None:
            rng = random.Random(args.seed * 1000 + k)
            c = httpx.Client(base_url=server.url, headers=headers, timeout=300)
            for _ in range(args.requests):
                kind = rng.choices(["greedy", "greedy-stream", "chat", "sampled", "hangup-stream", "hangup",
                                    "invalid"], weights=[25, 15, 10, 20, 10, 10, 10])[0]
                try:
                    one(c, rng, kind, expected, tally, args.max_tokens)
                except Exception as e:  # a request that got no answer at all
                    with tally.lock:
                        tally.lost.append((kind, repr(e)[:200]))
            c.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        idle_at = None
        for _ in range(100):  # rows and queue back to 0 (hung-up requests are cancelled within ~0.25 s)
            if server.metric("smoe_running_sequences") == 0 and server.metric("smoe_queue_length") == 0:
                idle_at = time.perf_counter() - t0 - wall
                break
            time.sleep(0.1)
        done.set()
        sampler.join()
        rss_end = server_rss_mib(server.proc.pid)
        cancelled = server.metric("smoe_cancelled_sequences_total")
    finally:
        server.stop()

    peak = max((r for _, r in rss), default=0.0)
    mid = [r for t, r in rss if t > wall / 2] or [rss_end]
    report = {
        "cpu": cpu(), "commit": commit(), "command": " ".join(["load_serve.py", *sys.argv[1:]]),
        "clients": args.clients, "requests_per_client": args.requests, "wall_s": round(wall, 1),
        "statuses": dict(tally.statuses), "kinds": dict(tally.kinds), "server_errors": tally.server_errors,
        "lost": tally.lost, "mismatches": tally.mismatches[:20], "n_mismatches": len(tally.mismatches),
        "idle_after_s": idle_at, "cancelled_sequences": cancelled,
        "rss_mib": {"before_load": round(rss_start, 1), "peak": round(peak, 1),
                    "second_half_min": round(min(mid), 1), "second_half_max": round(max(mid), 1),
                    "end": round(rss_end, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    ok = not tally.server_errors and not tally.lost and not tally.mismatches and idle_at is not None
    print("\nOK" if ok else "\nFAILED", f"({sum(tally.statuses.values())} requests in {wall:.1f} s)")
    return 0 if ok else 1


def one(c: httpx.Client, rng: random.Random, kind: str, expected: dict, tally: Tally, max_tokens: int) -> None:
    if kind in ("greedy", "greedy-stream", "hangup-stream", "hangup"):
        prompt = rng.choice(PROMPTS)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if kind == "greedy":
            r = c.post("/v1/completions", json=body)
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
            tally.record(kind, r.status_code, r.text[:200])
            if r.status_code == 200 and text != expected[prompt]:
                tally.mismatches.append((kind, prompt, text, expected[prompt]))
            return
        if kind == "hangup":  # give up before the answer comes
            try:
                c.post("/v1/completions", json={**body, "max_tokens": 400, "ignore_eos": True},
                       timeout=rng.uniform(0.05, 0.5))
                tally.record(kind, 200)
            except httpx.TimeoutException:
                tally.record(kind, "client hung up")
            return
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                tally.record(kind, r.status_code, r.text[:200])
                return
            pieces, stop_after = [], rng.randint(1, 8) if kind == "hangup-stream" else None
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    data = json.loads(line[6:])
                    if "error" in data:
                        tally.record(kind, "stream error", data["error"])
                        return
                    pieces += [ch["text"] for ch in data["choices"]]
                    if stop_after is not None and len(pieces) >= stop_after:
                        tally.record(kind, "client hung up")
                        return  # leaving the block closes the connection mid-stream
        tally.record(kind, 200)
        if kind == "greedy-stream" and "".join(pieces) != expected[prompt]:
            tally.mismatches.append((kind, prompt, "".join(pieces), expected[prompt]))
        return
    if kind == "chat":
        chat = rng.choice(CHATS)
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                                                 "messages": [{"role": "user", "content": chat}]})
        tally.record(kind, r.status_code, r.text[:200])
        if r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != expected[chat]:
            tally.mismatches.append((kind, chat, r.json()["choices"][0]["message"]["content"], expected[chat]))
        return
    if kind == "sampled":
        n = rng.randint(1, 3)
        body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, max_tokens), "n": n,
                "temperature": rng.uniform(0.1, 1.5), "top_p": rng.uniform(0.5, 1.0), "top_k": rng.randint(0, 50),
                "min_p": rng.uniform(0, 0.2), "repetition_penalty": rng.uniform(1.0, 1.3), "seed": rng.randint(0, 999),
                "stop": rng.choice([None, ["\n"], [".", "!"]]), "logprobs": rng.choice([None, 0, 2])}
        r = c.post("/v1/completions", json=body)
        tally.record(kind, r.status_code, r.text[:200])
        if r.status_code == 200 and len(r.json()["choices"]) != n:
            tally.mismatches.append((kind, body, "choices", len(r.json()["choices"])))
        return
    body, path, extra = rng.choice(BAD)
    r = c.post(path, json={"model": MODEL, **body}, headers=extra or {})
    tally.record(kind, r.status_code, r.text[:200])
    if not 400 <= r.status_code < 500:
        tally.mismatches.append((kind, body, "status", r.status_code))


if __name__ == "__main__":
    sys.exit(main())
