"""smoe serve: the OpenAI-compatible HTTP server (smoe/server, docs/SERVING.md)."""

from __future__ import annotations

import dataclasses

from smoe.cli.common import load, model_args
from smoe.server import ServeSettings, serve


def register(sub) -> None:
    s = sub.add_parser(
        "serve", help="serve the model over HTTP (OpenAI API)",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                    "/tokenize, /detokenize, /health, /metrics) with continuous batching, and a chat page at /.",
        epilog="Example: smoe serve --port 8080 --api-key secret   then   "
               "curl -H 'Authorization: Bearer secret' localhost:8080/v1/models",
    )
    model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (or set SMOE_API_KEY)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model directory's name)")
    s.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="sequences decoded together (KV cache rows; default 8)")
    s.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens per sequence, prompt + completion (default: the model's context, at most 4096)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a free row before the server answers 503 (default 64)")
    s.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens fed per step, between decode steps of the running streams (default 256)")
    s.add_argument("--max-body", type=int, default=4 << 20, metavar="BYTES",
                   help="largest request body accepted (default 4 MiB; larger gets 413)")
    s.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="comma-separated origins allowed to call the API from a browser (CORS; default none)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    s.set_defaults(run=cmd_serve)


def cmd_serve(args) -> int:
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    return serve(settings, lambda: load(args))
