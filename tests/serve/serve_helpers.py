"""Helpers for the server tests: a `quiver serve` subprocess, plain HTTP calls, a library."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from quiver.serve.health import wait_healthy

KEY = "test-key-0123456789"
ADAPTERS = {  # name -> description (retrieval searches these)
    "sql": "write a query that selects all users from the database",
    "french": "translate this sentence into french please",
    "math": "what is two plus two? arithmetic with numbers",
    "dates": "convert the date to iso format",
}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_model_dir(path: Path, tiny_model, tiny_tokenizer) -> Path:
    """The tiny Llama and tokenizer saved as a Hugging Face directory for a server: the same
    weights (and fingerprint), the chat template, and a longer context, so that a request can
    run long enough to be interrupted."""
    import copy

    model = copy.deepcopy(tiny_model)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(path)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def build_library(path: Path, spec, names=tuple(ADAPTERS)):
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter
    from quiver.routing import Arrow, save_router

    lib = Library.open(path, base_model=spec)
    for i, name in enumerate(names):
        # large factors so that each adapter visibly changes the tiny model's greedy output
        lib.add(random_adapter(spec, name, rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj"), seed=10 + i,
                               std=0.4), description=ADAPTERS[name])
    router = Arrow(top_k=1)
    router.bind(lib, lib.names())
    save_router(lib, "arrow-k1", router)
    return lib


def http(url: str, body: dict | None = None, headers: dict | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, dict, object]:
    """(status, headers, parsed JSON or text) of one request (stdlib only; errors included)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `quiver serve` subprocess; ``url`` is its base URL."""

    def __init__(self, library: Path, model_dir: Path, *overrides: str, keys: list[str] | None = None,
                 tmp: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "quiver.cli", "serve", "-L", str(library), "--port", str(self.port),
                f"model.name={model_dir}", "serve.refresh_s=0.3", *overrides]
        if keys:
            keyfile = (tmp or library.parent) / f"keys-{self.port}.txt"
            keyfile.write_text("# test keys\n" + "\n".join(keys) + "\n")
            args[4:4] = ["--api-key-file", str(keyfile)]
        env = {k: v for k, v in os.environ.items() if k != "QUIVER_API_KEYS"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1")
        self.log = (tmp or library.parent) / f"server-{self.port}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(self.url, self.proc, timeout=120, log=self.log, what="the server", poll=0.2)
        except RuntimeError:
            self.stop()
            raise

    def client(self, key: str | None = KEY, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, **{"timeout": 60, **kw})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
