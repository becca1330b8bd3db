"""Per-request routing: model ids and the ``routing`` body object -> a RouteSpec -> a Router.

Model ids (``GET /v1/models``):

    quiver           the server's default router (conf ``router``: Arrow top-2 over the whole
                     library unless configured)
    base             no adapter: the bare base model's output
    adapter:<name>   one adapter with weight 1 (``Single``)
    router:<name>    a router saved in the library (``quiver.routing.load_router``)

An unknown model id (also ``adapter:<x>`` or ``router:<x>`` naming nothing) is 404. The
``routing`` body object overrides the model id's routing (the id is still checked); an unknown
adapter or router named there is 400. Names are only ever looked up in the library's catalog,
never turned into paths.

Requests served by named adapters with given weights (``adapter:<name>``, ``routing.adapters``)
share one router, :class:`RowWeights`, which holds one row of weights per batch row: however
many different adapters the batch uses, they form one routing group of the step (the same
decision ``Single``/``Fixed`` would give each row; no router object per request).

ArrowVote (``{"router": "arrow-vote", "top_k": 1}``, or a default router that is one) is
resolved the same way: when the request is admitted, the engine runs its scoring pass over the
prompt's tokens (one prefill with per-token Arrow, routing/vote.py) and the request is then
served by fixed weights over the voted adapters (``ArrowVote.mixture``).

Retrieval is resolved once per request, when it is admitted: the prompt (for chat, the last
user message) is embedded and searched as ``Retrieval`` does, and the request is then served by
fixed weights ``w_j = softmax_j(cos_j / T)`` over its top-k adapters, which is exactly
Retrieval's decision for that request (Retrieval keeps one prepared row per *batch row*, which
does not survive rows joining and leaving a running batch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from quiver.routing import Arrow, ArrowVote, Retrieval, Router, RoutingDecision, RoutingSite, Uniform, load_router

from .errors import ApiError, bad_request
from .schemas import Routing

ROUTER_KINDS = ("arrow", "arrow-vote", "retrieval", "saved", "uniform")  # valid values of routing.router


@dataclass(frozen=True)
class RouteSpec:
    """What routes one request; hashable, so equal specs share one bound router."""

    kind: str  # default | base | single | fixed | arrow | arrow-vote | retrieval | saved | uniform
    args: tuple = ()

    def adapters(self) -> list[str]:
        """Adapters the spec names explicitly (checked against the library at the boundary)."""
        if self.kind == "single":
            return [self.args[0]]
        if self.kind == "fixed":
            return [n for n, _ in self.args]
        return []


@dataclass(frozen=True)
class Catalog:
    """The library as the HTTP side sees it: refreshed by the engine every few seconds."""

    adapters: frozenset[str]
    routers: frozenset[str]  # saved router artefacts


def parse_model(model: str, catalog: Catalog) -> RouteSpec:
    if model == "quiver":
        return RouteSpec("default")
    if model == "base":
        return RouteSpec("base")
    kind, sep, name = model.partition(":")
    if sep and kind == "adapter" and name in catalog.adapters:
        return RouteSpec("single", (name,))
    if sep and kind == "router" and name in catalog.routers:
        return RouteSpec("saved", (name,))
    raise ApiError(404, f"The model {model!r} does not exist; see GET /v1/models (ids: quiver, base, "
                   f"adapter:<name>, router:<name>)", "model_not_found", param="model")


def parse_routing(r: Routing, catalog: Catalog) -> RouteSpec:
    if r.adapters is not None:
        extra = [k for k in ("router", "top_k", "temperature", "name") if getattr(r, k) is not None]
        if extra:
            raise bad_request(f"routing: 'adapters' (fixed weights) cannot be combined with {extra}",
                              param="routing")
        missing = sorted(set(r.adapters) - catalog.adapters)
        if missing:
            raise bad_request(f"routing.adapters: unknown adapter(s) {missing}", "unknown_adapter",
                              param="routing.adapters")
        return RouteSpec("fixed", tuple(sorted(r.adapters.items())))
    if r.router is None:
        raise bad_request("routing: give 'router' (one of " + ", ".join(ROUTER_KINDS) + ") or 'adapters'",
                          param="routing")
    if r.router not in ROUTER_KINDS:
        raise bad_request(f"routing.router: unknown router {r.router!r}; valid: {', '.join(ROUTER_KINDS)}",
                          "unknown_router", param="routing.router")
    if r.temperature is not None and r.temperature <= 0:
        raise bad_request(f"routing.temperature must be > 0, got {r.temperature}", param="routing.temperature")
    if r.router == "saved":
        if not r.name:
            raise bad_request("routing: router 'saved' needs 'name'", param="routing.name")
        if r.name not in catalog.routers:
            raise bad_request(f"routing.name: unknown router {r.name!r}", "unknown_router", param="routing.name")
        return RouteSpec("saved", (r.name,))
    if r.name is not None:
        raise bad_request(f"routing.name is only for router 'saved', not {r.router!r}", param="routing.name")
    if r.router == "uniform":
        return RouteSpec("uniform")
    if r.router == "arrow":
        return RouteSpec("arrow", (r.top_k or 2, r.temperature or 1.0))
    if r.router == "arrow-vote":
        return RouteSpec("arrow-vote", (r.top_k or 1, r.temperature or 1.0))
    return RouteSpec("retrieval", (r.top_k or 2, r.temperature or 0.1))


class NoAdapter(Router):
    """Routes to no adapter (empty slots): the model id ``base`` inside a mixed batch."""

    per_token = False

    def bind(self, library, universe):
        self.adapters, self.sources = [], []
        return []

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        T = x.shape[0]
        return RoutingDecision(torch.full((T, 1), -1, dtype=torch.int64, device=x.device),
                               torch.zeros(T, 1, dtype=x.dtype, device=x.device))


class RowWeights(Router):
    """Fixed weights per batch row, for every request served by named adapters with given
    weights (``adapter:<name>``, ``routing.adapters``, resolved retrieval): one router for all of
    them, so such requests share one routing group of the step whatever their adapters.

    Bound over the whole universe; before each forward :meth:`set_rows` gives row i's weights
    ``{name: w}`` (None for rows served by other routers). Every token of row i then gets

        indices[t] = position of row i's adapters,  weights[t] = their weights (as given, as Fixed)

    padded with empty slots (-1, weight 0) to the widest row.
    """

    per_token = False

    def __init__(self):
        super().__init__(None)
        self._rows: tuple[Tensor, Tensor] | None = None  # int64 [B, k], float [B, k]
        self._on_device: dict = {}

    def set_rows(self, rows: list[dict[str, float] | None]) -> None:
        position = {n: i for i, n in enumerate(self.adapters)}
        k = max((len(r) for r in rows if r), default=1)
        idx = torch.full((len(rows), k), -1, dtype=torch.int64)
        w = torch.zeros(len(rows), k, dtype=torch.float64)
        for i, r in enumerate(rows):
            for j, (name, weight) in enumerate((r or {}).items()):
                idx[i, j], w[i, j] = position[name], weight
        self._rows, self._on_device = (idx, w), {}

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        key = (x.device, x.dtype)
        if key not in self._on_device:
            self._on_device[key] = (self._rows[0].to(x.device), self._rows[1].to(x.device, x.dtype))
        idx, w = self._on_device[key]
        req = site.request_ids.to(x.device)  # [T]
        return RoutingDecision(idx[req], w[req])


class RouterCache:
    """RouteSpec -> what serves it: fixed weights ``{name: w}`` (served by the one
    :class:`RowWeights` router) or a Router instance, built once and reused while the
    RoutedModel lives (the runtime binds each router object once and keeps it)."""

    def __init__(self, library, default_factory, max_entries: int = 256):
        self.library, self.default_factory, self.max_entries = library, default_factory, max_entries
        self._items: OrderedDict[tuple, Router] = OrderedDict()
        self.built = 0  # routers created since the cache was (re)started

    def clear(self) -> None:
        self._items.clear()
        self.built = 0

    def _get(self, key: tuple, make) -> Router:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        router = make()
        self._items[key] = router
        self.built += 1
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return router

    def resolve(self, spec: RouteSpec, prompt_text: str, bind, vote=None) -> Router | dict[str, float]:
        """The router serving ``spec``, or its fixed weights; ``bind`` binds to the live model;
        ``vote(router)`` runs a ``prompt_pass`` router's scoring pass over this request's prompt
        and returns the mixture it chose (``{name: w}``)."""
        k, a = spec.kind, spec.args
        if k == "single":
            return {a[0]: 1.0}
        if k == "fixed":
            return dict(a)
        if k == "retrieval":
            top_k, temp = a
            r = self._get(("retrieval", top_k, temp), lambda: Retrieval(top_k=top_k, temperature=temp))
            bind(r)
            r.prepare(prompts=[prompt_text])
            hits = r.hits[0]
            if not hits:
                raise bad_request("routing: retrieval found no adapter for this prompt", "unknown_adapter",
                                  param="routing")
            w = torch.softmax(torch.tensor([s for _, s in hits]) / temp, dim=0).tolist()
            return dict(zip((n for n, _ in hits), w))
        makers = {
            "default": self.default_factory,
            "base": NoAdapter,
            "arrow": lambda: Arrow(top_k=a[0], temperature=a[1]),
            "arrow-vote": lambda: ArrowVote(top_k=a[0], temperature=a[1]),
            "uniform": Uniform,
            "saved": lambda: load_router(self.library, a[0]),
        }
        router = self._get((k, a), makers[k])
        bind(router)
        if getattr(router, "prompt_pass", False):
            if vote is None:
                raise bad_request(f"routing: router {k!r} needs the prompt's scoring pass", param="routing")
            mixture = vote(router)
            if not mixture:
                raise bad_request("routing: the vote chose no adapter for this prompt", "unknown_adapter",
                                  param="routing")
            return mixture
        return router
