"""Routers: given a module's input tokens, which adapters and with what weight (see base.py)."""

from .arrow import Arrow
from .base import AdapterSource, Router, RoutingDecision, RoutingSite
from .simple import Fixed, Single, Uniform

# The registry used by configs and the CLI (`router=arrow`): name -> class.
ROUTERS: dict[str, type[Router]] = {"arrow": Arrow, "uniform": Uniform, "fixed": Fixed, "single": Single}


def make_router(name: str, **kwargs) -> Router:
    """Build a router by registry name; the error lists the valid names."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; valid: {', '.join(sorted(ROUTERS))}") from None
    return cls(**kwargs)


__all__ = ["ROUTERS", "AdapterSource", "Arrow", "Fixed", "Router", "RoutingDecision", "RoutingSite",
           "Single", "Uniform", "make_router"]
