"""RoutedModel: a transformers causal LM whose adapted linears route every token through a
weighted mixture of adapters from a library.

Index legend: Bt = batch rows, S = sequence length, T = Bt·S tokens, k = slots per token.

Each target ``nn.Linear`` is replaced by a :class:`MixtureLinear`:

    y = base(x) + mixture_lora(x, bank[module], indices, weights)

with ``(indices, weights)`` from the router serving each token's request. Routing happens
inside the layers, so ``generate`` is transformers' own (KV cache, greedy and sampling, left
padding). A batch may mix routers: ``routers=[r_0, ..., r_{Bt-1}]`` gives each request (row)
its own router (None = the default one); all rows' decisions are assembled into one ``[T, k]``
decision over one bank, so the whole batch is one kernel call per module and mixing mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quiver.kernels import build_meta, mixture_lora
from quiver.kernels.merge_before import mixture_lora_merge_before
from quiver.library import Library, ValidationError, fingerprint
from quiver.routing import Arrow, Router, RoutingDecision, RoutingSite

from .bank import AdapterBank
from .trace import Trace


class MixtureLinear(nn.Module):
    """``y = base(x) + Σ_j w[t,j] · ΔW_{i[t,j]} x[t]``; the decision comes from the runtime."""

    def __init__(self, base: nn.Linear, path: str, runtime: _Runtime):
        super().__init__()
        self.base = base
        self.path = path
        self.__dict__["_runtime"] = runtime  # plain reference: not a submodule

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:  # x: [Bt, S, d_in]
        y = self.base(x)
        step = self._runtime.step
        if step is None:
            return y
        delta = step.delta(x, self.path).view(y.shape)
        return y + delta if torch.is_grad_enabled() else y.add_(delta)


class _Group:
    """Rows of the batch served by one router, and where its adapters sit in the bank."""

    def __init__(self, router: Router, rows: Tensor | None, slots: Tensor, resident: bool):
        self.router, self.rows, self.slots, self.resident = router, rows, slots, resident
        self.merge_before = getattr(router, "mode", "merge-after") == "merge-before"
        # The router's i-th adapter in bank slot i: no index translation needed.
        self.identity = resident and torch.equal(slots.cpu(), torch.arange(slots.numel()))


class _Step:
    """Routing state of one forward call (one prefill or one decoding step)."""

    def __init__(self, runtime: _Runtime, groups: list[_Group], n_rows: int):
        self.runtime, self.groups, self.n_rows = runtime, groups, n_rows
        self.rows = torch.arange(n_rows, device=runtime.bank.device)
        self._static: dict[tuple[int, int], tuple[RoutingDecision, object]] = {}
        single = len(groups) == 1 and groups[0].rows is None and not groups[0].merge_before
        self.fast = groups[0] if single else None  # the common case: one router, merge-after

    def delta(self, x: Tensor, path: str) -> Tensor:
        rt = self.runtime
        flat = x.reshape(-1, x.shape[-1])  # [T, d_in]
        per_row = flat.shape[0] // self.n_rows
        if self.fast is not None:
            decision, meta = self._decide(0, self.fast, flat, RoutingSite(path, self.rows, per_row))
            if rt.trace is not None:
                rt.trace.record(path, x.shape[:-1], decision, rt.bank.keys)
            return mixture_lora(flat, rt.bank.banks[path], decision.indices, decision.weights,
                                meta=meta, backend=rt.backend)
        out = None
        for merge_before in (False, True):
            parts = [(i, g) for i, g in enumerate(self.groups) if g.merge_before == merge_before]
            if not parts:
                continue
            decision, meta = self._assemble(flat, path, parts, per_row)
            if rt.trace is not None:
                rt.trace.record(path, x.shape[:-1], decision, rt.bank.keys)
            bank = rt.bank.banks[path]  # after routing: a capacity-bound bank may have just loaded
            if merge_before:
                d = mixture_lora_merge_before(flat, bank, decision.indices, decision.weights)
            else:
                d = mixture_lora(flat, bank, decision.indices, decision.weights, meta=meta, backend=rt.backend)
            out = d if out is None else out + d
        return out

    def _assemble(self, flat: Tensor, path: str, parts, per_row: int):
        T = flat.shape[0]
        if len(parts) == 1 and parts[0][1].rows is None:  # one router for the whole batch
            i, g = parts[0]
            return self._decide(i, g, flat, RoutingSite(path, self.rows, per_row))
        decisions = []
        for i, g in parts:
            tok = (g.rows.view(-1, 1) * per_row + torch.arange(per_row, device=flat.device)).reshape(-1)
            dec, _ = self._decide(i, g, flat[tok], RoutingSite(path, g.rows, per_row))
            decisions.append((tok, dec))
        k = max(d.indices.shape[1] for _, d in decisions)
        idx = torch.full((T, k), -1, dtype=torch.int64, device=flat.device)
        w = torch.zeros(T, k, dtype=flat.dtype, device=flat.device)
        for tok, d in decisions:
            idx[tok, : d.indices.shape[1]] = d.indices
            w[tok, : d.weights.shape[1]] = d.weights.to(w.dtype)
        return RoutingDecision(idx, w), None

    def _decide(self, i: int, g: _Group, x: Tensor, site: RoutingSite):
        static = not g.router.per_module
        if static and (i, x.shape[0]) in self._static:
            return self._static[(i, x.shape[0])]
        local = g.router.route(x, site)
        if g.identity:
            decision = local
        else:
            slots = g.slots if g.resident else self.runtime.load_selected(g, local.indices)
            decision = RoutingDecision(torch.where(local.indices >= 0, slots[local.indices.clamp_min(0)], -1),
                                       local.weights)
        meta = None
        if static and g.rows is None:  # one decision for every module: regroup it once
            meta = build_meta(decision.indices, decision.weights, self.runtime.bank.banks[site.module].num_adapters)
        if static:
            self._static[(i, x.shape[0])] = (decision, meta)
        return decision, meta


class _Runtime:
    """State shared by the RoutedModel and its MixtureLinears (not an nn.Module)."""

    def __init__(self, library: Library, bank: AdapterBank, universe: list[str], backend: str):
        self.library, self.bank, self.universe, self.backend = library, bank, universe, backend
        self.step: _Step | None = None
        self.trace: Trace | None = None
        self._bound: dict[int, Router] = {}

    def bind(self, router: Router) -> None:
        if id(router) not in self._bound:
            router.bind(self.library, self.universe)
            self._bound[id(router)] = router

    def group(self, router: Router, rows: Tensor | None) -> _Group:
        self.bind(router)
        fits = self.bank.capacity is None or len(router.sources) <= self.bank.capacity
        if fits:
            return _Group(router, rows, self.bank.ensure(router.sources), True)
        return _Group(router, rows, torch.empty(0, dtype=torch.int64), False)

    def load_selected(self, g: _Group, local: Tensor) -> Tensor:
        """Slots for a router whose sources exceed the bank: load just what it selected."""
        chosen = sorted(set(local[local >= 0].tolist()))
        slots = torch.full((len(g.router.sources),), -1, dtype=torch.int64, device=self.bank.device)
        if chosen:
            slots[chosen] = self.bank.ensure([g.router.sources[c] for c in chosen])
        return slots


class RoutedModel(nn.Module):
    """A causal LM plus a library, each token routed through a mixture of adapters.

    ``adapters``: the universe routers choose from (None = the whole library). ``capacity``:
    at most this many adapters held in memory (least recently used evicted); None = all.
    ``backend``: the kernel backend (``auto`` picks Triton on CUDA, the grouped torch path on CPU).
    """

    def __init__(self, model: nn.Module, library: Library, router: Router | None = None,
                 adapters: Sequence[str] | None = None, *, capacity: int | None = None,
                 backend: str = "auto", check_fingerprint: bool = True):
        super().__init__()
        base = library.base
        if base is None:
            raise ValidationError(f"library {library.path} has no base model")
        if check_fingerprint and fingerprint(model) != base.fingerprint:
            raise ValidationError(f"the model's fingerprint {fingerprint(model)[:12]} differs from the "
                                  f"library's base model {base.id!r} ({base.fingerprint[:12]})")
        universe = library.require(adapters if adapters is not None else library.names())
        if not universe:
            raise ValueError(f"library {library.path} has no adapters to route over")
        self.model = model
        self.router = router or Arrow()
        targets = _target_paths(model, library, universe)
        first = model.get_submodule(targets[0]).weight
        bank = AdapterBank({p: _shape(model, p) for p in targets}, capacity=capacity,
                           device=first.device, dtype=first.dtype)
        self._rt = _Runtime(library, bank, universe, backend)
        self._layers = [MixtureLinear(model.get_submodule(p), p, self._rt) for p in targets]
        self._rt.bind(self.router)
        self._routers: Sequence[Router | None] | None = None
        self._hook = None
        self._wrap()

    def _wrap(self) -> None:
        for layer in self._layers:
            parent, _, leaf = layer.path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, layer)
        self._hook = self.model.register_forward_pre_hook(self._start_step, with_kwargs=True)

    def bind(self, router: Router) -> Router:
        """Bind ``router`` to this model's library and adapters now (the runtime otherwise binds
        a router on its first forward); learned routers create their parameters here."""
        self._rt.bind(router)
        return router

    @property
    def bank(self) -> AdapterBank:
        return self._rt.bank

    @property
    def config(self):
        return self.model.config

    # -- forward / generate ---------------------------------------------------------------
    def forward(self, *args, routers: Sequence[Router | None] | None = None, **kwargs):
        with self._using(routers):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, routers: Sequence[Router | None] | None = None, **kwargs):
        with self._using(routers):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _using(self, routers):
        self._routers = routers
        try:
            yield
        finally:
            self._routers, self._rt.step = None, None

    def _start_step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        n_rows = ids.shape[0]
        self._rt.step = _Step(self._rt, self._groups(n_rows, ids.device), n_rows)

    def _groups(self, n_rows: int, device) -> list[_Group]:
        routers = self._routers
        if routers is None:
            return [self._rt.group(self.router, None)]
        if n_rows % len(routers):
            raise ValueError(f"{len(routers)} routers for a batch of {n_rows} rows")
        per_request = n_rows // len(routers)  # beams / return sequences are contiguous rows
        by_router: dict[int, tuple[Router, list[int]]] = {}
        for req, r in enumerate(routers):
            r = r or self.router
            rows = range(req * per_request, (req + 1) * per_request)
            by_router.setdefault(id(r), (r, []))[1].extend(rows)
        if len(by_router) == 1:
            return [self._rt.group(next(iter(by_router.values()))[0], None)]
        return [self._rt.group(r, torch.tensor(rows, device=device)) for r, rows in by_router.values()]

    # -- inspection ------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracing(self):
        """Record which adapters each token used in each module: ``with rm.tracing() as tr:``."""
        self._rt.trace = Trace()
        try:
            yield self._rt.trace
        finally:
            self._rt.trace = None

    def unwrap(self) -> nn.Module:
        """Put the original linears back and return the bare model."""
        for layer in self._layers:
            parent, _, leaf = layer.path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, layer.base)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return self.model

    @contextlib.contextmanager
    def bare(self):
        """Temporarily the unmodified base model (for comparisons): ``with rm.bare() as m:``."""
        model = self.unwrap()
        try:
            yield model
        finally:
            self._wrap()


def _target_paths(model: nn.Module, library: Library, universe: list[str]) -> list[str]:
    """Every linear some adapter of the universe adapts, from the catalog (no blob reads)."""
    short = set().union(*(library.info(n).target_modules for n in universe))
    paths = sorted(p for p in library.base.linears if p.rsplit(".", 1)[-1] in short)
    for p in paths:
        mod = model.get_submodule(p)
        if type(mod) is not nn.Linear:
            raise TypeError(f"{p} is a {type(mod).__name__}; RoutedModel adapts torch.nn.Linear layers only")
    return paths


def _shape(model: nn.Module, path: str) -> tuple[int, int]:
    lin = model.get_submodule(path)
    return lin.out_features, lin.in_features
