"""RoutedModel: a transformers causal LM whose adapted linears route every token through a
weighted mixture of adapters, from a library or from trainable skills.

Index legend: Bt = batch rows, S = sequence length, T = Bt·S tokens, R = requests.

Each target ``nn.Linear`` is replaced by a :class:`~quiver.runtime.wrap.MixtureLinear`
(``y = base(x) + mixture_lora(x, bank[module], indices, weights)``). Before every forward of the
wrapped model a pre-hook builds the **step plan** (runtime/plan.py): the step's requests and
their routers, the token → request map, the bank slots, pinned until a post-hook ends the step.
Routing happens inside the layers, so ``generate`` is transformers' own (KV cache, greedy and
sampling, left padding, beams).

A batch may mix routers: ``routers=[r_0, ..., r_{R-1}]`` gives each request its own router
(None = the default one). Without ``request_ids`` the batch rows are the requests (R must divide
Bt: beams / return sequences are contiguous rows of a request). With ``request_ids`` (int64,
the input's shape or flat ``[T]``) each token names its request: packed sequences, as a
continuous-batching server feeds them. All requests' decisions of one mixing mode are assembled
into one ``[T, k]`` decision over one bank, so a batch costs one kernel call per module and mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quiver.library import Library, ValidationError, fingerprint
from quiver.routing import Arrow, Router, Single

from .bank import AdapterBank
from .plan import Engine
from .sources import LibrarySource, TrainableSource
from .trace import Trace
from .wrap import install, resolve_targets, uninstall, wrap_linears


class RoutedModel(nn.Module):
    """A causal LM plus an adapter source, each token routed through a mixture of adapters.

    ``source``: a :class:`~quiver.library.Library` (inference) or a
    :class:`~quiver.runtime.sources.TrainableSource` (training: the same wrapping with a
    trainable bank). ``adapters``: the universe routers choose from (None = the whole library).
    ``capacity``: at most this many library adapters held in memory (least recently used
    evicted between steps); None = all. ``backend``: the kernel backend (``auto`` picks by the
    backends' declarations: Triton on CUDA, the grouped torch path on CPU, gathering for small
    calls).
    """

    def __init__(self, model: nn.Module, source: Library | TrainableSource, router: Router | None = None,
                 adapters: Sequence[str] | None = None, *, capacity: int | None = None,
                 backend: str = "auto", check_fingerprint: bool = True):
        super().__init__()
        if isinstance(source, TrainableSource):
            if adapters is not None or capacity is not None:
                raise ValueError("adapters= and capacity= apply to a library, not to trainable skills")
            paths, src = list(source.paths), source
            router = router or Single(source.names[0])
        else:
            library = source
            base = library.base
            if base is None:
                raise ValidationError(f"library {library.path} has no base model")
            if check_fingerprint and fingerprint(model) != base.fingerprint:
                raise ValidationError(f"the model's fingerprint {fingerprint(model)[:12]} differs from the "
                                      f"library's base model {base.id!r} ({base.fingerprint[:12]})")
            universe = library.require(adapters if adapters is not None else library.names())
            if not universe:
                raise ValueError(f"library {library.path} has no adapters to route over")
            short = set().union(*(library.info(n).target_modules for n in universe))
            paths = resolve_targets(model, short)
            first = model.get_submodule(paths[0]).weight
            bank = AdapterBank({p: _shape(model, p) for p in paths}, capacity=capacity,
                               device=first.device, dtype=first.dtype)
            src = LibrarySource(library, universe, bank)
            router = router or Arrow()
        self.model = model
        self.router = router
        self._engine = Engine(src, router, backend)
        self._layers = wrap_linears(model, paths, self._engine)
        self._engine.source.bind(router)
        self._hooks: list = []
        self._hook()

    def _hook(self) -> None:
        self._hooks = [self.model.register_forward_pre_hook(self._begin_step, with_kwargs=True),
                       self.model.register_forward_hook(self._end_step, always_call=True)]

    def bind(self, router: Router) -> Router:
        """Bind ``router`` to this model's adapters now (the runtime otherwise binds a router on
        its first step); learned routers create their parameters here."""
        self._engine.source.bind(router)
        return router

    @property
    def bank(self) -> AdapterBank | TrainableSource:
        src = self._engine.source
        return src.bank if isinstance(src, LibrarySource) else src

    @property
    def paths(self) -> list[str]:
        """The wrapped linears."""
        return [layer.path for layer in self._layers]

    @property
    def config(self):
        return self.model.config

    # -- forward / generate ---------------------------------------------------------------
    def forward(self, *args, routers: Sequence[Router | None] | None = None, request_ids: Tensor | None = None,
                **kwargs):
        with self._using(routers, request_ids):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, routers: Sequence[Router | None] | None = None, **kwargs):
        with self._using(routers, None):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _using(self, routers, request_ids):
        if routers is not None and len(routers) == 0:
            raise ValueError("routers= must name one router (or None) per request")
        eng = self._engine
        eng.requests, eng.request_ids = (list(routers) if routers is not None else None), request_ids
        try:
            yield
        finally:
            eng.requests, eng.request_ids = None, None

    def _begin_step(self, module, args, kwargs):
        for name in ("routers", "request_ids"):
            if name in kwargs:  # the wrapped model would ignore it and route by the default router
                raise TypeError(f"{name}= goes to the RoutedModel (rm(...), rm.generate(...)), not to the model it "
                                "wraps")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self._engine.begin(tuple(ids.shape), ids.device)

    def _end_step(self, module, args, output):
        self._engine.end()

    # -- inspection ------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracing(self):
        """Record which adapters each token used in each module: ``with rm.tracing() as tr:``."""
        self._engine.trace = Trace()
        try:
            yield self._engine.trace
        finally:
            self._engine.trace = None

    def unwrap(self) -> nn.Module:
        """Put the original linears back and return the bare model."""
        uninstall(self.model, self._layers)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.model

    @contextlib.contextmanager
    def bare(self):
        """Temporarily the unmodified base model (for comparisons): ``with rm.bare() as m:``."""
        model = self.unwrap()
        try:
            yield model
        finally:
            install(self.model, self._layers)
            self._hook()


def _shape(model: nn.Module, path: str) -> tuple[int, int]:
    lin = model.get_submodule(path)
    return lin.out_features, lin.in_features
