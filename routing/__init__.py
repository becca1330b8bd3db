"""Routers: given a module's input tokens, which adapters and with what weight (see base.py)."""

from .arrow import Arrow
from .base import AdapterSource, LearnedRouter, LinearGate, Router, RoutingDecision, RoutingSite
from .mhr import MHR, Poly
from .moe import MoEGate
from .persist import load_router, save_router
from .retrieval import Retrieval
from .simple import Fixed, Single, Uniform
from .vote import ArrowVote

# The registry used by configs and the CLI (`router=arrow`): name -> class.
ROUTERS: dict[str, type[Router]] = {"arrow": Arrow, "uniform": Uniform, "fixed": Fixed, "single": Single,
                                    "moe": MoEGate, "retrieval": Retrieval, "mhr": MHR, "poly": Poly,
                                    "arrow-vote": ArrowVote}


def make_router(name: str, **kwargs) -> Router:
    """Build a router by registry name; the error lists the valid names."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; valid: {', '.join(sorted(ROUTERS))}") from None
    return cls(**kwargs)


__all__ = ["ROUTERS", "AdapterSource", "Arrow", "ArrowVote", "Fixed", "LearnedRouter", "LinearGate", "MHR",
           "MoEGate", "Poly", "Retrieval", "Router", "RoutingDecision", "RoutingSite", "Single", "Uniform",
           "load_router", "make_router", "save_router"]
