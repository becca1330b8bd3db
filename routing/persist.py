"""Router artefacts: a router saved in a library (safetensors of its learned tensors + a JSON
config), versioned, and tied to the adapters it routes over.

``save_router(lib, "my-moe", router)`` stores ``config = {"type": <registry name>, "args": ...,
"adapter_hashes": {name: content hash}}``; ``load_router(lib, "my-moe")`` rebuilds it and refuses when an adapter it routes over is gone or has
changed content since (a router trained over other weights would route wrongly).
"""

from __future__ import annotations

from quiver.library import AdapterNotFoundError, ValidationError

from .base import Router

KIND = "router"


def save_router(library, name: str, router: Router) -> int:
    """Store ``router`` as router artefact ``name``; returns its version (1, 2, ...)."""
    from . import ROUTERS

    kind = next((k for k, cls in ROUTERS.items() if type(router) is cls), None)
    if kind is None:
        raise ValueError(f"{type(router).__name__} is not a registered router type; "
                         f"register it in quiver.routing.ROUTERS to save it")
    if router.adapters is None:
        raise ValueError("bind the router (or give it adapters) before saving it")
    names = library.require(router.adapters)
    config = {"type": kind, "args": router.config(),
              "adapter_hashes": {n: library.info(n).blob for n in names}}
    return library.put_artifact(KIND, name, router.state_tensors(), config, names)


def load_router(library, name: str) -> Router:
    """Rebuild router artefact ``name`` from ``library``."""
    from . import ROUTERS

    tensors, config, adapters = library.get_artifact(KIND, name)
    kind = config.get("type")
    if kind not in ROUTERS:
        raise ValidationError(f"router {name!r} has unknown type {kind!r}; known: {sorted(ROUTERS)}")
    for n, digest in config.get("adapter_hashes", {}).items():
        try:
            current = library.info(n).blob
        except AdapterNotFoundError:
            raise ValidationError(f"router {name!r} routes over adapter {n!r}, which is no longer in "
                                  f"the library") from None
        if current != digest:
            raise ValidationError(f"router {name!r} was trained over another version of adapter {n!r} "
                                  f"({digest[:12]}, now {current[:12]}); retrain or re-save it")
    return ROUTERS[kind].from_state(config.get("args", {}), tensors, adapters)
