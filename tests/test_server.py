"""`smoe serve` on loopback, driven by the official `openai` client (and plain HTTP for what
the client hides): answers equal smoe's own generate() and the model's own log-softmax,
streaming, stop strings, n, seeds, every error class, the API key on every route, client
disconnects freeing their rows, and continuous batching giving each stream what it gets alone."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import smoe
from serving import KEY, MODEL, Server
from smoe.generate import _result

openai = pytest.importorskip("openai")

PROMPTS = [
    "The meaning of life is", "Once upon a time", "def fibonacci(n):", "The capital of France",
    "In 1905, Einstein", "Roses are red,", "import numpy as np\n", "The quick brown fox",
    "Dear Sir or Madam,", "Water boils at", "My favourite food is", "To be or not to be",
    "The stock market", "SELECT * FROM", "Photosynthesis is", "It was a dark and stormy night",
]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "16", "--prefill-chunk", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server32():
    """The demo model in fp32: log-probabilities comparable with an uncached forward pass to 1e-4."""
    s = Server("--dtype", "fp32", "--max-batch", "2", "--prefill-chunk", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def demo():
    return smoe.load()


def generate_alone(demo, prompt, **kw):
    """The request run alone in an engine shaped like the server's (16 rows of the demo's full
    context, prefill in chunks of 16): in bf16, attention over a differently sized cache sums in
    another order, so the reference must have the same cache shape."""
    model, tok = demo
    engine = smoe.Engine(model, tok, max_batch_size=16, max_seq_len=1024, prefill_chunk=16)
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    seq = engine.add(ids, smoe.SamplingParams(**kw))
    while engine.active:
        engine.step()
    return _result(seq)


# ------------------------------------------------------------------------------ answers


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_completion_equals_generate(server, demo):
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    ref = generate_alone(demo, PROMPTS[0], max_tokens=24)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)


def test_token_id_prompts_and_lists(server, demo):
    _, tok = demo
    ids = tok.encode(PROMPTS[1])
    ids2 = tok.encode(PROMPTS[2])
    r = server.client().completions.create(model=MODEL, prompt=[ids, ids2], max_tokens=12, temperature=0)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    expected = [generate_alone(demo, p, max_tokens=12).text for p in (ids, ids2)]
    assert texts == expected
    r = server.client().completions.create(model=MODEL, prompt=[PROMPTS[1], PROMPTS[2]], max_tokens=12, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    assert r.usage.prompt_tokens == len(ids) + len(ids2)


def test_chat_equals_generate_with_the_template(server, demo):
    model, tok = demo
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    ref = generate_alone(demo, tok.apply_chat_template(messages), max_tokens=20)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens


def test_streaming_with_usage_equals_the_whole(server):
    c = server.client()
    whole = c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=25, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=25, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_are_cut_and_never_streamed_in_part(server, demo):
    full = generate_alone(demo, PROMPTS[4], max_tokens=40).text
    stop = full[12:16]  # a few characters from the middle, likely split over tokens
    expected = full[: full.index(stop)]
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=40, temperature=0, stop=[stop, "@@never@@"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPTS[4], max_tokens=40, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected  # nothing of the stop string went out, not even its start


def test_n_choices_and_seeds(server):
    c = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=16, temperature=1.0, top_p=0.95)
    r = c.completions.create(n=3, seed=7, **kw)
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(r.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    # choice i is the draw of seed + i, the same whether asked together or alone
    assert texts == [c.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)]
    assert len(set(texts)) > 1
    again = c.completions.create(n=3, seed=7, **kw)
    assert [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)] == texts
    alone = [c.completions.create(seed=7 + i, **kw) for i in range(3)]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once, whatever n


def test_echo_logprobs_equal_the_models_log_softmax(server32):
    model, tok = smoe.load(dtype="fp32")
    server = server32
    prompt = "The quick brown fox jumps over the lazy dog because"
    r = server.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0,
                                        "echo": True, "logprobs": 3}).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    ids = tok.encode(prompt)
    gen = generate_alone((model, tok), prompt, max_tokens=3).token_ids
    assert choice["text"] == prompt + tok.decode(gen)
    all_ids = ids + gen
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(all_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([all_ids[:-1]])).float()[0], -1)  # [n-1, V]
    expected = ref.gather(1, torch.tensor(all_ids[1:])[:, None])[:, 0]
    got = torch.tensor(lp["token_logprobs"][1:])
    # the server's prefill (in chunks of 16, with a cache) and decode vs one uncached forward pass
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for i in range(1, len(all_ids)):
        top = lp["top_logprobs"][i]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    # text offsets index the returned text
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"]
    # max_tokens 0 with echo: score the prompt only (what lm-eval's loglikelihood needs)
    only = server.post("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True,
                                           "logprobs": 1}).json()
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]
    assert only["usage"]["completion_tokens"] == 0


def test_chat_logprobs(server, demo):
    r = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6)


def test_tokenize_detokenize_and_tokenizer_info(server, demo):
    _, tok = demo
    text = "Hello, world! Ünïcödé 你好"
    r = server.post("/tokenize", {"prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"] == tok.encode(
        text, bos=False)
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == tok.decode(r["tokens"])
    info = server.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 1024)
    # as Hugging Face tokenizers and vLLM read it (lm-eval finds the EOS id so); prompts for generation do not
    r = server.post("/tokenize", {"prompt": "</s>", "add_special_tokens": False}).json()
    assert r["tokens"] == [tok.eos_id]
    assert server.post("/tokenize", {"prompt": "a</s>b"}).json()["tokens"] == [
        tok.bos_id, *tok.encode("a", bos=False), tok.eos_id, *tok.encode("b", bos=False)]


# ------------------------------------------------------------------------------- errors


def error(r: httpx.Response, status: int, type_: str, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["type"] == type_ and e["message"]
    if param != "any":
        assert e["param"] == param, e
    return e


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[1], "x"]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "presence_penalty": 0.5}, None),
    ({"prompt": "x", "max_tokens": 0}, None),
    ({"prompt": [5, 999999]}, "prompt"),
])
def test_bad_parameters_are_400(server, body, param):
    e = error(server.post("/v1/completions", {"model": MODEL, **body}), 400, "invalid_request_error")
    if param is not None:
        assert e["param"] is not None and e["param"].startswith(param.split(".")[0])


def test_bad_chat_requests_are_400(server):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "assistant", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                 {"messages": "hello"}):
        error(server.post("/v1/chat/completions", {"model": MODEL, **body}), 400, "invalid_request_error")


def test_text_that_is_not_unicode_is_400(server):
    for path, body in (("/v1/completions", {"prompt": "\ud800 hi"}), ("/tokenize", {"prompt": "a\udfff"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]})):
        r = httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=10,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        error(r, 400, "invalid_request_error")


def test_more_sequences_than_the_server_holds_is_400(server):
    e = error(server.post("/v1/completions", {"prompt": ["a"] * 8, "n": 16, "max_tokens": 1}), 400,
              "invalid_request_error", "n")
    assert "128" in e["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x",', timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error(r, 400, "invalid_request_error")


def test_context_exceeded_names_both_counts(server, demo):
    _, tok = demo
    prompt = "word " * 300
    n = len(tok.encode(prompt))
    e = error(server.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 900}), 400,
              "invalid_request_error")
    assert str(n) in e["message"] and "900" in e["message"] and "1024" in e["message"]
    assert e["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt * 4}])


def test_unknown_routes_and_models_are_404(server):
    error(server.get("/v1/nothing"), 404, "not_found_error")
    error(server.post("/v2/completions", {}), 404, "not_found_error")
    error(server.post("/v1/completions", {"model": "gpt-5", "prompt": "x"}), 404, "not_found_error", "model")
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-5")


def test_oversized_body_is_413(server):
    big = {"model": MODEL, "prompt": "x" * (5 << 20)}
    error(server.post("/v1/completions", big), 413, "invalid_request_error")

    def chunks():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(6):
            yield b" " * (1 << 20)

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error(r, 413, "invalid_request_error")


ROUTES = [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
          ("GET", "/tokenizer_info"), ("GET", "/metrics"), ("POST", "/routing"), ("GET", "/v1/unknown")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_api_key_guards_every_route(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, server.url + path, headers=headers, json={}, timeout=10)
        error(r, 401, "authentication_error")
    assert httpx.get(server.url + "/health").status_code == 200  # /health never needs the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_full_is_503_and_health_while_loading():
    s = Server("--max-batch", "1", "--max-queue", "1", key=None)
    try:
        long = {"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(s.post, "/v1/completions", long, None)
            deadline = time.time() + 30
            while s.metric("smoe_running_sequences") < 1 and time.time() < deadline:
                time.sleep(0.05)
            waiting = pool.submit(s.post, "/v1/completions", {**long, "max_tokens": 2}, None)
            while s.metric("smoe_queue_length") < 1 and time.time() < deadline:
                time.sleep(0.05)
            e = error(s.post("/v1/completions", {**long, "max_tokens": 2}, None), 503, "service_unavailable")
            assert "queue" in e["message"]
            assert running.result().status_code == 200 and waiting.result().status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------ batching, cancelling


def test_concurrent_greedy_streams_equal_each_alone(server):
    c = server.client(timeout=120)
    # long prompts too: they prefill in chunks of 16 between the other streams' decode steps
    prompts = PROMPTS[:12] + [p * 6 for p in PROMPTS[12:]]

    def ask(prompt, stream):
        if not stream:
            return c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True))

    alone = [ask(p, False) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: ask(prompts[i], i % 2 == 0), range(16)))
    assert together == alone
    assert server.metric("smoe_running_sequences") == 0


def wait_until_idle(server, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.metric("smoe_running_sequences") == 0 and server.metric("smoe_queue_length") == 0:
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_row(server):
    before = server.metric("smoe_cancelled_sequences_total")
    # 16 rows of 900 tokens: ~1.7 s of work on a fast CPU (Zen 5 runs one row's 900 tokens in 0.25 s,
    # inside the non-streaming client's 0.5 s), so both clients leave long before their rows finish
    body = {"model": MODEL, "prompt": "Tell me", "max_tokens": 900, "n": 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert wait_until_idle(server)  # streaming client gone: cancelled, rows free, long before 900 tokens
    assert server.metric("smoe_cancelled_sequences_total") == before + 16
    # a non-streaming client that gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert wait_until_idle(server)
    assert server.metric("smoe_cancelled_sequences_total") == before + 32


def test_metrics_count_requests_and_tokens(server):
    text = server.get("/metrics").text
    for name in ("smoe_requests_total", "smoe_prompt_tokens_total", "smoe_generation_tokens_total",
                 "smoe_queue_length", "smoe_running_sequences", "smoe_time_to_first_token_seconds_bucket",
                 "smoe_decode_tokens_per_second"):
        assert name in text
    before = server.metric("smoe_generation_tokens_total")
    server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert server.metric("smoe_generation_tokens_total") == before + 5


def test_routing_endpoint_matches_a_routing_trace(server, demo):
    from smoe.routing import trace_routing

    model, tok = demo
    ids = tok.encode("Experts route tokens")
    r = server.post("/routing", {"tokens": ids}).json()
    with torch.inference_mode(), trace_routing(model) as trace:
        model(torch.tensor([ids]))
    experts, _, _ = trace.tokens()
    assert r["token_experts"] == experts[:, :, 0].tolist()
    assert r["layers"] == model.config.num_hidden_layers and r["experts"] == model.config.num_local_experts


def test_bad_flags_exit_2():
    r = subprocess.run([sys.executable, "-m", "smoe", "serve", "--port", "70000"], capture_output=True, text=True)
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "smoe", "serve", "--port", str(port)], capture_output=True, text=True)
    assert r.returncode == 2 and str(port) in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "smoe", "serve", "--model", "/nonexistent/model", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "/nonexistent/model" in r.stderr and "Traceback" not in r.stderr
    json.dumps(r.stderr)


def test_while_loading_health_and_routes_are_503():
    """The server listens before the model has loaded: /health says so, the model routes answer 503."""
    from fastapi.testclient import TestClient

    from smoe.server.app import ServerState, create_app

    client = TestClient(create_app(ServerState(model_name=MODEL)))
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "x"}]}), ("/tokenize", {"prompt": "x"})):
        error(client.post(path, json=body), 503, "service_unavailable")


def test_cors_is_closed_unless_origins_are_allowed():
    from fastapi.testclient import TestClient

    from smoe.server.app import ServerState, create_app

    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = TestClient(create_app(ServerState(model_name=MODEL, api_key=KEY)))
    r = closed.options("/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = closed.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    opened = TestClient(create_app(ServerState(model_name=MODEL, api_key=KEY), allowed_origins=["https://ok.example"]))
    r = opened.options("/v1/completions", headers={**preflight, "Origin": "https://ok.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
    r = opened.options("/v1/completions", headers=preflight)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_a_model_without_a_tokenizer_answers_token_ids(checkpoint_factory):
    from fastapi.testclient import TestClient

    from smoe.server import attach
    from smoe.server.app import ServerState, create_app

    model, tok = smoe.load(checkpoint_factory())
    assert tok is None
    state = ServerState(model_name="tiny")
    client = TestClient(create_app(state))
    scheduler = attach(state, model, None, max_batch=2, max_context=64, prefill_chunk=16)
    try:
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 5, "temperature": 0,
                                                 "ignore_eos": True})
        assert r.status_code == 200, r.text
        expected = smoe.generate(model, None, [1, 5, 9], max_tokens=5, ignore_eos=True).token_ids
        assert r.json()["choices"][0]["token_ids"] == expected
        e = error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400,
                  "invalid_request_error", "messages")
        assert "tokenizer" in e["message"]
        error(client.post("/v1/completions", json={"prompt": "text"}), 400, "invalid_request_error", "prompt")
    finally:
        scheduler.stop()
