"""The pieces of Quiver on Ray that need no cluster: the address rule, the routing key, the
CLI's flags and the ASGI bridge a replica runs its app through."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request  # module level: the test app's annotations name them
from fastapi.responses import StreamingResponse


def test_address_comes_from_the_flag_then_ray_address_then_none(monkeypatch):
    from quiver.cluster import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("  ") is None
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert resolve_address(None) == "head:6379"
    assert resolve_address("other:1234") == "other:1234"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert resolve_address(None) is None


def test_routing_key_follows_model_and_routing_only():
    from quiver.cluster.serve import routing_key

    def key(body, method="POST"):
        return routing_key(method, json.dumps(body).encode())

    a = key({"model": "quiver", "prompt": "x", "routing": {"adapters": {"sql": 0.7, "dates": 0.3}}})
    assert a == key({"routing": {"adapters": {"dates": 0.3, "sql": 0.7}}, "prompt": "other", "max_tokens": 9,
                     "model": "quiver"})
    assert a != key({"model": "quiver", "prompt": "x", "routing": {"adapters": {"sql": 0.6, "dates": 0.4}}})
    assert key({"model": "adapter:sql"}) != key({"model": "adapter:math"}) != ""
    assert key({"model": "quiver"}, method="GET") == ""
    assert routing_key("POST", b"{not json") == routing_key("POST", b"[1]") == key({"model": 3}) == ""


def test_ray_flags_need_ray(tmp_path, tiny_spec):
    from typer.testing import CliRunner

    from quiver.cli import app
    from quiver.library import Library

    Library.open(tmp_path / "lib", base_model=tiny_spec).close()
    runner = CliRunner()
    for args in (["serve", "--replicas", "2"], ["serve", "--ray-address", "h:1"], ["library", "embed", "--ray-address", "h:1"]):
        result = runner.invoke(app, [*args, "-L", str(tmp_path / "lib")])
        assert isinstance(result.exception, ValueError) and "--ray" in str(result.exception), args
    result = runner.invoke(app, ["serve", "--ray", "--replicas", "0", "-L", str(tmp_path / "lib")])
    assert result.exit_code == 2 and "greater than or equal to 1" in result.output  # --replicas >= 1


def test_asgi_bridge_streams_the_apps_response():
    from quiver.cluster.serve import asgi_stream

    app, seen = FastAPI(), {}

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.json()

        async def chunks():
            for i in range(body["n"]):
                yield f"{i};"
                await asyncio.sleep(0)
            seen["disconnected"] = await request.is_disconnected()

        return StreamingResponse(chunks(), status_code=201, headers={"x-a": "b"})

    async def run(n: int):
        return [item async for item in asgi_stream(app, "POST", "/echo", "", [("content-type", "application/json")],
                                                   json.dumps({"n": n}).encode())]

    out = asyncio.run(run(3))
    assert out[0][:2] == ("start", 201) and ("x-a", "b") in out[0][2]
    assert b"".join(out[1:]) == b"0;1;2;"
    assert seen["disconnected"] is False
