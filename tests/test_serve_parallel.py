"""`smoe serve` under torchrun's variables with two ranks and the experts split between them:
rank 0 serves HTTP, both ranks step the engine in lockstep. Greedy answers (alone, streamed and
concurrent) equal one process's engine, routing traces work across ranks, and stopping rank 0
stops the other."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import pytest

import smoe
from serving import free_port
from smoe.generate import _result

PROMPTS = ["Bonjour", "The weather today", "Once upon a time", "Hello there, general"]


def alone(checkpoint, prompt: str) -> str:
    model, tok = smoe.load(checkpoint)
    engine = smoe.Engine(model, tok, max_batch_size=4, max_seq_len=512, prefill_chunk=256)
    seq = engine.add(tok.encode(prompt), smoe.SamplingParams(max_tokens=10, ignore_eos=True))
    while engine.active:
        engine.step()
    return _result(seq).text


@pytest.fixture(scope="module")
def cluster(chat_checkpoint):
    port, master = free_port(), free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1",
               "SMOE_DIST_TIMEOUT": "30"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "smoe", "serve", "--model", str(chat_checkpoint), "--port", str(port),
             "--parallel", "expert", "--max-batch", "4", "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield url, procs
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def complete(url: str, prompt: str, stream: bool = False) -> str:
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": stream}
    if not stream:
        return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    return text


def test_answers_equal_one_process(cluster, chat_checkpoint):
    url, _ = cluster
    expected = [alone(chat_checkpoint, p) for p in PROMPTS]
    assert [complete(url, p) for p in PROMPTS] == expected
    assert complete(url, PROMPTS[0], stream=True) == expected[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # batched across ranks
        assert list(pool.map(lambda p: complete(url, p), PROMPTS)) == expected
    r = httpx.post(url + "/routing", json={"tokens": [1, 415, 5565, 302]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["token_experts"]) == 4


def test_idle_longer_than_a_heartbeat_then_stopping_rank_0_stops_the_other(cluster):
    url, procs = cluster
    time.sleep(6)  # longer than the scheduler's heartbeat: the other rank is still in step
    assert complete(url, PROMPTS[1])
    procs[0].terminate()
    procs[0].wait(30)
    procs[1].wait(30)  # told to stop by rank 0's scheduler
    assert procs[1].returncode == 0, procs[1].stderr.read()
