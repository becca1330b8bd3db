"""The FastAPI application: OpenAI's completions and chat endpoints over the engine.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (API key
checked when keys are configured), ``GET /health``, ``GET /metrics`` (open). Responses have
OpenAI's shapes; non-streaming ones add ``routing: {"adapters": {name: share}}``, the fraction
of the request's routing weight (over its prompt and generated tokens and every adapted module)
each adapter carried. ``stream: true`` answers server-sent events, one ``data: {chunk}`` per
text delta, a last chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``.

Decisions where OpenAI's API is silent or does not apply: completions use ``max_tokens`` 16
by default (OpenAI's), chat completions ``min(serve.default_max_tokens, context - prompt)``;
a request whose prompt plus ``max_tokens`` exceeds the model's context is refused (400) rather
than cut; chat prompts are rendered with the tokenizer's chat template (400 if it has none);
retrieval embeds the completion prompt, or the last user message of a chat.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import KeyCheck
from .engine import Engine, Request as EngineRequest, Sampling
from .errors import ApiError, bad_request
from .routing import parse_model, parse_routing
from .schemas import ChatRequest, CompletionRequest

_POLL_S = 0.25  # how often a waiting non-streaming handler checks that its client is still there


def create_app(engine: Engine, *, api_keys: list[str] | None = None, default_max_tokens: int = 256,
               trace_routing: bool = True) -> FastAPI:
    tok = engine.tok
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not engine.alive:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="quiver serve", lifespan=lifespan)
    app.state.engine = engine
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(KeyCheck(api_keys or []))])

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        engine.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid value")
        if "input" in err and err.get("type") != "missing" and not isinstance(err["input"], dict):
            msg += f" (got {json.dumps(err['input'], default=str)[:80]})"
        engine.metrics.requests.labels(request.url.path, "400").inc()
        return bad_request(f"{loc}: {msg}", param=loc).response()

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "down", "running": len(engine.running),
                "waiting": len(engine.waiting), "adapters": len(engine.catalog.adapters),
                "draining": engine.draining}
        return JSONResponse(body, status_code=200 if engine.alive and not engine.draining else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models():
        cat = engine.catalog
        ids = ["quiver", "base"] + [f"adapter:{n}" for n in sorted(cat.adapters)] + \
              [f"router:{n}" for n in sorted(cat.routers)]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "quiver"}
                                           for i in ids]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = tok(body.prompt, add_special_tokens=True)["input_ids"]
        return await _complete(request, body, ids, body.prompt, body.max_tokens, chat=False)

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if not getattr(tok, "chat_template", None):
            raise bad_request("This model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise bad_request(f"messages: {e}", param="messages") from None
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        limit = body.limit or max(1, min(default_max_tokens, engine.context - len(ids)))
        return await _complete(request, body, ids, users[-1] if users else rendered, limit, chat=True)

    async def _complete(request: Request, body, ids: list[int], route_text: str, max_tokens: int, chat: bool):
        endpoint = request.url.path
        if engine.draining:
            raise ApiError(503, "The server is shutting down; retry on another instance", "server_shutting_down")
        spec = parse_model(body.model, engine.catalog)
        if body.routing is not None:
            spec = parse_routing(body.routing, engine.catalog)
        engine.check_prompt(len(ids), max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):  # called from the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (process exiting)
                pass

        sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stops=body.stops, ignore_eos=body.ignore_eos)
        req = EngineRequest(spec, ids, route_text, sampling, emit, trace=trace_routing)
        engine.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": rid, "created": int(time.time()), "model": body.model}
        try:
            first = await _next(events, request)
        except BaseException:
            req.cancel()
            engine.wake()
            raise
        if first is None:  # the client left while queued
            req.cancel()
            engine.wake()
            return Response(status_code=499)
        if first[0] == "error":
            engine.metrics.requests.labels(endpoint, str(first[1].status)).inc()
            return first[1].response()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(first, events, req, meta, chat, include_usage, endpoint),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ev = [], first
        while True:
            if ev[0] == "text":
                text.append(ev[1])
            elif ev[0] == "done":
                break
            else:
                engine.metrics.requests.labels(endpoint, str(ev[1].status)).inc()
                return ev[1].response()
            ev = await _next(events, request)
            if ev is None:
                req.cancel()
                engine.wake()
                return Response(status_code=499)
        done = ev[1]
        engine.metrics.requests.labels(endpoint, "200").inc()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "logprobs": None, "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": done["usage"], "routing": done["routing"]}

    async def _next(events: asyncio.Queue, request: Request):
        """The next engine event, or None when the client disconnected meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), _POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return None

    async def _stream(first, events: asyncio.Queue, req: EngineRequest, meta: dict, chat: bool,
                      include_usage: bool, endpoint: str):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        finished = False
        try:
            if chat:
                yield chunk("", None, role=True)
            ev = first
            while True:
                if ev[0] == "text":
                    yield chunk(ev[1], None)
                elif ev[0] == "done":
                    done = ev[1]
                    yield chunk(None if chat else "", done["finish_reason"])
                    if include_usage:
                        yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': done['usage']})}\n\n"
                    yield "data: [DONE]\n\n"
                    finished = True
                    engine.metrics.requests.labels(endpoint, "200").inc()
                    return
                else:  # an error after the stream started: OpenAI's error object as an event
                    yield f"data: {json.dumps(ev[1].body())}\n\n"
                    finished = True
                    engine.metrics.requests.labels(endpoint, str(ev[1].status)).inc()
                    return
                ev = await events.get()
        finally:
            if not finished:  # the client went away: free the slot
                req.cancel()
                engine.wake()
                engine.metrics.requests.labels(endpoint, "499").inc()

    app.include_router(v1)
    return app
