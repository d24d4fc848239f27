"""The chat page at / in headless Chromium (Playwright driving Debian's chromium): a message in,
tokens streamed out with tokens/s, each token coloured by its first-choice expert at the chosen
layer, as a routing trace of the same tokens says; the API key asked for and used."""

from __future__ import annotations

import shutil

import pytest
import torch

import smoe
from serving import KEY, Server
from smoe.routing import expert_color, trace_routing

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
playwright = pytest.importorskip("playwright.sync_api")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page():
    server = Server("--max-batch", "2")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(server.url + "/")
        yield page
        browser.close()
    server.stop()


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_chat_page_streams_and_colours_tokens_by_expert(page):
    # the server wants a key: the page asks for it
    page.wait_for_selector("#key-box:not([hidden])")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('smoe-demo')")

    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.check("#colour")
    page.fill("#layer", "2")
    page.fill("#input", "What is the meaning of life?")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant .stats:has-text('tokens/s')")
    page.wait_for_selector(".assistant .tok[data-e]", state="attached")

    spans = page.eval_on_selector_all(
        ".assistant .tok", "els => els.map(e => [e.textContent, e.dataset.e ?? null, e.style.backgroundColor])")
    assert len(spans) > 3
    model, tok = smoe.load()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the meaning of life?"}])
    reply = smoe.Engine(model, tok, max_batch_size=2, max_seq_len=1024)
    seq = reply.add(prompt, smoe.SamplingParams(max_tokens=24))
    while reply.active:
        reply.step()
    # the streamed text is the model's greedy reply
    assert "".join(text for text, _, _ in spans) == seq.text
    # each token coloured by its first-choice expert at layer 2, from a trace of prompt + reply
    with torch.inference_mode(), trace_routing(model) as trace:
        model(torch.tensor([prompt + seq.token_ids]))
    experts = trace.tokens()[0][len(prompt):, 2, 0].tolist()
    coloured = [(int(e), colour) for _, e, colour in spans if e is not None]
    assert [e for e, _ in coloured] == experts[: len(coloured)] and len(coloured) >= len(spans) - 1
    assert all(colour == rgb(expert_color(e)) for e, colour in coloured)

    # another layer repaints; switching colours off clears them
    page.fill("#layer", "0")
    page.dispatch_event("#layer", "change")
    layer0 = trace.tokens()[0][len(prompt):, 0, 0].tolist()
    page.wait_for_function(f"document.querySelector('.assistant .tok[data-e]').dataset.e == '{layer0[0]}'")
    page.uncheck("#colour")
    assert page.eval_on_selector_all(".assistant .tok[data-e]", "els => els.length") == 0
