"""The HTTP shell: OpenAI routes over the scheduler (FastAPI).

Every request is checked here — pydantic models (protocol.py), then the prompt against the
vocabulary and the context — before it reaches the scheduler; no tensor crosses into this
file. Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`:

    400 invalid_request_error   malformed JSON, a bad or out-of-range field, context exceeded
    401 authentication_error    missing or wrong API key (every route but /health and the page)
    404 not_found_error         unknown route or model
    413 invalid_request_error   body larger than --max-body
    503 service_unavailable     still loading, or the queue is full
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from smoe import __version__
from smoe.errors import GenerationError, TokenizerError
from smoe.generate import TokenLogprob
from smoe.routing import expert_color, token_pieces, trace_routing
from smoe.sampling import SamplingParams
from smoe.server.metrics import Metrics
from smoe.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RoutingRequest,
    SamplingFields,
    TokenizeRequest,
)
from smoe.server.scheduler import Job, Outbox, QueueFull, Scheduler, Update

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no key needed (the page is static; its API calls send the key)
DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


@dataclass
class ServerState:
    """What the routes share. scheduler/tokenizer are None until the model has loaded."""

    model_name: str
    api_key: str | None = None
    max_body: int = 4 << 20
    scheduler: Scheduler | None = None
    tokenizer: object | None = None
    vocab_size: int = 0
    max_context: int = 0
    num_layers: int = 0
    num_experts: int = 0
    load_error: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))


class KeyAndCount:
    """The API key on every route but /health and the page (compared in constant time), and a
    count of requests by route and status. Plain ASGI (BaseHTTPMiddleware would hide client
    disconnects from the routes)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.state.api_key
        requests = self.state.metrics.requests
        if key is not None and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            headers = Headers(scope=scope)
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), key.encode()):
                requests.labels(_route(path), "401").inc()
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          "authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            requests.labels(_route(path), str(status[0])).inc()


class BodyLimit:
    """413 for a body over `limit` bytes, whether it announces its length or streams it: the
    body is read here (at most `limit` bytes held) and handed on whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()  # then: the real one (disconnects)

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than the server's limit of {self.limit} bytes",
                                  "invalid_request_error", code="request_too_large")
        await response(scope, receive, send)


def create_app(state: ServerState, allowed_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="smoe", version=_version(), docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a Mixtral-family model (smoe)")
    app.state.smoe = state
    metrics = state.metrics

    # ------------------------------------------------------------------ errors, key, size
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    app.add_middleware(BodyLimit, limit=state.max_body)
    app.add_middleware(KeyAndCount, state=state)  # outermost: no key, nothing else happens
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])

    def ready() -> Scheduler:
        if state.scheduler is None:
            why = state.load_error or "the model is still loading; retry when GET /health says ok"
            raise APIError(503, why, "service_unavailable")
        return state.scheduler

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    # -------------------------------------------------------------------- plain routes
    @app.get("/health")
    async def health():
        if state.scheduler is None:
            return JSONResponse({"status": "error" if state.load_error else "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return _model_card(state)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        ready()
        tok = state.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer", "not_found_error")

        specials = _special_tokens(tok)
        names = {i: text for text, i in specials.items()}
        return {"eos_token": names.get(tok.eos_id), "bos_token": names.get(tok.bos_id), "pad_token": None,
                "model_max_length": state.max_context, "vocab_size": state.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ready()
        check_model(body.model)
        if body.messages is not None:
            ids = _chat_ids(state, body.messages)
        else:
            ids = _encode_with_specials(_tokenizer(state), _utf8(body.prompt, "prompt"), bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        ready()
        check_model(body.model)
        _check_ids(state, body.tokens, "tokens")
        return {"prompt": _tokenizer(state).decode(body.tokens)}

    @app.post("/routing")
    async def routing(body: RoutingRequest):
        """Each token's experts per layer (first choice first), from a routing trace of one
        forward pass over the tokens: the chat page colours tokens by it."""
        scheduler = ready()
        _check_ids(state, body.tokens, "tokens")
        if len(body.tokens) > state.max_context:
            raise APIError(400, f"{len(body.tokens)} tokens exceed the context of {state.max_context}", param="tokens")
        future = scheduler.call(lambda engine: engine.trace(body.tokens) if hasattr(engine, "trace")
                                else trace_experts(engine.model, body.tokens))
        experts = await asyncio.wrap_future(future)
        return {"layers": state.num_layers, "experts": state.num_experts, "token_experts": experts,
                "palette": [expert_color(e) for e in range(state.num_experts)]}

    # -------------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        scheduler = ready()
        check_model(body.model)
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append((p, _tokenizer(state).encode(_utf8(p, "prompt"), bos=True)))
            else:
                _check_ids(state, p, "prompt")
                prompts.append((None, p))
        echo_only = body.max_tokens == 0
        logprobs = body.logprobs
        if (body.echo or logprobs is not None) and state.tokenizer is None:
            raise APIError(400, "echo and logprobs show text: this model has no tokenizer", param="echo")
        jobs = []
        for k, (_, ids) in enumerate(prompts):
            for i in range(body.n):
                max_tokens = body.max_tokens if body.max_tokens is not None else state.max_context - len(ids)
                params = _params(body, max(max_tokens, 1), i, logprobs=logprobs,
                                 prompt_logprobs=logprobs if body.echo and logprobs is not None else None)
                _check_context(scheduler, ids, params, "prompt")
                jobs.append(Job(k * body.n + i, ids, params, None))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def echoed(job: Job) -> str:
            prompt_text, prompt_ids = prompts[job.index // body.n]
            return prompt_text if prompt_text is not None else _tokenizer(state).decode(prompt_ids)

        def choice(job: Job, text: str, ids: list[int], lps: list[TokenLogprob], prompt_lps, finish) -> dict:
            prompt_ids = prompts[job.index // body.n][1]
            if echo_only:
                text, ids, lps, finish = "", [], [], "length"
            c = {"index": job.index, "text": echoed(job) + text if body.echo else text, "logprobs": None,
                 "finish_reason": finish}
            if logprobs is not None:
                c["logprobs"] = _completion_logprobs(state, prompt_ids, prompt_lps if body.echo else None,
                                                     ids, lps, logprobs)
            if body.return_token_ids or state.tokenizer is None:  # without a tokenizer, ids are the answer
                c["prompt_token_ids"], c["token_ids"] = prompt_ids, ids
            return c

        if body.stream:
            def chunk(job: Job, update: Update, first: bool, before: list[int]) -> dict:
                text = update.text
                if echo_only:
                    text = ""
                c = {"index": job.index, "text": text, "logprobs": None, "finish_reason": update.finish_reason}
                if body.echo and first:
                    c["text"] = echoed(job) + text
                if logprobs is not None:
                    c["logprobs"] = _completion_logprobs(
                        state, job.prompt_ids, update.prompt_logprobs if body.echo and first else None,
                        [] if echo_only else update.token_ids, [] if echo_only else update.logprobs, logprobs,
                        context=None if first else before)
                if body.return_token_ids or state.tokenizer is None:
                    c["token_ids"] = [] if echo_only else update.token_ids
                    if first:
                        c["prompt_token_ids"] = job.prompt_ids
                return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                        "choices": [c]}

            return _stream(scheduler, request, jobs, chunk, body, rid, created, "text_completion", state)

        results = await _run(scheduler, request, jobs)
        choices = [choice(job, *results[job.index]) for job in jobs]
        prompt_tokens = sum(len(ids) for _, ids in prompts)  # each prompt once, whatever n (as OpenAI and vLLM count)
        completion_tokens = 0 if echo_only else sum(len(results[j.index][1]) for j in jobs)
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    # --------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        scheduler = ready()
        check_model(body.model)
        ids = _chat_ids(state, body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.token_limit()
        max_tokens = limit if limit is not None else max(state.max_context - len(ids), 1)
        jobs = []
        for i in range(body.n):
            params = _params(body, max_tokens, i, logprobs=top)
            _check_context(scheduler, ids, params, "messages")
            jobs.append(Job(i, ids, params, None))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        if body.stream:
            def chunk(job: Job, update: Update, first: bool, before: list[int]) -> dict:
                delta = {"role": "assistant", "content": update.text} if first else {"content": update.text}
                c = {"index": job.index, "delta": delta, "logprobs": None, "finish_reason": update.finish_reason}
                if top is not None:
                    c["logprobs"] = {"content": _chat_logprobs(state, before, update.token_ids,
                                                               update.logprobs, top)}
                if body.return_token_ids:
                    c["token_ids"] = update.token_ids
                    if first:
                        c["prompt_token_ids"] = job.prompt_ids
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": state.model_name, "choices": [c]}

            return _stream(scheduler, request, jobs, chunk, body, rid, created, "chat.completion.chunk", state)

        results = await _run(scheduler, request, jobs)
        choices = []
        for job in jobs:
            text, out_ids, lps, _, finish = results[job.index]
            c = {"index": job.index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish}
            if top is not None:
                c["logprobs"] = {"content": _chat_logprobs(state, ids, out_ids, lps, top)}
            if body.return_token_ids:
                c["prompt_token_ids"], c["token_ids"] = ids, out_ids
            choices.append(c)
        completion_tokens = sum(len(results[j.index][1]) for j in jobs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": _usage(len(ids), completion_tokens)}

    return app


# ------------------------------------------------------------------------ helpers


def _version() -> str:

    return __version__


def _route(path: str) -> str:
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/tokenizer_info", "/routing", "/")
    return path if path in known else ("/v1/models/*" if path.startswith("/v1/models/") else "other")


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "smoe",
            "max_model_len": state.max_context}


def _tokenizer(state: ServerState):
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
    return state.tokenizer


def _check_ids(state: ServerState, ids: list[int], param: str) -> None:
    bad = [t for t in ids if t >= state.vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                       param=param)


def _chat_ids(state: ServerState, messages) -> list[int]:
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, which a chat needs: use /v1/completions with token ids",
                       param="messages")
    tok = state.tokenizer
    try:
        return tok.apply_chat_template([{"role": m.role, "content": _utf8(m.text(), "messages")} for m in messages])
    except TokenizerError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _params(body: SamplingFields, max_tokens: int, choice: int, *, logprobs: int | None,
            prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
            min_p=body.min_p, repetition_penalty=body.repetition_penalty,
            seed=None if body.seed is None else body.seed + choice,  # n choices: n different draws, reproducible
            stop=body.stop_list(), stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
    except GenerationError as e:
        raise APIError(400, str(e), param=str(e).split(" ")[0]) from None


def _check_context(scheduler: Scheduler, ids: list[int], params: SamplingParams, param: str) -> None:
    limit = scheduler.engine.max_seq_len
    if len(ids) + params.max_tokens > limit:
        raise APIError(400, f"this server's context is {limit} tokens; the request asks for "
                            f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt + {params.max_tokens} "
                            f"max_tokens): shorten the prompt or lower max_tokens", param=param,
                       code="context_length_exceeded")
    try:
        scheduler.check(len(ids), params)
    except GenerationError as e:
        raise APIError(400, str(e), param=param) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _utf8(text: str, param: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which are not text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate escape?)", param=param) from None
    return text


def _submit(scheduler: Scheduler, jobs: list[Job]) -> Outbox:
    most = scheduler.max_queue + len(scheduler.engine.rows)
    if len(jobs) > most:
        raise APIError(400, f"this request makes {len(jobs)} sequences (prompts x n); this server takes at most "
                            f"{most} at once (--max-batch + --max-queue)", param="n")
    outbox = Outbox(asyncio.get_running_loop())
    for job in jobs:
        job.outbox = outbox
    try:
        scheduler.submit(jobs)
    except QueueFull as e:
        raise APIError(503, str(e), "service_unavailable", code="queue_full") from None
    return outbox


def _raise_failed(update: Update) -> None:
    if update.error is not None:
        raise APIError(503 if "shutting down" in update.error else 500, update.error,
                       "service_unavailable" if "shutting down" in update.error else "internal_error")


async def _run(scheduler: Scheduler, request: Request, jobs: list[Job]) -> dict[int, tuple]:
    """Wait for every job of a non-streaming request; cancel them all if the client goes away.
    -> {index: (text, token_ids, logprobs, prompt_logprobs, finish_reason)}"""
    outbox = _submit(scheduler, jobs)
    acc = {j.index: ["", [], [], None, None] for j in jobs}
    left = len(jobs)
    try:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        while left:
            try:
                job, update = await asyncio.wait_for(outbox.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                update = None
            if loop.time() >= next_check:  # updates may come every few ms: look at the clock, not at gaps
                if await request.is_disconnected():
                    return {}
                next_check = loop.time() + DISCONNECT_POLL_S
            if update is None:
                continue
            _raise_failed(update)
            a = acc[job.index]
            a[0] += update.text
            a[1] += update.token_ids
            a[2] += update.logprobs
            if update.prompt_logprobs is not None:
                a[3] = update.prompt_logprobs
            if update.finish_reason is not None:
                a[4] = update.finish_reason
                left -= 1
    finally:
        for job in jobs:  # no-op for finished jobs; frees the rows of the others at once
            scheduler.cancel(job)
    return {k: tuple(v) for k, v in acc.items()}


def _stream(scheduler, request, jobs, chunk, body, rid, created, obj, state) -> StreamingResponse:
    outbox = _submit(scheduler, jobs)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        first = {j.index: True for j in jobs}
        history = {j.index: list(j.prompt_ids) for j in jobs}  # ids before each job's next update
        completion_tokens, left = 0, len(jobs)
        try:
            while left:
                job, update = await outbox.get()
                if update.error is not None:
                    error = {"message": update.error, "type": "internal_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                completion_tokens += len(update.token_ids)
                if update.text or update.finish_reason or first[job.index] or update.token_ids:
                    data = chunk(job, update, first[job.index], history[job.index])
                    yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
                history[job.index] += update.token_ids
                first[job.index] = False
                left -= update.finish_reason is not None
            if include_usage and not left:
                echo_only = getattr(body, "max_tokens", None) == 0
                n = getattr(body, "n", 1)  # each prompt once, whatever n
                usage = _usage(sum(len(j.prompt_ids) for j in jobs if j.index % n == 0),
                               0 if echo_only else completion_tokens)
                last = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [],
                        "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the cache rows now
            for job in jobs:
                scheduler.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _special_tokens(tok) -> dict[str, int]:
    """The BOS and EOS tokens by their text ('<s>', '</s>')."""
    piece = getattr(tok, "id_to_piece", None)
    out = {}
    for i, default in ((tok.bos_id, "<s>"), (tok.eos_id, "</s>")):
        if i is not None:
            out[piece(i) if piece is not None else default] = i
    return out


def _encode_with_specials(tok, text: str, *, bos: bool) -> list[int]:
    """/tokenize as Hugging Face tokenizers and vLLM do it: the text of a special token ('</s>')
    becomes that token (clients such as lm-eval find the EOS id this way). Prompts sent for
    generation are not read like this: there, '</s>' typed by a user is just text."""
    specials = _special_tokens(tok)
    ids = [tok.bos_id] if bos and tok.bos_id is not None else []
    if not specials:
        return ids + tok.encode(text, bos=False)
    import re

    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += tok.encode(part, bos=False)
    return ids


def _alternatives(tokenizer, before: list[int], top: list[tuple[int, float]]) -> list[tuple[str, float]]:
    """Text of each alternative token as it would read after `before` (the last few ids)."""
    window = before[-4:]
    shown = tokenizer.decode(window)
    return [(tokenizer.decode(window + [t])[len(shown):], lp) for t, lp in top]


def _completion_logprobs(state, prompt_ids, prompt_lps, ids, lps, top, context=None) -> dict:
    """OpenAI's legacy logprobs object. With echo (prompt_lps given) the prompt's tokens come
    first, the very first with null (nothing predicts it)."""
    tok = _tokenizer(state)
    echo = prompt_lps is not None
    all_ids = (list(prompt_ids) if echo else []) + list(ids)
    entries: list[TokenLogprob | None] = ([None, *prompt_lps] if echo else []) + list(lps)
    before = [] if echo else list(prompt_ids if context is None else context)
    pieces = token_pieces(tok, all_ids, before)
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    history = before + all_ids
    start = len(before)
    top_lps = []
    for i, e in enumerate(entries):
        if e is None:
            top_lps.append(None)
        else:
            top_lps.append(dict(_alternatives(tok, history[: start + i], e.top)) if top else {})
    return {"tokens": pieces, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top_lps, "text_offset": offsets}


def _chat_logprobs(state, prompt_ids, ids, lps, top) -> list[dict]:
    tok = _tokenizer(state)
    pieces = token_pieces(tok, ids, list(prompt_ids))
    history = list(prompt_ids) + list(ids)
    out = []
    for i, (piece, e) in enumerate(zip(pieces, lps, strict=False)):
        alts = _alternatives(tok, history[: len(prompt_ids) + i], e.top) if top else []
        out.append({"token": piece, "logprob": e.logprob, "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts]})
    return out


def trace_experts(model, ids: list[int]) -> list[list[int]]:
    """token -> [first-choice expert per layer]."""
    import torch

    with torch.inference_mode(), trace_routing(model) as trace:
        model(torch.tensor([ids], device=model.device))
    experts, _, _ = trace.tokens()  # [n, L, K], first choice first
    return experts[:, :, 0].tolist()
