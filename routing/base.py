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

Per-request information (the prompt texts for retrieval, the task names for MHR) reaches a
router through :meth:`Router.prepare` before a forward or ``generate`` call; ``site.rows`` then
says which requests the tokens belong to (row i of the batch = request i).

Learned routers (:class:`LearnedRouter`) are also ``nn.Module``s: their parameters train with
the base model and adapters frozen (gradients reach them through the routing weights), an
auxiliary loss may be collected during a forward pass (:meth:`Router.aux_loss`), and they save
to / load from a library as ``router`` artefacts (:func:`quiver.routing.save_router`,
``Library.get_router``): safetensors of :meth:`state_tensors` plus the JSON :meth:`config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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

    def prepare(self, *, prompts: list[str] | None = None, tasks: list[str | None] | None = None) -> None:
        """Per-request information for the next forward/generate calls (row i = request i).

        Routers that route per token ignore it; per-example routers (retrieval, MHR) need it.
        """

    def aux_loss(self) -> Tensor | None:
        """An auxiliary training loss collected since the last call (and reset), or None."""
        return None

    # -- persistence (learned and configured routers) ------------------------------------------
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (without ``adapters``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved as a router artefact")

    def state_tensors(self) -> dict[str, Tensor]:
        """The router's learned tensors by name (empty for routers that learn nothing)."""
        return {}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], adapters: list[str]) -> Router:
        """Rebuild a saved router; the inverse of :meth:`config` + :meth:`state_tensors`."""
        router = cls(adapters=adapters, **config)
        if tensors:
            router.load_state_tensors(tensors)
        return router

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no learned tensors")


class LearnedRouter(Router, nn.Module):
    """A router with trainable parameters (an ``nn.Module``: ``.parameters()``, ``.train()``).

    Subclasses create their parameters in ``__init__`` when the shapes are known, or in
    :meth:`bind` from the library (module widths, number of adapters). ``state_tensors``
    defaults to the module's ``state_dict``.
    """

    def __init__(self, adapters: list[str] | None = None):
        nn.Module.__init__(self)
        Router.__init__(self, adapters)

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.load_state_dict(tensors, strict=True)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the training loop updates (default: all of them)."""
        return [p for p in self.parameters() if p.requires_grad]


def _loader(library, name: str):
    return lambda: library.get(name)
