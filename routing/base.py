"""The routing contract: a router turns one module's input tokens into a RoutingDecision.

Index legend: T = tokens at this module (flattened batch × sequence), k = slots per token,
E = adapters the router routes over.

A router is bound once to a library and a universe of adapter names (:meth:`Router.bind`),
which returns the **sources** it routes over: what the runtime must hold in its adapter bank
(usually the library's adapters as stored; a router may transform them, as GenKnowSub does).
Then, per adapted module and forward pass, :meth:`Router.route` returns

    indices: int64 [T, k]   positions in the list of sources, -1 = no adapter in that slot
    weights: float [T, k]   rows sum to 1 (or to the budget the router documents)

What the runtime must know about a router is declared on its class, never guessed:

- ``per_token``: True when the decision depends on the module and on x (Arrow, the MoE gate).
  False for routers that give one row per request, repeated over its tokens, whatever the
  module (fixed weights, retrieval, MHR): the runtime then asks once per step and reuses the
  decision (and the kernel metadata) in every module.
- ``mode``: ``"merge-after"`` (mix the adapters' outputs, Σ_j w_j B_j A_j x) or
  ``"merge-before"`` (mix the factors, (Σ_j w_j B_j)(Σ_j w_j A_j) x); the kernels' entry point
  takes it as an argument.
- ``fuses_siblings``: True when :meth:`Router.route_siblings` routes several modules that read
  the same input (q/k/v, gate/up) in one call, more cheaply than one :meth:`Router.route` each
  (Arrow: one logits GEMM). The runtime then routes a module's later siblings with its first.
- :meth:`Router.linear_gate`: a router whose decision at a module is a *linear gate* (logits
  ``x·G^T``, or their absolute values, then :func:`top_k_softmax`) returns that gate, so that the
  runtime may evaluate it with another kernel (the native CPU one, for float32 inference); its
  :meth:`Router.route_siblings` must equal :meth:`LinearGate.route` of that gate.
- ``prompt_pass``: True when the router decides from a **scoring pass** over the prompt (ArrowVote):
  before the request's real forward, the runtime runs its prompt once with :attr:`scorer` (a
  per-token router) and hands the routing mass per adapter to ``set_votes(votes [R, E])``
  (quiver.runtime.answer.cast_votes).
- ``head_splits``: H > 1 asks the runtime for H *head views* of every source (MHR's head
  splitting, see routing/mhr.py); the router's indices then run over the H·S views, view
  (h, s) at index h·S + s.

Per-request information (the prompt texts for retrieval, the task names for MHR) reaches a
router through :meth:`Router.prepare` before a forward or ``generate`` call (request i =
``prompts[i]``); ``site.request_ids`` says which request each token belongs to, for left-padded
rows and packed sequences alike. :meth:`Router.request_table` indexes a per-request table by it.

Learned routers (:class:`LearnedRouter`) are also ``nn.Module``s: their parameters train with
the base model and adapters frozen (gradients reach them through the routing weights), an
auxiliary loss may be collected during a forward pass (:meth:`Router.aux_loss`), and they save
to / load from a library as ``router`` artefacts (:func:`quiver.routing.save_router`,
``quiver.routing.load_router``): safetensors of :meth:`state_tensors` plus the JSON :meth:`config`.
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
    """What a router sees at one adapted module in one step."""

    module: str  # full module path in the base model, e.g. model.layers.3.self_attn.q_proj
    request_ids: Tensor  # int64 [T]: the request of each token of x (its index in prepare's lists)


I8_GROUP = 16  # elements per scale of GateScreen's int8 copy (QV_I8_GROUP in kernels/native_mixture.c)


@dataclass(frozen=True)
class GateScreen:
    """A linear gate's columns in fewer bits, with bounds on what that costs, for a first pass
    that decides which columns can be among a token's top k (kernels/native.py, ``_screen_args``);
    the kernel then computes the columns that the bound cannot rule out from the float32 rows, so
    the decision is the float32 one. Row n of ``rows``, ``q`` and ``low`` is column n of the
    gate's ``weight``. With ``g_d = d u / (1 - d u)``, ``u = 2^-24`` (float32 accumulation over
    d terms):

    - **int8** (``q``, ``qscale``, ``qerr``; decoding-sized steps, any CPU with vector units):
      one scale per ``I8_GROUP`` elements of a row, ``s = max |w| / 127`` over them (a scale per
      group instead of per row halves the error, and with it the columns the bound keeps), and
      ``l_ni = float32(q_ni s_n,i/16)``; a = the float32-accumulated ``x · l_n``. About 1.3 bytes
      per element instead of 4, and a decoding step's gates are a stream over those bytes::

          |x · w_n - a| <= ||x|| qerr_n,    qerr_n >= ||w_n - l_n|| + g_d ||l_n||

    - **bfloat16** (``low``, ``err``, ``norm``; prefill-sized steps on CPUs with bfloat16 matrix
      units, None elsewhere): for x rounded to x~ = bfloat16(x) and a = the float32-accumulated
      x~ · l_n rounded to bfloat16 (a bfloat16 GEMM)::

          |x · w_n - a| <= ||x|| err_n + ||x - x~|| norm_n + r |a|,     r = 2^-8 / (1 - 2^-8)
          err_n >= ||w_n - l_n|| + g_d ||l_n||,   norm_n >= (1 + g_d) ||l_n||

    Memory: the float32 rows (the kept columns' logits read them) and the int8 copy with its
    scales are 1.31 times the weight's, with the bfloat16 copy 1.81 times."""

    rows: Tensor  # float32 [N, d_in]: the weight's columns as rows, for the float32 logits of the kept columns
    q: Tensor  # int8 [N, d_in]
    qscale: Tensor  # float32 [N, ceil(d_in / I8_GROUP)]
    qerr: Tensor  # float32 [N]
    low: Tensor | None = None  # bfloat16 [N, d_in]
    err: Tensor | None = None
    norm: Tensor | None = None

    @classmethod
    def of(cls, rows: Tensor, bf16: bool = True) -> GateScreen:
        """The screen of a gate whose columns are the rows of ``rows: float32 [N, d_in]`` (kept, as
        contiguous rows: the gate's own weight stays ``[d_in, N]``, the layout its float32 GEMM
        reads fastest at mid sizes); ``bf16``: also the bfloat16 part."""
        rows = rows.contiguous()
        d = rows.shape[1]
        g = d * 2.0**-24 / (1 - d * 2.0**-24)
        up = 1 + 1e-6  # the float32 rounding of the bounds themselves: keep them above the exact values
        rows64 = rows.double()
        N, G = rows.shape[0], -(-d // I8_GROUP)
        padded = torch.nn.functional.pad(rows, (0, G * I8_GROUP - d)).view(N, G, I8_GROUP)
        amax = padded.abs().amax(dim=2)  # [N, G]
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # float32, as the kernel multiplies
        q = torch.round(padded / scale[..., None]).clamp_(-127, 127).to(torch.int8).view(N, -1)[:, :d]
        low32 = q.float() * scale.repeat_interleave(I8_GROUP, dim=1)[:, :d]  # float32 products, as the kernel's
        l64 = low32.double()
        qerr = (rows64 - l64).norm(dim=1) + g * l64.norm(dim=1)
        parts = {}
        if bf16:
            low = rows.to(torch.bfloat16)
            low64 = low.double()
            lnorm = low64.norm(dim=1)
            parts = dict(low=low.contiguous(), err=(((rows64 - low64).norm(dim=1) + g * lnorm) * up).float(),
                         norm=((1 + g) * lnorm * up).float())
        return cls(rows=rows, q=q.contiguous(), qscale=scale.contiguous(), qerr=(qerr * up).float().contiguous(),
                   **parts)


@dataclass(frozen=True)
class LinearGate:
    """A router's gate at M modules that read one input, in the form any kernel can evaluate.

    ``weight: [d_in, M·E]`` holds module m's gate vectors in columns ``m·E .. m·E+E-1`` (Arrow:
    the prototypes), on the device and in the dtype the gate is evaluated in (GEMM-ready);
    ``present: bool [M, E]`` (None = all) the adapters that exist at each module, ``n_present``
    the smallest per-module count of them (a host integer). For module m and token t::

        s[m, t, e] = |x_t · weight[:, m·E + e]|  (absolute)   or   x_t · weight[:, m·E + e]
        indices, weights = top_k_softmax(s, top_k, temperature, present)     [M, T, k']
    """

    weight: Tensor
    present: Tensor | None
    n_present: int
    modules: int
    absolute: bool
    top_k: int
    temperature: float = 1.0
    screen: GateScreen | None = None  # an int8 / bfloat16 first pass for large gates (the same decisions)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The reference evaluation (PyTorch): ``indices int64 [M, T, k']``, ``weights [M, T, k']``."""
        M = self.modules
        s = (x @ self.weight).view(x.shape[0], M, self.weight.shape[1] // M).transpose(0, 1)  # [M, T, E]
        if self.absolute:
            s = s.abs()
        present = None if self.present is None else self.present[:, None, :]
        return top_k_softmax(s, self.top_k, self.temperature, present, self.n_present)


def top_k_softmax(logits: Tensor, k: int, temperature: float = 1.0, present: Tensor | None = None,
                  n_present: int | None = None) -> tuple[Tensor, Tensor]:
    """The sparse gate shared by Arrow and the MoE gate.

    ``logits: [..., T, E]``; ``present: bool [E]`` (or broadcastable to the logits) marks the adapters that exist at this module
    (None = all) and ``n_present`` is its count, known on the host (so routing reads nothing back
    from the device: a CUDA step stays free of synchronisation; with several modules' logits,
    the smallest count). Returns ``indices int64 [..., T, k']`` and ``weights [..., T, k']``
    (k' = min(k, E)):

        S = top-k over present adapters of logits,    w = softmax_{e ∈ S}(logits_e / temperature)

    When fewer than k' adapters are present, the missing slots get index -1 and weight 0 (never
    NaN). Differentiable w.r.t. ``logits`` through the selected entries.
    """
    if present is not None:
        logits = logits.masked_fill(~present, float("-inf"))
    top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)  # [T, k']
    w = torch.softmax(top if temperature == 1.0 else top / temperature, dim=-1)
    if present is not None and (n_present if n_present is not None else int(present.sum())) < idx.shape[1]:
        valid = torch.isfinite(top)
        idx, w = idx.masked_fill(~valid, -1), w.nan_to_num(0.0).masked_fill(~valid, 0.0)
    return idx, w


class Router:
    """Base class: subclasses implement :meth:`route` and, if needed, :meth:`bind`.

    ``adapters=None`` means "the universe the runtime gives me" (the RoutedModel's adapters).
    """

    per_token: bool = True  # see the module docstring
    mode: str = "merge-after"  # or "merge-before"
    fuses_siblings: bool = False  # route_siblings is cheaper than one route per module
    prompt_pass: bool = False  # decides from a scoring pass over the prompt (see the module docstring)
    head_splits: int = 1  # H > 1: route over H head views of each source (MHR)
    top_k: int | None = None  # routers that pick k of their adapters (per token or per request)

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

    def min_resident(self, universe: int) -> int:
        """The fewest adapters one forward of this router needs resident at once (a bank of
        smaller capacity can never serve it): ``top_k`` for a router that picks k, else every
        adapter it routes over (its own list, or the ``universe`` the runtime gives it)."""
        n = len(self.adapters) if self.adapters is not None else universe
        return min(self.top_k, n) if self.top_k is not None else n

    def route_siblings(self, x: Tensor, sites: list[RoutingSite]) -> list[RoutingDecision]:
        """One decision per site for modules that all read ``x``; each equals ``route(x, site)``.
        Routers that declare ``fuses_siblings`` override it with one fused computation."""
        return [self.route(x, s) for s in sites]

    def linear_gate(self, paths: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> LinearGate | None:
        """The linear gate this router's decisions at ``paths`` (modules reading one input) are,
        or None when they are not one (the default). See :class:`LinearGate`."""
        return None

    def prepare(self, *, prompts: list[str] | None = None, tasks: list[str | None] | None = None) -> None:
        """Per-request information for the next forward/generate calls (row i = request i).

        Routers that route per token ignore it; per-example routers (retrieval, MHR) need it.
        """

    def request_table(self, table: Tensor, request_ids: Tensor, what: str) -> Tensor:
        """``table[request_ids]`` for a per-request ``table: [R, ...]`` from :meth:`prepare`;
        a table of one row applies to every request. A clear error for a request beyond it (on
        the CPU; on an accelerator the indexing itself fails, without a host read per step)."""
        if table.shape[0] == 1:
            return table.expand(request_ids.shape[0], *table.shape[1:])
        if request_ids.device.type == "cpu" and request_ids.numel() and int(request_ids.max()) >= table.shape[0]:
            raise ValueError(f"{type(self).__name__}: request {int(request_ids.max())} has no {what} "
                             f"(prepare got {table.shape[0]}); give one {what} per request")
        return table[request_ids.to(table.device)]

    def table_decision(self, rows: tuple[Tensor, Tensor], cache: dict, x: Tensor, site: RoutingSite,
                       what: str) -> RoutingDecision:
        """Per-request ``rows = (indices int64 [R, k], weights [R, k])`` as the decision for the
        tokens of ``x``; ``cache`` keeps their copy per (device, dtype), made on first use."""
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (rows[0].to(x.device), rows[1].to(x.device, x.dtype))
        idx, w = cache[key]
        return RoutingDecision(self.request_table(idx, site.request_ids, what),
                               self.request_table(w, site.request_ids, what))

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
