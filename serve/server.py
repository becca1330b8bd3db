"""``quiver serve``: load the model and the library, build the engine and the app, run uvicorn.

SIGTERM (or Ctrl-C) drains: new requests get 503 from then on, uvicorn stops listening and
waits for the open requests (streams included) to finish, then the engine stops and the
process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .auth import load_keys
from .engine import Engine

log = logging.getLogger("quiver.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.draining = True  # answered 503 from now on
        super().handle_exit(sig, frame)


def build_engine(cfg, library) -> tuple[Engine, object]:
    """The engine for composed config ``cfg`` (model, router, serve) over an open library."""
    import torch

    from quiver.config import build_router
    from quiver.library import load_base_model

    model, tok = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                                 dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)

    def default_router():
        return build_router(cfg.router, library)

    s = cfg.serve
    engine = Engine(model, tok, library, default_router=default_router, max_batch_tokens=s.max_batch_tokens,
                    max_batch_size=s.max_batch_size, max_queue=s.max_queue, refresh_s=s.refresh_s,
                    capacity=s.capacity, backend=s.backend)
    return engine, tok


def run(cfg, library, *, host: str = "127.0.0.1", port: int = 8000, api_key_file=None) -> None:
    keys = load_keys(api_key_file)
    engine, _ = build_engine(cfg, library)
    app = create_app(engine, api_keys=keys, default_max_tokens=cfg.serve.default_max_tokens,
                     trace_routing=cfg.serve.trace_routing)
    log.info("serving %d adapters on http://%s:%d (API keys: %s)", len(engine.universe), host, port,
             "required" if keys else "off")
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    _DrainingServer(config, engine).run()
