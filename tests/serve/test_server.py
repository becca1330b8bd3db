"""`quiver serve` end to end: a real server process on 127.0.0.1 driven by the openai client."""

from __future__ import annotations

from http.client import HTTPConnection
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_helpers import KEY, Server, http

PROMPTS = ["write a query that selects", "translate this into french", "what is two plus"]
# (model id, routing extension or None, the router the reference runs alone: a factory or "bare")
ROUTINGS = [
    ("quiver", None, lambda lib: _arrow(2, 1.0)),
    ("base", None, "bare"),
    ("adapter:sql", None, lambda lib: _single("sql")),
    ("quiver", {"adapters": {"sql": 0.7, "dates": 0.3}}, lambda lib: _fixed({"sql": 0.7, "dates": 0.3})),
    ("quiver", {"router": "arrow", "top_k": 1, "temperature": 0.5}, lambda lib: _arrow(1, 0.5)),
    ("router:arrow-k1", None, lambda lib: _saved(lib, "arrow-k1")),
    ("quiver", {"router": "retrieval", "top_k": 2}, lambda lib: _retrieval(2)),
    ("quiver", {"router": "arrow-vote", "top_k": 2}, lambda lib: _vote(2)),
]


def _saved(lib, name):
    from quiver.routing import load_router

    return load_router(lib, name)


def _arrow(k, t):
    from quiver.routing import Arrow

    return Arrow(top_k=k, temperature=t)


def _single(n):
    from quiver.routing import Single

    return Single(n)


def _fixed(w):
    from quiver.routing import Fixed

    return Fixed(w)


def _retrieval(k):
    from quiver.routing import Retrieval

    return Retrieval(top_k=k)


def _vote(k):
    from quiver.routing import ArrowVote

    return ArrowVote(top_k=k)


def _complete(client, model, routing, prompt, max_tokens=12, stream=False, ignore_eos=False, **kw):
    extra = ({"routing": routing} if routing else {}) | ({"ignore_eos": True} if ignore_eos else {})
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  stream=stream, extra_body=extra, **kw)
    if stream:
        return "".join(c.choices[0].text for c in r if c.choices)
    return r


def test_models_health_metrics_and_auth(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["quiver", "base", "adapter:dates", "adapter:french", "adapter:math", "adapter:sql",
                   "router:arrow-k1"]
    assert [m.id for m in server.client("second-key").models.list().data] == ids
    for key, message in ((None, "Missing API key"), ("wrong-key", "Incorrect API key")):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path, body in (("/v1/models", None), ("/v1/completions", {"model": "quiver", "prompt": "hi"})):
            status, hdrs, out = http(server.url + path, body, headers)
            assert status == 401, (path, out)
            assert out["error"]["code"] == "invalid_api_key" and message in out["error"]["message"]
            assert hdrs.get("www-authenticate", hdrs.get("WWW-Authenticate")) == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    status, _, out = http(server.url + "/health")
    assert status == 200 and out["status"] == "ok" and out["adapters"] == 4
    status, _, text = http(server.url + "/metrics")
    assert status == 200 and 'quiver_requests_total{endpoint="/v1/models",status="401"}' in text
    assert KEY not in text and KEY not in server.log.read_text()


def test_greedy_equals_generate_alone_with_mixed_routings_in_flight(server, reference):
    """Every (prompt, routing) pair at once: they share batches; each equals its run alone."""
    client = server.client()
    jobs = [(p, m, r, ref) for p in PROMPTS for m, r, ref in ROUTINGS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _complete(client, j[1], j[2], j[0]), jobs))
        streamed = list(pool.map(lambda j: _complete(client, j[1], j[2], j[0], stream=True), jobs))
    for (prompt, model, routing, ref), got, text in zip(jobs, answers, streamed):
        want = reference(prompt, bare=True) if ref == "bare" else reference(prompt, ref(reference.lib))
        assert got.choices[0].text == want, (model, routing, prompt)
        assert text == want, ("stream", model, routing, prompt)
        # 12 tokens unless the model ended the text (a routing's mixture may reach EOS first)
        finish = got.choices[0].finish_reason
        n_out = got.usage.completion_tokens
        assert (finish, n_out) == ("length", 12) or (finish == "stop" and n_out < 12)
        assert got.usage.prompt_tokens == len(reference.tok(prompt).input_ids)
    by_model = {(j[1], json.dumps(j[2])): a for j, a in zip(jobs, answers)}
    assert by_model[("adapter:sql", "null")].routing == {"adapters": {"sql": 1.0}}
    assert by_model[("base", "null")].routing == {"adapters": {}}
    fixed = by_model[("quiver", json.dumps({"adapters": {"sql": 0.7, "dates": 0.3}}))].routing["adapters"]
    assert fixed == pytest.approx({"sql": 0.7, "dates": 0.3})
    arrow = by_model[("quiver", "null")].routing["adapters"]
    assert set(arrow) <= {"sql", "french", "math", "dates"} and sum(arrow.values()) == pytest.approx(1.0)
    vote = by_model[("quiver", json.dumps({"router": "arrow-vote", "top_k": 2}))].routing["adapters"]
    assert 1 <= len(vote) <= 2 and sum(vote.values()) == pytest.approx(1.0)  # one mixture for the request
    assert len(set(answers[i].choices[0].text for i in range(len(ROUTINGS)))) > 3  # routings differ
    status, _, text = http(server.url + "/metrics")
    steps = re.search(r"quiver_batch_size_count (\S+)", text).group(1)
    single = re.search(r'quiver_batch_size_bucket\{le="1.0"\} (\S+)', text).group(1)
    assert float(steps) > float(single), "no decoding step held more than one request"


def test_chat_stop_seed_and_stream_usage(server, reference):
    client = server.client()
    msg = [{"role": "user", "content": "what is two plus two"}]
    r = client.chat.completions.create(model="adapter:math", messages=msg, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == reference(msg[0]["content"], _single("math"), 10, chat=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="adapter:math", messages=msg, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # a stop sequence cuts the text before it (streamed and not)
    full = _complete(client, "adapter:sql", None, PROMPTS[0], 20).choices[0].text
    stop = full[3:5]
    cut = full[: full.index(stop)]
    got = _complete(client, "adapter:sql", None, PROMPTS[0], 20, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert _complete(client, "adapter:sql", None, PROMPTS[0], 20, stream=True, stop=[stop]) == cut
    # seeded sampling is reproducible, whether streamed or not; top_p cuts the tail
    def sample(seed, stream=False, top_p=1.0):
        r = client.completions.create(model="quiver", prompt=PROMPTS[1], max_tokens=16, temperature=1.5,
                                      top_p=top_p, seed=seed, stream=stream)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    assert sample(1) == sample(1) == sample(1, stream=True)
    assert len({sample(s) for s in range(4)}) > 1
    tiny_p = {sample(s, top_p=1e-6) for s in range(3)}  # the nucleus is the argmax token alone
    assert tiny_p == {_complete(client, "quiver", None, PROMPTS[1], 16).choices[0].text}


@pytest.mark.parametrize("body, status, code, words", [
    ({"model": "nope"}, 404, "model_not_found", ["'nope'"]),
    ({"model": "adapter:nope"}, 404, "model_not_found", ["'adapter:nope'"]),
    ({"model": "router:nope"}, 404, "model_not_found", ["'router:nope'"]),
    ({"routing": {"adapters": {"sql": 0.5, "nope": 0.5}}}, 400, "unknown_adapter", ["nope"]),
    ({"routing": {"router": "magic"}}, 400, "unknown_router", ["'magic'", "arrow"]),
    ({"routing": {"router": "saved", "name": "ghost"}}, 400, "unknown_router", ["'ghost'"]),
    ({"routing": {"router": "arrow", "top_k": 0}}, 400, "invalid_parameter", ["routing.top_k"]),
    ({"routing": {"router": "arrow", "temperature": -1}}, 400, "invalid_parameter", ["routing.temperature"]),
    ({"routing": {"router": "arrow", "bogus": 1}}, 400, "invalid_parameter", ["routing.bogus"]),
    ({"max_tokens": 0}, 400, "invalid_parameter", ["max_tokens"]),
    ({"temperature": -0.5}, 400, "invalid_parameter", ["temperature"]),
    ({"top_p": 0}, 400, "invalid_parameter", ["top_p"]),
    ({"n": 2}, 400, "invalid_parameter", ["n"]),
    ({"prompt": "a" * 5000}, 400, "context_length_exceeded", ["4096"]),
    ({"max_tokens": 4095}, 400, "context_length_exceeded", ["4096"]),
])
def test_errors(server, body, status, code, words):
    req = {"model": "quiver", "prompt": "write a query", "max_tokens": 4, **body}
    got, _, out = http(server.url + "/v1/completions", req, {"Authorization": f"Bearer {KEY}"})
    assert got == status, out
    err = out["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == code
    assert all(w in err["message"] for w in words), err["message"]
    assert "/" not in err["message"] or code == "context_length_exceeded" or "GET /v1/models" in err["message"]


def test_openai_client_raises_the_right_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="adapter:nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="quiver", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def _open_stream(url: str, body: dict) -> HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return conn


def _metric(server, name: str) -> float:
    text = http(server.url + "/metrics")[2]
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = _metric(server, "quiver_cancelled_requests_total")
    conn = _open_stream(server.url, {"model": "quiver", "prompt": PROMPTS[0], "max_tokens": 4000,
                                     "ignore_eos": True, "temperature": 0})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away after the first chunk
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_metric(server, "quiver_cancelled_requests_total") <= before
                                           or http(server.url + "/health")[2]["running"]):
        time.sleep(0.1)
    assert _metric(server, "quiver_cancelled_requests_total") == before + 1
    assert http(server.url + "/health")[2]["running"] == 0
    # the server serves on afterwards
    assert _complete(server.client(), "quiver", None, PROMPTS[0], 4).usage.completion_tokens == 4


def test_load_mixed_routings(server):
    """A few dozen concurrent requests with mixed routings: all answered, the server healthy."""
    client = server.client(timeout=300)  # a loaded 2-core machine may take long; no timing asserted
    jobs = [(ROUTINGS[i % len(ROUTINGS)], PROMPTS[i % len(PROMPTS)], 4 + i % 9, i % 3 == 0) for i in range(36)]

    def run(job):
        (model, routing, _), prompt, n, stream = job
        if stream:
            return _complete(client, model, routing, prompt, n, stream=True, ignore_eos=True)
        r = _complete(client, model, routing, prompt, n, ignore_eos=True)
        assert r.usage.completion_tokens == n
        return r.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:  # each call bounded by the client's timeout
        texts = list(pool.map(run, jobs))
    assert len(texts) == 36 and all(isinstance(t, str) for t in texts)
    status, _, h = http(server.url + "/health")
    assert status == 200 and h["running"] == 0 and h["waiting"] == 0


def test_burst_beyond_the_queue_gets_429_then_recovers(serve_library, serve_model_dir, tmp_path):
    s = Server(serve_library, serve_model_dir, "serve.max_batch_size=1", "serve.max_queue=2", keys=[KEY],
               tmp=tmp_path)
    try:
        client = s.client()
        body = {"model": "quiver", "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True, "temperature": 0}

        def one(_):
            return http(s.url + "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        codes = sorted(r[0] for r in results)
        assert codes.count(429) >= 1 and codes.count(200) >= 3 and set(codes) == {200, 429}, codes
        for status, hdrs, out in results:
            if status == 429:
                assert int(hdrs["retry-after" if "retry-after" in hdrs else "Retry-After"]) >= 1
                assert out["error"]["code"] == "queue_full" and "queue is full" in out["error"]["message"]
            else:
                assert out["usage"]["completion_tokens"] == 300
        with pytest.raises(openai.RateLimitError):  # the client sees it as a rate limit too
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda _: client.completions.create(
                    model="quiver", prompt=PROMPTS[0], max_tokens=300, extra_body={"ignore_eos": True}), range(6)))
        time.sleep(0.5)
        r = _complete(client, "quiver", None, PROMPTS[1], 5)  # recovered
        assert r.usage.completion_tokens == 5
    finally:
        s.stop()


def test_sigterm_drains_running_requests_then_exits(serve_library, serve_model_dir, tmp_path):
    s = Server(serve_library, serve_model_dir, keys=[KEY], tmp=tmp_path)
    n = 800
    results: dict[int, str] = {}

    def stream(i):
        conn = _open_stream(s.url, {"model": ROUTINGS[i][0], "routing": ROUTINGS[i][1], "prompt": PROMPTS[i % 3],
                                    "max_tokens": n, "ignore_eos": True, "temperature": 0,
                                    "stream_options": {"include_usage": True}})
        results[i] = conn.getresponse().read().decode()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and http(s.url + "/health")[2]["running"] < 3:
        time.sleep(0.05)
    assert http(s.url + "/health")[2]["running"] == 3
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:  # a new request while draining: refused (503 on a live connection, or no listener)
        late = http(s.url + "/v1/completions", {"model": "quiver", "prompt": "x"},
                    {"Authorization": f"Bearer {KEY}"}, timeout=5)[0]
    except OSError:
        late = "refused"
    assert late in (503, "refused")
    for t in threads:
        t.join(60)
    code = s.proc.wait(30)
    s.stop()
    assert code in (0, -signal.SIGTERM)
    for i in range(3):
        body = results[i]
        assert body.rstrip().endswith("data: [DONE]"), body[-200:]
        usage = [json.loads(line[6:]) for line in body.splitlines()
                 if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
        assert usage["completion_tokens"] == n
    assert "Finished server process" in s.log.read_text()


def test_hot_add_and_remove_adapters(lib_copy, serve_model_dir, tiny_spec, tmp_path, reference):
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter

    s = Server(lib_copy, serve_model_dir, keys=[KEY], tmp=tmp_path)
    try:
        client = s.client()

        def ids():
            return {m.id for m in client.models.list().data}

        def wait_for(cond):
            deadline = time.monotonic() + 5  # "within a few seconds"
            while time.monotonic() < deadline and not cond():
                time.sleep(0.1)
            return cond()

        lib = Library.open(lib_copy)
        lib.add(random_adapter(tiny_spec, "units", rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=99,
                               std=0.4), description="convert kilometres to metres")
        assert wait_for(lambda: "adapter:units" in ids())
        r = _complete(client, "adapter:units", None, PROMPTS[0], 8)
        assert r.routing == {"adapters": {"units": 1.0}}
        r = _complete(client, "quiver", {"router": "arrow", "top_k": 5}, PROMPTS[0], 8)
        assert set(r.routing["adapters"]) == {"sql", "french", "math", "dates", "units"}

        # remove "math" while a request using it runs: that request finishes with it
        conn = _open_stream(s.url, {"model": "adapter:math", "prompt": PROMPTS[2], "max_tokens": 1500,
                                    "ignore_eos": True, "temperature": 0})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        lib.remove("math")
        assert wait_for(lambda: "adapter:math" not in ids())
        body = resp.read().decode()
        assert body.rstrip().endswith("data: [DONE]")
        assert len([ln for ln in body.splitlines() if ln.startswith("data: {")]) >= 1000
        with pytest.raises(openai.NotFoundError):
            _complete(client, "adapter:math", None, PROMPTS[0], 4)
        with pytest.raises(openai.BadRequestError, match="math"):
            _complete(client, "quiver", {"adapters": {"math": 1.0}}, PROMPTS[0], 4)
        r = _complete(client, "quiver", {"router": "arrow", "top_k": 4}, PROMPTS[2], 8)
        assert set(r.routing["adapters"]) == {"sql", "french", "dates", "units"}
        lib.close()
    finally:
        s.stop()


def test_arrow_vote_as_the_servers_default_router(serve_library, serve_model_dir, tmp_path, reference):
    """`router=arrow-vote`: model `quiver` runs the scoring pass per request and answers as the
    voted adapter does run alone; the response names the one adapter it used."""
    s = Server(serve_library, serve_model_dir, "router=arrow-vote", tmp=tmp_path)
    try:
        client = s.client(key=None)
        for prompt in PROMPTS:
            r = _complete(client, "quiver", None, prompt)
            assert r.choices[0].text == reference(prompt, _vote(1)), prompt
            assert len(r.routing["adapters"]) == 1 and list(r.routing["adapters"].values()) == [pytest.approx(1.0)]
    finally:
        s.stop()


def test_draining_engine_refuses_with_503(serve_library, serve_model_dir):
    """In process: once draining, submit() answers 503 in OpenAI's shape."""
    from quiver.config import compose
    from quiver.library import Library
    from quiver.serve import Request, Sampling, build_engine
    from quiver.serve.errors import ApiError
    from quiver.serve.routing import RouteSpec

    lib = Library.open(serve_library)
    engine, _ = build_engine(compose([f"model.name={serve_model_dir}"]), lib)
    engine.draining = True
    with pytest.raises(ApiError) as e:
        engine.submit(Request(RouteSpec("default"), [1, 2], "x", Sampling(max_tokens=2), lambda ev: None))
    assert e.value.status == 503 and e.value.body()["error"]["code"] == "server_shutting_down"
    engine.rm.unwrap()
    lib.close()


def test_adapter_added_while_the_engine_starts_becomes_routable(lib_copy, serve_model_dir, tiny_spec, monkeypatch):
    """Another machine adds an adapter after the engine read the library's names but before its
    first catalog refresh: the catalog lists it, so the engine must rebuild over it rather than
    answer 400 for an adapter it advertises."""
    import queue

    from quiver.config import compose
    from quiver.library import Library
    from quiver.library.synthetic import random_adapter
    from quiver.serve import Request, Sampling, build_engine
    from quiver.serve.engine import Engine
    from quiver.serve.routing import RouteSpec

    warm_up = Engine._warm_up

    def warm_up_while_another_machine_adds(self):
        if "late" not in self.library.names():
            with Library.open(lib_copy) as other:
                other.add(random_adapter(tiny_spec, "late", rank=4, alpha=8, seed=7, std=0.4), description="late")
        warm_up(self)

    monkeypatch.setattr(Engine, "_warm_up", warm_up_while_another_machine_adds)
    lib = Library.open(lib_copy)
    engine, _ = build_engine(compose([f"model.name={serve_model_dir}"]), lib)
    assert "late" not in engine.universe and "late" in engine.catalog.adapters
    events: queue.Queue = queue.Queue()
    engine.start()
    try:
        engine.submit(Request(RouteSpec("single", ("late",)), [1, 2, 3], "x", Sampling(max_tokens=3), events.put))
        while (ev := events.get(timeout=60))[0] == "text":
            pass
        assert ev[0] == "done", ev
        assert "late" in engine.universe and engine.rebuilds == 1
        # the engine's steps can fuse sibling modules: it runs without inference tensors, whose
        # missing version counter would hide q_proj / v_proj reading one unmodified input
        assert engine.rm._engine.siblings, "no sibling modules observed in the engine's steps"
    finally:
        engine.stop(timeout=60)
        engine.rm.unwrap()
        lib.close()
