"""Routers that need no input: one adapter, fixed weights, uniform weights.

They return the same row for every token and every module (``per_token = False``), so the
runtime asks them once per forward pass.
"""

from __future__ import annotations

from torch import Tensor

from .base import Router, RoutingDecision, RoutingSite


class Fixed(Router):
    """Given weights over named adapters: y += Σ_e w_e ΔW_e x (weights used as given)."""

    per_token = False

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise ValueError("Fixed: weights must name at least one adapter")
        super().__init__(list(weights))
        self.weights = [float(w) for w in weights.values()]

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:
        n = len(self.weights)
        return RoutingDecision.constant(x.shape[0], list(range(n)), self.weights, x.device, x.dtype)


class Single(Fixed):
    """One named adapter with weight 1: plain LoRA inference."""

    def __init__(self, adapter: str):
        super().__init__({adapter: 1.0})


class Uniform(Router):
    """Weight 1/E on each of E adapters (default: all the runtime's adapters)."""

    per_token = False

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:
        n = len(self.sources)
        return RoutingDecision.constant(x.shape[0], list(range(n)), [1.0 / n] * n, x.device, x.dtype)
