"""A `smoe serve` process on loopback for the tests (test_server.py, test_lmeval.py, ...)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "test-key-123"
MODEL = "smoe-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, key: str | None = KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "smoe", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        if key:
            args += ["--api-key", key]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"smoe-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.key = key
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, **kw)

    def post(self, path: str, body=None, key: str | None = "default", **kw) -> httpx.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def get(self, path: str, key: str | None = "default") -> httpx.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        return httpx.get(self.url + path, headers=headers, timeout=60)

    def metric(self, name: str) -> float:
        text = self.get("/metrics").text
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
