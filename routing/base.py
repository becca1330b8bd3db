"""The routing contract: a router turns one module's input tokens into a RoutingDecision.

Index legend: T = tokens at this module (flattened batch × sequence), k = slots per token,
E = adapters the router routes over.

A router is bound once to a library and a universe of adapter names (:meth:`Router.bind`),
which returns the **sources** it routes over: what the runtime must hold in its adapter bank
(usually the library's adapters as stored; a router may transform them, as GenKnowSub does).
Then, per adapted module and forward pass, :meth:`Router.route` returns

    indices: int64 [T, k]   positions in the list of sources, -1 = no adapter in that slot
    weights: float [T, k]   rows sum to 1 (or to the budget the router documents)

Per-example routers return the same row for every token of a request. Routers whose decision
does not depend on the module or on x set ``per_module = False``: the runtime then asks once
per forward pass and reuses the decision (and the kernel metadata) in every module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingDecision:
    indices: Tensor  # int64 [T, k], -1 = empty slot
    weights: Tensor  # [T, k]

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape or self.indices.dim() != 2:
            raise ValueError(f"RoutingDecision wants indices and weights of one [T, k] shape; got "
                             f"{tuple(self.indices.shape)} and {tuple(self.weights.shape)}")

    @classmethod
    def constant(cls, T: int, indices: list[int], weights: list[float], device=None,
                 dtype=torch.float32) -> RoutingDecision:
        """The same row for all T tokens."""
        idx = torch.tensor(indices, dtype=torch.int64, device=device).expand(T, -1)
        w = torch.tensor(weights, dtype=dtype, device=device).expand(T, -1)
        return cls(idx, w)


@dataclass(frozen=True)
class AdapterSource:
    """One adapter a router routes over: a bank key and how to load its factors."""

    key: str
    load: Callable[[], object]  # -> quiver.library.LoraAdapter


@dataclass
class RoutingSite:
    """What a router sees at one adapted module in one forward pass."""

    module: str  # full module path in the base model, e.g. model.layers.3.self_attn.q_proj
    rows: Tensor  # int64 [Bt']: the batch rows (requests) whose tokens x holds, in order
    tokens_per_row: int  # x holds rows.numel() * tokens_per_row tokens, row-major

    @property
    def request_ids(self) -> Tensor:
        """int64 [T]: the batch row (request) of each token."""
        return self.rows.repeat_interleave(self.tokens_per_row)


class Router:
    """Base class: subclasses implement :meth:`route` and, if needed, :meth:`bind`.

    ``adapters=None`` means "the universe the runtime gives me" (the RoutedModel's adapters).
    """

    per_module: bool = True

    def __init__(self, adapters: list[str] | None = None):
        self.adapters = list(adapters) if adapters is not None else None
        self.sources: list[AdapterSource] = []

    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        """Choose the adapters from ``universe`` (default: all of it); returns the sources."""
        names = library.require(self.adapters if self.adapters is not None else universe)
        if not names:
            raise ValueError(f"{type(self).__name__}: no adapters to route over")
        self.adapters = names
        self.sources = [AdapterSource(n, _loader(library, n)) for n in names]
        return self.sources

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        raise NotImplementedError


def _loader(library, name: str):
    return lambda: library.get(name)
