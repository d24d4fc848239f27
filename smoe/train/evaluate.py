"""Held-out evaluation: perplexity per domain of a token stream, or over the assistant
tokens of chat examples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smoe.train.batches import ExampleStream, domain_streams, tokenize_documents


@torch.no_grad()
def stream_perplexity(model, tokens: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over the first max_tokens predictions of a token stream,
    in non-overlapping windows of seq_len (each window starts without context)."""
    tokens = tokens[: max_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1]
        if len(window) < 2:
            break
        logits = model(window[None, :-1]).float()  # [1, T, V]
        nll += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count), count


def heldout_perplexity(model, tokenizer, docs: list[dict], seq_len: int, max_tokens: int) -> dict[str, float]:
    streams = domain_streams(tokenize_documents(docs, tokenizer), docs)
    return {d: round(stream_perplexity(model, s, seq_len, max_tokens)[0], 4) for d, s in streams.items()}


@torch.no_grad()
def example_perplexity(model, examples: ExampleStream, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over the trained (assistant) tokens of every example, in order."""
    nll, count = 0.0, 0
    for start in range(0, examples.num_chunks, batch_size):
        x, y, _ = examples.rows(list(range(start, min(start + batch_size, examples.num_chunks))))
        logits = model(x).float()  # [B, T, V]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += int((y != -100).sum())
    return math.exp(nll / count), count



def evaluate(model, heldout: dict, cfg) -> dict[str, float]:
    """Held-out perplexity per set: token streams (per domain) or chat examples (assistant tokens)."""
    was_training = model.training
    model.eval()
    result = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
        for name, data in heldout.items():
            if isinstance(data, ExampleStream):
                result[name] = round(example_perplexity(model, data, cfg.batch_size)[0], 3)
            else:
                result[name] = round(stream_perplexity(model, data, cfg.seq_len, cfg.eval_tokens)[0], 3)
    model.train(was_training)
    return result
