"""`quiver serve --ray`: a Ray Serve application with two replicas of Quiver's engine on the
two-node test cluster, over the team library, driven by the official openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from quiver.serve.health import wait_healthy
from serve_helpers import ADAPTERS, KEY, free_port, http, save_model_dir

MODELS = ["quiver", "base"] + [f"adapter:{n}" for n in ADAPTERS]


class RayServer:
    """`quiver serve --ray --replicas 2` as a subprocess (the driver); ``url`` its base URL."""

    def __init__(self, address: str, library: str, model_dir, tmp, keyfile):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "quiver.cli", "serve", "--ray", "--replicas", "2", "--ray-address", address,
                "-L", library, "--port", str(self.port), "--api-key-file", str(keyfile),
                f"model.name={model_dir}", "serve.refresh_s=0.3", f"serve.ray.app_name=t{self.port}"]
        self.log = tmp / "ray-serve.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={k: v for k, v in os.environ.items() if k != "QUIVER_API_KEYS"})
        try:
            wait_healthy(self.url, self.proc, timeout=240, log=self.log, what="quiver serve --ray", poll=0.5)
        except RuntimeError:
            self.stop()
            raise

    def client(self, api_key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def _fill(lib, spec):
    """The server tests' four adapters (serve_helpers.build_library's) and saved router."""
    from quiver.library.synthetic import random_adapter
    from quiver.routing import Arrow, save_router

    for i, name in enumerate(ADAPTERS):
        lib.add(random_adapter(spec, name, rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj"), seed=10 + i,
                               std=0.4), description=ADAPTERS[name])
    router = Arrow(top_k=1)
    router.bind(lib, lib.names())
    save_router(lib, "arrow-k1", router)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("ray-tiny"), tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def served(ray_cluster, team_target, tmp_path_factory, tiny_spec, model_dir):
    """(server, team target): two replicas over a fresh team library."""
    target = team_target(tmp_path_factory.mktemp("ray-team"))
    with target.open("driver", base_model=tiny_spec) as lib:
        _fill(lib, tiny_spec)
    tmp = tmp_path_factory.mktemp("ray-serve")
    keyfile = tmp / "keys.txt"
    keyfile.write_text(KEY + "\n")
    server = RayServer(ray_cluster, target.url, model_dir, tmp, keyfile)
    yield server, target
    assert server.stop() == 0, server.log.read_text()[-2000:]


def _reference(target, model_dir, router, prompt: str, max_tokens: int) -> str:
    """The greedy completion computed in this process, the request alone (RoutedModel.generate)."""
    from quiver.library import load_base_model
    from quiver.runtime import RoutedModel

    model, tok = load_base_model(model_dir)
    with target.open("reference") as lib:
        rm = RoutedModel(model, lib, router=router)
        enc = tok(prompt, return_tensors="pt")
        router.prepare(prompts=[prompt])
        out = rm.generate(**enc, routers=[router], max_new_tokens=max_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _replica(raw) -> str:
    return raw.headers["x-quiver-replica"]


def test_openai_api_through_two_replicas_with_routing_affinity(served, model_dir):
    import openai

    from quiver.routing import Arrow, Single

    server, target = served
    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == ["quiver", "base", "adapter:dates", "adapter:french", "adapter:math", "adapter:sql",
                   "router:arrow-k1"]
    prompt = "write a query that selects"
    for model, router in (("adapter:sql", Single("sql")), ("quiver", Arrow(top_k=2))):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == _reference(target, model_dir, router, prompt, 10), model
        assert r.usage.completion_tokens <= 10 and set(r.routing["adapters"]) <= set(ADAPTERS)
    # every request naming the same routing goes to the replica that already served it
    where: dict[str, set] = {}
    for _ in range(3):
        for model in MODELS:
            raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=4,
                                                              temperature=0)
            assert raw.http_response.status_code == 200
            where.setdefault(model, set()).add(_replica(raw))
    assert all(len(r) == 1 for r in where.values()), where
    assert len(set().union(*where.values())) <= 2
    streamed = client.completions.create(model="adapter:math", prompt=prompt, max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    plain = client.completions.create(model="adapter:math", prompt=prompt, max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    chat = client.chat.completions.create(model="adapter:dates", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    # the single-machine server's errors, status codes and bodies
    with pytest.raises(openai.NotFoundError, match="adapter:nope"):
        client.completions.create(model="adapter:nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="quiver", prompt="hi", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()


def test_adapter_added_on_another_machine_becomes_routable_on_every_replica(served, tiny_spec):
    from quiver.library.synthetic import random_adapter

    server, target = served
    with target.open("laptop") as lib:  # another machine: its own blob cache
        lib.add(random_adapter(tiny_spec, "newbie", rank=4, alpha=8, seed=99, std=0.4), description="a new one")
    listed_by: set[str] = set()
    deadline = time.monotonic() + 60
    while len(listed_by) < 2 and time.monotonic() < deadline:  # /v1/models goes to either replica
        status, headers, body = http(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200
        if "adapter:newbie" in [m["id"] for m in body["data"]]:
            listed_by.add(headers["x-quiver-replica"])
        time.sleep(0.1)
    assert len(listed_by) == 2, f"adapter:newbie listed by {listed_by} only"
    r = server.client().completions.create(model="adapter:newbie", prompt="hi", max_tokens=4, temperature=0)
    assert r.routing["adapters"] == {"newbie": pytest.approx(1.0)}


def test_replica_killed_mid_load_fails_or_retries_its_requests_and_recovers(served):
    """Runs last: it kills a replica while it decodes. Streams it held end with an error event;
    plain requests it held are retried on the other replica (``x-quiver-retried: 1``) or get
    503; requests held by the other replica are answered in full; Ray Serve starts a
    replacement and every routing is served again."""
    import openai

    server, _ = served
    client = server.client()
    n_tokens, names = 400, list(ADAPTERS)
    lock = threading.Lock()
    streams, plain = {}, {}

    def body(i: int) -> dict:  # a routing key of its own each
        return {"ignore_eos": True, "routing": {"adapters": {names[i % len(names)]: 0.5 + i / 100}}}

    def stream(i: int):
        try:
            raw = client.completions.with_raw_response.create(model="quiver", prompt="write a query", stream=True,
                                                              max_tokens=n_tokens, temperature=0, extra_body=body(i))
            with lock:
                streams[i] = [_replica(raw), None]
            tokens = sum(1 for c in raw.parse() if c.choices and c.choices[0].text)
            streams[i][1] = tokens
        except openai.APIError as e:
            with lock:
                streams.setdefault(i, [None, None])[1] = e

    def request(i: int):
        try:
            raw = client.completions.with_raw_response.create(model="quiver", prompt="write a query",
                                                              max_tokens=n_tokens, temperature=0, extra_body=body(i))
            plain[i] = (_replica(raw), raw.headers.get("x-quiver-retried"), raw.parse().usage.completion_tokens)
        except openai.APIStatusError as e:
            plain[i] = (e.status_code, e.body)

    threads = []

    def launch(target, i: int) -> None:
        threads.append(threading.Thread(target=target, args=(i,)))
        threads[-1].start()

    def started(n: int) -> list:  # wait until streams 0..n-1 have their headers: they decode
        deadline = time.monotonic() + 60
        while len(streams) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return [r for r, _ in streams.values() if r is not None]

    for i in range(8):
        launch(stream, i)
    for i in range(40, 44):  # plain requests, keys of their own
        launch(request, i)
    n_streams = 8
    holders = started(n_streams)
    while len(set(holders)) < 2 and n_streams < 16:  # the load must reach both replicas: more streams
        launch(stream, n_streams)
        n_streams += 1
        holders = started(n_streams)
    assert len(set(holders)) == 2, f"the streams did not reach both replicas: {holders}"
    victim = max(set(holders), key=holders.count)
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert len(streams) == n_streams and len(plain) == 4, (streams, plain)
    assert all(v[1] is not None for v in streams.values()), streams
    for replica, outcome in streams.values():
        if replica == victim:  # cut: the client sees the error event, not a short success
            assert isinstance(outcome, openai.APIError) and "replica" in str(outcome), outcome
        else:
            assert outcome == n_tokens, (replica, outcome)
    for outcome in plain.values():
        if isinstance(outcome[0], str):  # answered in full by a live replica (a retry or not)
            assert outcome[0] != victim and outcome[2] == n_tokens, outcome
        else:
            assert outcome[0] == 503 and outcome[1]["code"] == "replica_unavailable", outcome
    # recovery: a new replica in place of the dead one, and every routing served again
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen - {victim}) < 2 and time.monotonic() < deadline:
        status, headers, _ = http(server.url + "/health")
        if status == 200:
            seen.add(headers["x-quiver-replica"])
        time.sleep(0.2)
    assert len(seen - {victim}) == 2, f"replicas answering after the kill: {seen}"
    for model in MODELS:
        r = client.completions.create(model=model, prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
