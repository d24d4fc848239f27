"""The engine: prefill, decode, sampling, stop handling, streaming, batching, timing.

The engine owns a KV cache with a fixed number of rows. Each `Sequence` lives in one
row from `add()` (which prefills its prompt) until it finishes; `step()` decodes one
token for every live sequence at once. A scheduler (continuous batching, the server)
calls `add()` and `step()` as requests come and go; `generate()` and
`stream_generate()` are the simple drivers on top.

The engine knows nothing about text beyond an optional tokenizer used for stop strings
and streaming; the model knows nothing about sampling.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from smoe.cache import KVCache
from smoe.errors import GenerationError
from smoe.sampling import Sampler, SamplingParams
from smoe.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of its logits, before any
    sampling setting) and the `top` most likely tokens at that position as (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    row: int = -1
    token_ids: list[int] = field(default_factory=list)  # generated, including a final stop token
    text: str = ""  # generated text so far, with its leading space (stop strings and tokens excluded)
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    prefilled: int = 0  # prompt tokens already in the cache (prefill runs in chunks)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token (params.logprobs)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. (params.prompt_logprobs)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    started: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def position(self) -> int:
        """Position of the last token fed to the model's cache + 1 = length of context."""
        return len(self.prompt_ids) + len(self.token_ids)


@dataclass(frozen=True)
class TextPiece:
    """Text that stream_generate has decoded since the last piece."""

    text: str


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__, generated_tokens=len(self.token_ids))


COMPILE_MIN_LEN = 256


def compiled_decode(model: torch.nn.Module) -> torch.nn.Module:
    """`model` compiled for one-token steps: the whole graph (fullgraph), static shapes (the
    cache plans static steps, KVCache.static), weights frozen as constants so inductor packs
    them for oneDNN itself. Compiling happens on the first call (tens of seconds: the Engine
    makes it with a warm-up step); dynamo keeps the result for later engines over the same
    model and cache shape."""
    if any(getattr(m, "opaque_to_compile", False) for m in model.modules()):  # a backend's opaque layout
        raise GenerationError("compile=True needs the layout torch.compile can trace: load the model with "
                              "smoe.load(..., compile=True) (--compile); oneDNN-packed weights are opaque to it")
    # a frozen inference model: no guards on its modules (each step would check hundreds: ~0.2 ms)
    options = {"freezing": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if next(model.parameters()).device.type == "cpu":
        # the vector width inductor picks from ATEN_CPU_CAPABILITY, stated: its on-disk cache keys on
        # the options and not on that variable, and a graph cached under avx2 and loaded under avx512
        # corrupted the heap (torch 2.13: "free(): invalid next size", seen on an AVX-512 VM)
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        options["cpp.simdlen"] = pick_vec_isa().bit_width()
    return torch.compile(model, fullgraph=True, dynamic=False, options=options)


class Engine:
    """Batched generation over a preallocated cache of `max_batch_size` rows of `max_seq_len` tokens.
    compile: decode steps run `compiled_decode(model)` (for models where Python overhead dominates)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.context = self.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or self.context, self.context)
        if compile:  # cache lengths in powers of two: a compiled step has one shape per length
            self.max_seq_len = min(max(COMPILE_MIN_LEN, 1 << (self.max_seq_len - 1).bit_length()), self.context)
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(
            self.config, max_batch_size, self.max_seq_len, dtype=model.dtype, device=model.device
        )
        # one-token steps: the model itself, or compiled whole over static cache plans (prefill runs eagerly)
        self.decode_model = compiled_decode(model) if compile else model
        self.cache.static = compile
        self.rows: list[Sequence | None] = [None] * max_batch_size
        if compile:
            self._warm_up()
        eos = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id is not None else None
        self.eos_ids = {eos} if eos is not None else set(self.config.eos_token_ids)
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._samplers: dict[int, Sampler] = {}
        self._pending: dict[int, str] = {}  # text held back because it may start a stop string

    def _warm_up(self) -> None:
        """Compile the decode step now (or fetch it from dynamo's cache), so that compiling
        stays out of every sequence's timings: one step over all rows, then the rows are reset."""
        B = len(self.rows)
        with torch.inference_mode():  # inputs made as step() makes them (inference tensors), or dynamo recompiles
            tokens, positions = (torch.zeros(B, 1, dtype=torch.long, device=self.model.device) for _ in range(2))
            self.decode_model(tokens, positions, self.cache.view(0, B))
        self.cache.view(0, B).reset()

    # ------------------------------------------------------------------ admission
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len == 0:
            raise GenerationError("the prompt is empty: give at least one token")
        total = prompt_len + params.max_tokens
        if total > self.max_seq_len:
            limit = "the model's context" if self.max_seq_len == self.context else "this engine's max_seq_len"
            raise GenerationError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = {total} tokens exceeds "
                f"{limit} of {self.max_seq_len}; shorten the prompt or lower max_tokens"
            )
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Put a sequence in a free row and prefill its prompt (its first token is sampled here)."""
        seq = self.admit(prompt_ids, params)
        while seq.prefilling:
            self.prefill(seq)
        return seq

    def admit(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Put a sequence in a free row without computing anything: `prefill()` then feeds its
        prompt chunk by chunk, so that a scheduler can interleave long prompts with decode steps."""
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        self.check(len(prompt_ids), params)
        try:
            row = self.rows.index(None)
        except ValueError:
            raise GenerationError("all rows of the engine are busy; wait for a sequence to finish") from None
        seq = Sequence(list(prompt_ids), params, row=row, started=time.perf_counter())
        self.rows[row] = seq
        self._samplers[row] = Sampler(params, self.config.vocab_size, context=prompt_ids, device=self.model.device)
        self._pending[row] = ""
        if self.tokenizer is not None:
            self._detok[row] = IncrementalDetokenizer(self.tokenizer, context=prompt_ids)
        self.cache.view(row, row + 1).reset()
        return seq

    def prefill(self, seq: Sequence) -> str:
        """Feed the next chunk (up to prefill_chunk tokens) of a sequence's prompt; after the
        last one, sample its first token and return the text it makes visible."""
        start = seq.prefilled
        chunk_ids = seq.prompt_ids[start : start + self.prefill_chunk]
        device = self.model.device
        with torch.inference_mode():
            chunk = torch.tensor([chunk_ids], device=device)  # [1, C]
            positions = torch.arange(start, start + len(chunk_ids), device=device)[None]  # [1, C]
            want = seq.params.prompt_logprobs
            logits = self.model(chunk, positions, self.cache.view(seq.row, seq.row + 1),
                                last_only=want is None)  # [1, C, V] or [1, 1, V]
            if want is not None:
                # logits at position i score prompt token i + 1 (the last one scores the first new token)
                targets = seq.prompt_ids[start + 1 : start + len(chunk_ids) + 1]
                seq.prompt_logprobs += token_logprobs(logits[0, : len(targets)], targets, want)
        seq.prefilled += len(chunk_ids)
        if seq.prefilling:
            return ""
        seq.prefill_s = time.perf_counter() - seq.started
        last = logits[0, -1]  # [V]
        return self._accept(seq, self._sample(seq, last), last)

    def remove(self, seq: Sequence) -> None:
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            for d in (self._detok, self._samplers, self._pending):
                d.pop(seq.row, None)

    @property
    def active(self) -> list[Sequence]:
        """Sequences with their prompt in the cache and tokens still to generate."""
        return [s for s in self.rows if s is not None and not s.finished and not s.prefilling]

    @property
    def prefilling(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None and s.prefilling]

    # --------------------------------------------------------------------- decode
    def step(self) -> list[tuple[Sequence, str]]:
        """Decode one token for every live sequence; return (sequence, new text) pairs."""
        live = self.active
        if not live:
            return []
        t0 = time.perf_counter()
        lo = min(s.row for s in live)
        hi = max(s.row for s in live) + 1
        if self.cache.static:  # compiled: every row, always: one shape, one compiled step
            lo, hi = 0, len(self.rows)
        tokens, positions, half_filled = [], [], []
        for row in range(lo, hi):
            seq = self.rows[row]
            if seq is not None and seq.prefilling:
                # a prompt still being fed: write into the slot its next chunk overwrites, and
                # forget that slot's position again below (its next chunk must not see it)
                tokens.append(0)
                positions.append(seq.prefilled)
                half_filled.append(row)
            elif seq is not None and not seq.finished:
                tokens.append(seq.token_ids[-1])
                positions.append(seq.position - 1)
            else:  # an idle row in the span: recompute its last position, harmlessly
                tokens.append(0)
                positions.append(max((seq.position - 1) if seq else 0, 0))
        device = self.model.device
        slot_pos = self.cache.slot_pos
        kept = [(row, slot_pos[row].clone()) for row in half_filled]
        view = self.cache.view(lo, hi)
        with torch.inference_mode():
            # the whole step in one native call where the model's decode plan takes it (Transformer.decode_step)
            native = getattr(self.decode_model, "decode_step", None)  # (None for a static cache: compiled steps)
            stepped = native(tokens, positions, view) if native is not None else None
            if stepped is None:
                logits = self.decode_model(
                    torch.tensor(tokens, device=device)[:, None],  # [b, 1]
                    torch.tensor(positions, device=device)[:, None],  # [b, 1]
                    view,
                )[:, -1]  # [b, V]
            else:
                logits, greedy_tokens = stepped
        for row, saved in kept:
            slot_pos[row] = saved
        out = []
        greedy = all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in live)
        if greedy and stepped is not None:
            best = greedy_tokens.tolist()  # the first index of each row's largest logit, as below
        elif greedy:
            # fp32 (PyTorch's bf16 argmax is ~4x slower), and max's indices: the same first index of
            # the largest value as argmax, in half its time here
            best = logits.float().max(-1).indices.tolist()
        for seq in live:
            # [V]; a greedy step without logprobs does not need its row (indexing is a dispatcher call)
            row_logits = logits[seq.row - lo] if not greedy or seq.params.logprobs is not None else None
            token = best[seq.row - lo] if greedy else self._sample(seq, row_logits)
            out.append((seq, self._accept(seq, token, row_logits)))
        dt = time.perf_counter() - t0
        for seq in live:
            seq.decode_s += dt
        return out

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        return self._samplers[seq.row](logits)

    def _accept(self, seq: Sequence, token: int, logits: torch.Tensor | None) -> str:
        """Record a sampled token, apply stop rules, and return the text it makes visible."""
        seq.token_ids.append(token)
        if seq.params.logprobs is not None:
            seq.logprobs += token_logprobs(logits[None], [token], seq.params.logprobs)
        self._samplers[seq.row].add(token)
        params = seq.params
        stopped = token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)
        piece = ""
        detok = self._detok.get(seq.row)
        if detok is not None and not stopped:
            piece = detok.add(token)
        if len(seq.token_ids) >= params.max_tokens and not stopped:
            seq.finish_reason = "length"
        if stopped:
            seq.finish_reason = "stop"
        if detok is not None and seq.finished:
            piece += detok.flush()
        if not params.stop:
            seq.text += piece
            return piece
        # stop strings: hold back any tail that could be the start of one
        pending = self._pending[seq.row] + piece
        for s in params.stop:
            at = pending.find(s)
            if at >= 0:
                pending = pending[:at]
                seq.finish_reason = "stop"
        if seq.finished:
            emit, self._pending[seq.row] = pending, ""
        else:
            keep = max((k for s in params.stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            emit, self._pending[seq.row] = pending[: len(pending) - keep], pending[len(pending) - keep :]
        seq.text += emit
        return emit


def token_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """logits [n, V] at n positions, the token that came next at each -> its log-probability
    (fp32 log-softmax) and the `top` most likely tokens there."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()  # [n]
    if top:
        values, ids = logprobs.topk(top, dim=-1)  # [n, top]
        alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [[] for _ in targets]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(targets, chosen, alternatives, strict=True)]


# ---------------------------------------------------------------------- drivers


def _prompt_ids(tokenizer: Tokenizer | None, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("this model has no tokenizer: pass the prompt as a list of token ids")
        return tokenizer.encode(prompt, bos=True)
    return [int(t) for t in prompt]


def _result(seq: Sequence) -> GenerationResult:
    n = len(seq.token_ids)
    total = seq.prefill_s + seq.decode_s
    return GenerationResult(
        text=seq.text,
        token_ids=list(seq.token_ids),
        prompt_tokens=len(seq.prompt_ids),
        finish_reason=seq.finish_reason or "length",
        time_to_first_token_s=seq.prefill_s,
        prefill_tokens_per_s=len(seq.prompt_ids) / seq.prefill_s if seq.prefill_s else 0.0,
        # the first token comes out of prefill; decode made the other n - 1
        decode_tokens_per_s=(n - 1) / seq.decode_s if seq.decode_s and n > 1 else 0.0,
        total_s=total,
    )


def _params(kwargs: dict) -> SamplingParams:
    if kwargs.get("stop") is None:  # stop=None: no stop strings
        kwargs = {k: v for k, v in kwargs.items() if k != "stop"}
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise GenerationError(str(e).replace("SamplingParams.__init__()", "generate()")) from None


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    prompt: str | list[int] | list[str] | list[list[int]],
    *,
    compile: bool = False,
    **sampling,
) -> GenerationResult | list[GenerationResult]:
    """Generate a continuation of `prompt` (text, or token ids), or of each prompt of a list.

    Keywords: max_tokens, temperature (0 = greedy), top_k, top_p, min_p,
    repetition_penalty, seed, stop (strings), stop_token_ids, ignore_eos; compile=True runs
    the decode steps compiled whole (a model loaded with smoe.load(..., compile=True)).
    """
    batched = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts = prompt if batched else [prompt]
    params = _params(sampling)
    all_ids = [_prompt_ids(tokenizer, p) for p in prompts]
    longest = max(len(ids) for ids in all_ids)
    engine = Engine(
        model, tokenizer, max_batch_size=len(all_ids),
        max_seq_len=min(longest + params.max_tokens, model.config.max_position_embeddings), compile=compile,
    )
    for ids in all_ids:
        engine.check(len(ids), params)
    seqs = [engine.add(ids, params) for ids in all_ids]
    while engine.active:
        engine.step()
    results = [_result(s) for s in seqs]
    return results if batched else results[0]


def stream_generate(
    model: torch.nn.Module, tokenizer: Tokenizer | None, prompt: str | list[int], *, compile: bool = False,
    **sampling,
) -> Iterator[TextPiece | GenerationResult]:
    """Yield a TextPiece for each piece of text as it is decoded, then one GenerationResult."""
    if tokenizer is None:
        raise GenerationError("streaming text needs a tokenizer")
    params = _params(sampling)
    ids = _prompt_ids(tokenizer, prompt)
    engine = Engine(
        model, tokenizer, max_batch_size=1,
        max_seq_len=min(len(ids) + params.max_tokens, model.config.max_position_embeddings), compile=compile,
    )
    engine.check(len(ids), params)
    seq = engine.add(ids, params)
    if seq.text:
        yield TextPiece(seq.text)
    while engine.active:
        for _, piece in engine.step():
            if piece:
                yield TextPiece(piece)
    yield _result(seq)
