"""``quiver serve --ray``: the OpenAI-compatible server as a Ray Serve application.

Two deployments:

``QuiverReplica`` (``N`` replicas, or autoscaled between ``serve.ray.min_replicas`` and
``max_replicas``): each one opens the library itself (a local path on one machine, the team
library's PostgreSQL URL across machines), loads the base model and runs Quiver's own engine
and FastAPI app (:func:`quiver.serve.create_app`: continuous batching, per-request routing, API
keys, validation). Requests reach the app in-process as ASGI calls, so every status code, error
body and stream is the single-machine server's. Each replica re-reads the library every
``serve.refresh_s``, so an adapter added on any machine becomes routable on every replica.

``Ingress`` (one replica, the HTTP entry behind Ray Serve's proxy): forwards each request to a
replica with a *routing key* as Ray Serve's multiplexed model id. The key is a hash of what
decides the request's routing: its ``model`` and its ``routing`` object (canonical JSON).
Ray Serve sends a request whose key a replica has already served to that replica (while it
has room), so requests naming the same adapters or router go where those adapters already sit
in the engine's bank (``serve.capacity``) and the bound router is cached; each replica is
preferred for at most ``serve.ray.max_routings_per_replica`` keys (least recently used drop
out, which only drops the preference: the engine keeps serving every routing).

Failures: a request whose replica dies before it answered is sent once more (to another
replica when there is one); if that fails too, it gets 503 ``replica_unavailable`` (OpenAI's
client retries 503s). A stream cut by its replica's death ends with an error event. Ray Serve
starts a new replica in place of a dead one.

Nothing a user sends is unpickled: the ingress forwards the raw request bytes, headers and
path; the replicas receive the composed config as a plain dict, the library location and the
API key file's path (keys are read on each node, never shipped through Ray).
"""

# No `from __future__ import annotations`: the deployments are pickled by value, and FastAPI
# must see the ingress's annotations as objects, not as names to look up in a module.
import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from fastapi import FastAPI, Request  # module level: the ingress's annotations name them
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .connect import absolute_location

log = logging.getLogger("quiver.cluster")

REPLICA_HEADER = "x-quiver-replica"  # which replica answered: "HOST:PID"
RETRIED_HEADER = "x-quiver-retried"  # "1": the first replica died before answering; this is the retry
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def routing_key(method: str, body: bytes) -> str:
    """The multiplexed model id of a request: a hash of its ``model`` and ``routing``, or ""
    (no preference) for requests without a JSON body naming a model."""
    if method != "POST" or not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return ""
    canon = json.dumps({"model": data["model"], "routing": data.get("routing")}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


async def asgi_stream(app, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes):
    """Run one HTTP request through an ASGI ``app`` in this process; yields
    ``("start", status, headers)`` then the body's chunks (bytes) as the app sends them.
    Closing the generator early tells the app its client disconnected."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: out.put_nowait(None))
    try:
        while True:
            message = await out.get()
            if message is None:
                task.result()  # the app's own exception, if it raised one
                return
            if message["type"] == "http.response.start":
                yield ("start", message["status"],
                       [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()


def open_library(cfg, location: str):
    """The library at ``location`` with ``cfg.library``'s blob store, embedding and index configs
    (the same as the CLI's ``--library``)."""
    from hydra.utils import instantiate

    from quiver.library import Library

    return Library.open(location, blobs=cfg.library.get("blobs"), embed_config=instantiate(cfg.library.embed),
                        index_config=instantiate(cfg.library.index))


def build_app(cfg, location: str, *, api_key_file: str | None = None, replicas: int | None = None):
    """The Ray Serve application (not yet running) for composed config ``cfg`` over the library
    at ``location``. ``replicas``: a fixed count; None: autoscale within ``serve.ray``'s bounds."""
    from omegaconf import OmegaConf
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError

    rc = cfg.serve.ray
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    if rc.min_replicas < 0 or rc.max_replicas < max(1, rc.min_replicas):
        raise ValueError(f"serve.ray.min_replicas={rc.min_replicas} and max_replicas={rc.max_replicas} "
                         "do not bound a replica count (need 0 <= min <= max, max >= 1)")
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["model"]["name"] = absolute_location(str(cfg.model.name))
    if cfg.model.get("cache_dir"):
        plain["model"]["cache_dir"] = absolute_location(str(cfg.model.cache_dir))
    location = absolute_location(location)
    key_file = str(Path(api_key_file).resolve()) if api_key_file is not None else None
    if key_file is not None:
        from quiver.serve.auth import load_keys

        load_keys(key_file)  # a clear error here rather than in every replica

    scaling = ({"num_replicas": replicas} if replicas is not None else
               {"autoscaling_config": {"min_replicas": int(rc.min_replicas), "max_replicas": int(rc.max_replicas),
                                       "target_ongoing_requests": float(rc.target_ongoing_requests)}})

    @serve.deployment(name="QuiverReplica", max_ongoing_requests=int(rc.max_ongoing_requests),
                      ray_actor_options={"num_cpus": float(rc.replica_cpus)}, graceful_shutdown_timeout_s=30,
                      **scaling)
    class QuiverReplica:
        def __init__(self, config: dict, location: str, key_file: str | None):
            import torch

            from quiver.serve import build_engine, create_app
            from quiver.serve.auth import load_keys

            torch.set_num_threads(max(1, int(config["serve"]["ray"]["replica_cpus"])))
            c = OmegaConf.create(config)
            self.library = open_library(c, location)
            self.engine, _ = build_engine(c, self.library)
            self.app = create_app(self.engine, api_keys=load_keys(key_file),
                                  default_max_tokens=c.serve.default_max_tokens, trace_routing=c.serve.trace_routing)
            self.engine.start()
            self.name = f"{socket.gethostname()}:{os.getpid()}"

        @serve.multiplexed(max_num_models_per_replica=int(rc.max_routings_per_replica))
        async def routing(self, key: str) -> str:
            """The "model" a replica loads for a routing key: nothing to load (every replica
            serves every routing); holding the key makes Ray Serve prefer this replica for it."""
            return key

        async def handle(self, method: str, path: str, query: str, headers: list, body: bytes):
            key = serve.get_multiplexed_model_id()
            if key:
                await self.routing(key)
            async for item in asgi_stream(self.app, method, path, query, headers, body):
                if isinstance(item, tuple):
                    item = (item[0], item[1], item[2] + [(REPLICA_HEADER, self.name)])
                yield item

        def __del__(self):  # Ray Serve's graceful shutdown: finish what is queued and running
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.draining = True
                engine.stop()

    ingress_app = FastAPI(title="quiver serve (Ray)")

    def _unavailable(what: str) -> JSONResponse:
        return JSONResponse({"error": {"message": f"{what}; retry the request", "type": "server_error",
                                       "param": None, "code": "replica_unavailable"}}, status_code=503)

    @serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=100_000,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(ingress_app)
    class Ingress:
        def __init__(self, replicas):
            self.replicas = replicas

        async def _open(self, method, path, query, headers, body, key):
            """The replica's response stream, its first item and whether it took a retry (one,
            when the first replica died before it answered)."""
            for attempt in (0, 1):
                stream = self.replicas.options(multiplexed_model_id=key, stream=True).handle.remote(
                    method, path, query, headers, body)
                try:
                    return stream, await stream.__anext__(), attempt > 0
                except (RayActorError, ActorUnavailableError) as e:
                    log.warning("replica failed before answering (attempt %d): %s", attempt + 1, type(e).__name__)
            return None, None, True

        @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(self, request: Request, path: str):
            body = await request.body()
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
            key = routing_key(request.method, body)
            stream, first, retried = await self._open(request.method, request.url.path, request.url.query, headers,
                                                      body, key)
            if stream is None:
                return _unavailable("The replica serving this request failed")
            _, status, out_headers = first
            out_headers = {k: v for k, v in out_headers if k.lower() not in _HOP_HEADERS}
            if retried:
                out_headers[RETRIED_HEADER] = "1"
            if not out_headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    chunks = [c async for c in stream]
                except (RayActorError, ActorUnavailableError):
                    return _unavailable("The replica serving this request failed while answering")
                return Response(b"".join(chunks), status_code=status, headers=out_headers)

            async def relay():
                try:
                    async for chunk in stream:
                        yield chunk
                except (RayActorError, ActorUnavailableError):
                    err = {"error": {"message": "The replica serving this stream failed", "type": "server_error",
                                     "param": None, "code": "replica_unavailable"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
                finally:
                    stream.cancel()  # the client left or the stream ended: free the replica's slot

            return StreamingResponse(relay(), status_code=status, headers=out_headers)

    return Ingress.bind(QuiverReplica.bind(plain, location, key_file))


def run(cfg, location: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_file=None,
        replicas: int | None = None, address: str | None = None) -> None:
    """Deploy the application on the cluster (joined or started, see :mod:`.connect`), listen on
    ``host:port`` (Ray Serve's proxy, on the head node only) and block until SIGTERM or Ctrl-C,
    then delete the application (its replicas drain their requests first), and stop Serve when
    no other application is left. While Serve already runs on the cluster (another
    application), its proxy keeps the host and port it was started with (Ray Serve's rule)."""
    from ray import serve

    from .connect import connect

    app = build_app(cfg, location, api_key_file=str(api_key_file) if api_key_file else None, replicas=replicas)
    connect(address)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    name = str(cfg.serve.ray.app_name)
    serve.run(app, name=name, route_prefix="/", blocking=False)
    log.info("serving on http://%s:%d (Ray Serve application %r, %s)", host, port, name,
             f"{replicas} replica(s)" if replicas else
             f"{cfg.serve.ray.min_replicas}-{cfg.serve.ray.max_replicas} replicas, autoscaled")
    print(f"quiver serve --ray: ready on http://{host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(name)
    if not serve.status().applications:  # the last application: stop Serve (its proxy) too, so
        serve.shutdown()  # that the next `quiver serve --ray` starts it on its own host and port
