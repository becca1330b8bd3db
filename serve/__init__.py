"""`quiver serve`: an OpenAI-compatible HTTP server over the routed runtime with continuous
batching (engine.py), per-request routing (routing.py), API keys (auth.py), Prometheus
metrics (metrics.py) and request validation (schemas.py); app.py is the FastAPI app and
server.py runs it under uvicorn."""

from .app import create_app
from .engine import Engine, Request, Sampling
from .server import build_engine, run

__all__ = ["Engine", "Request", "Sampling", "build_engine", "create_app", "run"]
