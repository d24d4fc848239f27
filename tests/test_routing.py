"""Routing traces and statistics against transformers' router logits; the HTML page in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import smoe
from smoe.routing import expert_color, random_same_topk, routing_report, trace_routing


def independent_stats(router_logits: list[torch.Tensor], docs: list[slice], top_k: int) -> list[dict]:
    """The paper's statistics, written out with plain loops from transformers' router logits."""
    stats = []
    for logits in router_logits:  # one [N, E] per layer
        E = logits.shape[-1]
        chosen = [torch.topk(torch.softmax(row.float(), -1), top_k).indices.tolist() for row in logits]
        first = [0] * E
        topk = [0] * E
        for c in chosen:
            first[c[0]] += 1
            for e in c:
                topk[e] += 1
        same_first = same_topk = pairs = 0
        for d in docs:
            rows = chosen[d]
            for a, b in zip(rows, rows[1:], strict=False):
                pairs += 1
                same_first += a[0] == b[0]
                same_topk += bool(set(a) & set(b))
        n = len(chosen)
        stats.append({"first": [x / n for x in first], "topk": [x / (n * top_k) for x in topk],
                      "same_first": same_first / pairs, "same_topk": same_topk / pairs})
    return stats


@pytest.mark.parametrize("experts,top_k", [(8, 2), (4, 1), (16, 4)])
def test_statistics_match_transformers_router_logits(checkpoint_factory, experts, top_k):
    from transformers import MixtralForCausalLM

    path = checkpoint_factory(num_local_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=3)
    hf = MixtralForCausalLM.from_pretrained(path).eval()
    model, _ = smoe.load(path)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g) for n in (17, 5, 30)]
    per_doc = []
    for ids in docs:
        with trace_routing(model) as trace:
            model(ids[None])
        per_doc.append(("d", trace.tokens()[0]))
    report = routing_report(per_doc, experts, top_k)
    with torch.no_grad():
        hf_logits = [torch.cat(per_layer) for per_layer in zip(
            *[hf(ids[None], output_router_logits=True).router_logits for ids in docs], strict=True)]
    bounds, start = [], 0
    for ids in docs:
        bounds.append(slice(start, start + len(ids)))
        start += len(ids)
    expected = independent_stats(hf_logits, bounds, top_k)
    assert report["tokens"] == 52
    for got, want in zip(report["layers"], expected, strict=True):
        assert got["first_choice_share"] == pytest.approx(want["first"], abs=1e-6)
        assert got["topk_share"] == pytest.approx(want["topk"], abs=1e-6)
        assert got["consecutive_same_first"] == pytest.approx(want["same_first"], abs=1e-6)
        assert got["consecutive_same_topk"] == pytest.approx(want["same_topk"], abs=1e-6)
        assert sum(got["first_choice_share"]) == pytest.approx(1) and sum(got["topk_share"]) == pytest.approx(1)


def test_random_baselines():
    assert random_same_topk(8, 2) == pytest.approx(1 - 6 / 8 * 5 / 7)
    assert random_same_topk(8, 1) == pytest.approx(1 / 8)


def test_trace_during_generation_matches_full_forward(checkpoint_factory):
    model, _ = smoe.load(checkpoint_factory(sliding_window=5))
    prompt = list(range(10, 22))
    with trace_routing(model) as trace:
        result = smoe.generate(model, None, prompt, max_tokens=10, ignore_eos=True)
    experts, weights, entropy = trace.tokens()
    fed = prompt + result.token_ids[:-1]
    assert experts.shape == (len(fed), 2, 2) and entropy.shape == (len(fed), 2)
    assert torch.allclose(weights.sum(-1), torch.ones(len(fed), 2))
    with trace_routing(model) as full:
        model(torch.tensor([fed]))
    assert torch.equal(full.tokens()[0], experts)
    assert all(not layer.moe.router._forward_hooks for layer in model.layers)  # tracing is off again


def test_routes_cli_outputs(chat_checkpoint, tmp_path):
    docs = tmp_path / "labelled.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in [
        {"domain": "english", "text": "The quick brown fox jumps over the lazy dog."},
        {"domain": "english", "text": "A stitch in time saves nine."},
        {"domain": "code", "text": "def f(x):\n    return x + 1\n"},
    ]) + "\n")
    text = tmp_path / "story.txt"
    text.write_text("Il était une fois un petit chat.")
    out = subprocess.run([sys.executable, "-m", "smoe.cli", "routes", "--model", str(chat_checkpoint),
                          "--input", str(text), "--domains", str(docs), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r" / "routes.json").read_text())
    assert set(report["domains"]) == {"english", "code", "story"}
    for group in [report["layers"], *[d["layers"] for d in report["domains"].values()]]:
        assert [layer["layer"] for layer in group] == [0, 1]
        for layer in group:
            assert len(layer["first_choice_share"]) == len(layer["topk_share"]) == 4
            assert sum(layer["topk_share"]) == pytest.approx(1) and 0 <= layer["consecutive_same_topk"] <= 1
    for name in ("heatmap_all.png", "heatmap_code.png", "routes.html"):
        assert (tmp_path / "r" / name).stat().st_size > 500
    bad = subprocess.run([sys.executable, "-m", "smoe.cli", "routes", "--model", str(chat_checkpoint),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "give --input FILE" in bad.stderr


def test_generate_trace_routing_file(chat_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "smoe.cli", "generate", "--model", str(chat_checkpoint), "--prompt",
                          "Hello world", "--max-tokens", "5", "--ignore-eos", "--trace-routing", str(tmp_path / "t.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["prompt_tokens"] == 3 and len(trace["tokens"]) == 3 + 5 - 1
    row = trace["tokens"][1]
    assert len(row["experts"]) == 2 and len(row["experts"][0]) == 2 and "entropy" in row and "text" in row


def _rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make test installs it)")
def test_html_page_renders_expert_colours_in_chromium(chat_checkpoint, tmp_path):
    from smoe.routing import run_routes

    model, tok = smoe.load(chat_checkpoint)
    docs = [{"domain": "en", "text": "Hello there, general Kenobi. Straße 日本"}]
    run_routes(model, tok, docs, tmp_path, layer=0)  # written coloured by layer 0 ...
    with trace_routing(model) as trace:
        model(torch.tensor([tok.encode(docs[0]["text"])]))
    firsts = trace.tokens()[0][:, 1, 0].tolist()  # first choice at layer 1, per token
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (tmp_path / "routes.html").as_uri() + "#layer=1"],
        capture_output=True, text=True, timeout=120,
    ).stdout
    spans = re.findall(r'<span class="t" data-e="([\d,]+)"[^>]*style="background:\s*([^;"]+);?"', dom)
    assert len(spans) == len(firsts) > 5
    repainted = 0
    for (data, colour), first in zip(spans, firsts, strict=True):
        layer0, layer1 = (int(x) for x in data.split(",")[:2])
        assert layer1 == first
        # ... and shown coloured by layer 1, which the page's script painted in the browser
        assert (_rgb(colour) if colour.startswith("#") else colour) == _rgb(expert_color(first))
        repainted += layer0 != layer1
    assert repainted > 0
