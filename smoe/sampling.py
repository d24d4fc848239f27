"""Turning next-token logits into a token: penalties, temperature, top-k, top-p, min-p.

The order is the one Hugging Face applies (repetition penalty, temperature, top-k,
top-p, min-p), so a seed-independent setting (greedy) gives the same tokens there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from smoe.errors import GenerationError

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default limit)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context
    seed: int | None = None  # same seed -> same tokens; None draws a fresh one
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probability of each generated token, with this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (after the first)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            ok = value is None or (type(value) is int and 0 <= value <= MAX_LOGPROBS)
            checks.append((name, ok, f"an integer in [0, {MAX_LOGPROBS}]"))
        for name, ok, what in checks:
            if not ok:
                raise GenerationError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(2**63)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): for tokens in the context, divide positive logits
    by `penalty` and multiply negative ones. logits [V], context [n] token ids."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(0, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    # a penalty below 1 so strong that a logit overflows (1e-300 is a valid penalty) leaves it at
    # the largest finite value: +inf would make the softmax NaN
    top = torch.finfo(seen.dtype).max
    return logits.scatter(0, context, seen.clamp(max=top))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p as -inf masks. logits [V] fp32."""
    # a temperature outside the dtype's range would divide by 0 or by inf there (5e-324 and 1e300 are
    # valid): its ends are as good a limit (Sampler shifts the top logit to 0 first, so a tiny one
    # sends the rest to -inf: greedy)
    finfo = torch.finfo(logits.dtype)
    logits = logits / min(max(params.temperature, finfo.tiny), finfo.max)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of logits [V]: a token is dropped once the more likely tokens before it
    already reach top_p (the first is always kept). Only the head of the distribution is sorted —
    the top 64 tokens, then 4x more until their probabilities reach top_p — rather than all V
    (a sort of 8k logits cost as much as a decode step of the demo model)."""
    probs = logits.softmax(-1)
    V = probs.shape[-1]
    k = min(V, 64)
    while True:
        top, order = torch.topk(probs, k)  # descending
        reached = top.cumsum(-1)
        if k == V or float(reached[-1]) >= top_p:  # what every token past these has before it: all dropped
            break
        k = min(V, 4 * k)
    drop = reached - top >= top_p
    drop[0] = False  # explicitly: a top_p below fp32's smallest number compares as 0
    keep = order[~drop]
    out = torch.full_like(logits, float("-inf"))
    out[keep] = logits[keep]
    return out


class Sampler:
    """Per-sequence sampling state: parameters and a seeded generator."""

    def __init__(self, params: SamplingParams, vocab_size: int, context: list[int] = (),
                 device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed)
        # the repetition penalty needs the set of tokens seen so far (prompt + generated), kept as
        # ids once each: the context is never rebuilt per token
        self.penalized = params.repetition_penalty != 1.0
        self.seen = torch.zeros(vocab_size if self.penalized else 0, dtype=torch.bool, device=device)
        if self.penalized and len(context):
            self.seen[torch.tensor(list(context), dtype=torch.long, device=device)] = True

    def add(self, token: int) -> None:
        """Note a token of the context (a prompt token, or one just generated)."""
        if self.penalized:
            self.seen[token] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] for the next token."""
        logits = logits.float()
        if self.penalized:
            logits = apply_repetition_penalty(logits, self.seen.nonzero()[:, 0], self.params.repetition_penalty)
        if self.params.greedy:
            return int(logits.argmax())
        # the largest logit shifted to 0 first (the distribution is the same): a temperature so small
        # that logit / temperature overflows (5e-324 is valid) then gives 0 for the top token and
        # -inf for the rest — greedy, its limit — where +inf - inf made the softmax NaN (a 500)
        probs = filter_logits(logits - logits.max(), self.params).softmax(-1)
        return draw(probs, self.generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probabilities [V] by inverting their running sum at one uniform draw (as
    llama.cpp's sampler does): torch.multinomial draws V exponentials for one sample (~170 us at
    V = 8192, as much as a decode step of the demo model). Never a token of probability 0."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand((), dtype=torch.float64, generator=generator, device=probs.device) * cdf[-1]
    token = int(torch.searchsorted(cdf, u, right=True))
    if token >= probs.shape[-1] or probs[token] <= 0:  # u rounded up to the total: the last likely token
        token = int(probs.nonzero()[-1, 0])
    return token
