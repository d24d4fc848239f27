"""`smoe serve`: an OpenAI-compatible HTTP server (docs/SERVING.md).

    app.py        the HTTP shell: routes, request checks, errors, API key, SSE streaming
    protocol.py   the request bodies (pydantic)
    scheduler.py  the thread that owns the engine: continuous batching, chunked prefill, cancellation
    metrics.py    Prometheus metrics
    static/       the chat page at /

The server starts listening at once (GET /health answers 503 while the model loads) and
loads the model in a background thread.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from smoe import parallel
from smoe.errors import SmoeError
from smoe.generate import Engine
from smoe.offload import format_bytes
from smoe.server.app import ServerState, create_app
from smoe.server.lockstep import LockstepEngine, follow
from smoe.server.scheduler import Scheduler

DEFAULT_MAX_CONTEXT = 4096
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class ServeSettings:
    """How to serve (`smoe serve`'s flags, typed by cli/serve.py; the defaults are its defaults)."""

    model: str | None = None  # what the model was loaded from: the served name defaults to its last part
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    served_model_name: str | None = None
    max_batch: int = 8
    max_context: int | None = None
    max_queue: int = 64
    prefill_chunk: int = 256
    max_body: int = 4 << 20
    allowed_origins: str | None = None
    log_level: str = "info"
    compile: bool = False


def serve(args: ServeSettings, load_model: Callable[[], tuple]) -> int:
    """Listen at once (GET /health answers 503 while loading), then `load_model()` -> (model,
    tokenizer) in a background thread and serve it until stopped."""
    _check_flags(args)
    if parallel.launched() and int(os.environ.get("RANK", "0")) != 0:
        return _follow(args, load_model)  # the other ranks step the engine with rank 0; rank 0 serves HTTP

    # the event loop and the scheduler thread share the GIL; Python hands it over every 5 ms by
    # default, so a busy event loop could stall a decode step that long: hand it over sooner
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    api_key = args.api_key or os.environ.get("SMOE_API_KEY") or None
    sock = _bind(args.host, args.port)
    name = args.served_model_name or _model_name(args.model)
    state = ServerState(model_name=name, api_key=api_key, max_body=args.max_body)
    origins = [o.strip() for o in args.allowed_origins.split(",")] if args.allowed_origins else None
    app = create_app(state, allowed_origins=origins)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            _load_into(state, args, load_model)
            host, port = sock.getsockname()[:2]
            key = "API key required" if api_key else "no API key (anyone who can reach the port can use it)"
            print(f"smoe serve: {name} ready on http://{host}:{port} (chat page at /, {key})", file=sys.stderr)
        except BaseException as e:  # reported by the main thread, which exits with status 2
            failure.append(e)
            state.load_error = f"the model failed to load: {e}"
            server.should_exit = True

    threading.Thread(target=load, name="smoe-load", daemon=True).start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; with Python's default handler that
    # would end the process before the scheduler stops (and, under torchrun, tells the other ranks)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
    if failure:
        raise failure[0]
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(0)


def _check_flags(args) -> None:
    checks = [("--port", 0 <= args.port <= 65535, "a port number 0..65535"),
              ("--max-batch", args.max_batch >= 1, "at least 1"),
              ("--max-queue", args.max_queue >= 0, "0 or more"),
              ("--max-context", args.max_context is None or args.max_context >= 2, "at least 2"),
              ("--max-body", args.max_body >= 1024, "at least 1024 bytes"),
              ("--prefill-chunk", args.prefill_chunk >= 1, "at least 1")]
    for flag, ok, what in checks:
        if not ok:
            raise SmoeError(f"{flag} must be {what}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SmoeError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                        f"pick another port or stop what is using it") from None
    return sock


def _model_name(model: str | None) -> str:
    return "smoe-demo" if model is None else Path(model).resolve().name


def _load_into(state, args: ServeSettings, load: Callable[[], tuple]) -> None:
    model, tokenizer = load()
    attach(state, model, tokenizer, max_batch=args.max_batch, max_context=args.max_context,
           prefill_chunk=args.prefill_chunk, max_queue=args.max_queue, compile=args.compile,
           lockstep=parallel.launched())


def _follow(args: ServeSettings, load: Callable[[], tuple]) -> int:
    """A rank > 0 under torchrun: its share of the model, an engine shaped like rank 0's, and
    rank 0's calls replayed on it until the server stops."""
    model, tokenizer = load()
    follow(serving_engine(model, tokenizer, args.max_batch, args.max_context, args.prefill_chunk))
    return 0


def serving_engine(model, tokenizer, max_batch: int, max_context: int | None, prefill_chunk: int,
                   compile: bool = False):
    """The engine a server steps: max_batch rows of the model's context (at most max_context,
    DEFAULT_MAX_CONTEXT when not given). Every rank under torchrun makes the same one."""
    context = model.config.max_position_embeddings
    return Engine(model, tokenizer, max_batch_size=max_batch, prefill_chunk=prefill_chunk, compile=compile,
                  max_seq_len=min(max_context or DEFAULT_MAX_CONTEXT, context))


def attach(state, model, tokenizer, *, max_batch: int = 8, max_context: int | None = None, prefill_chunk: int = 256,
           max_queue: int = 64, compile: bool = False, lockstep: bool = False):
    """Give a ServerState its engine and a running scheduler: from then on the routes answer.
    -> the Scheduler (stop() it when done)."""
    engine = serving_engine(model, tokenizer, max_batch, max_context, prefill_chunk, compile)
    print(f"smoe serve: {max_batch} sequences x {engine.max_seq_len} tokens of KV cache "
          f"({format_bytes(engine.cache.nbytes)}), queue of {max_queue}", file=sys.stderr)
    state.tokenizer = tokenizer
    state.vocab_size = model.config.vocab_size
    state.max_context = engine.max_seq_len
    state.num_layers = model.config.num_hidden_layers
    state.num_experts = model.config.num_local_experts
    if lockstep:  # under torchrun: every rank runs what this engine runs (server/lockstep.py)
        engine = LockstepEngine(engine)
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=state.metrics)
    scheduler.start()
    state.scheduler = scheduler  # last: from here on the routes answer
    return scheduler
