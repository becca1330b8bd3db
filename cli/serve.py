"""`quiver serve`: the OpenAI-compatible server (conf/serve.yaml; the server is :mod:`quiver.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import LibraryOpt, RayAddressOpt, RayOpt, command_config, existing_library


def serve_cmd(
    ctx: typer.Context,
    library: LibraryOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_file: Annotated[Optional[Path], typer.Option(
        help="File of API keys, one per line (also $QUIVER_API_KEYS, comma-separated).")] = None,
    ray: RayOpt = False,
    replicas: Annotated[Optional[int], typer.Option(
        min=1, help="With --ray: this many replicas (default: autoscale within serve.ray's bounds).")] = None,
    ray_address: RayAddressOpt = None,
):
    """OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics)
    with continuous batching and per-request routing.

    quiver serve -L DIR router=arrow router.top_k=2 serve.max_queue=64 model.name=/path/to/hf-dir
    """
    cfg = command_config(ctx, "serve")
    if not ray and (replicas is not None or ray_address is not None):
        raise ValueError("--replicas and --ray-address need --ray")
    lib = existing_library(cfg, library)
    if ray:  # replicas open the library themselves, from its location
        from quiver.cluster.serve import run as run_on_ray

        lib.close()
        return run_on_ray(cfg, library or str(cfg.library.path), host=host, port=port, api_key_file=api_key_file,
                          replicas=replicas, address=ray_address)
    from quiver.serve import run

    run(cfg, lib, host=host, port=port, api_key_file=api_key_file)
