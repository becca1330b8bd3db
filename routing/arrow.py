"""Arrow: zero-shot, per-token, per-module routing by adapter prototypes (Ostapenko et al. 2024).

For module m with input token x ∈ R^{d_in} and prototypes v_e (the top right singular vector of
adapter e's ΔW at m, see quiver.library.embeddings):

    logit_e = |x · v_e| / T,     S = top-k_e(logit),     w_e = softmax_{e ∈ S}(logit_e)

(sign-agnostic, since singular vectors have no sign). Modes:
- ``merge-after`` (default; PEFT's semantics): y += Σ_e w_e · ΔW_e x — mix the adapters' outputs.
- ``merge-before`` (mttl's semantics): y += (Σ_e w_e B_e)(Σ_e w_e A_e) x — mix the factors per
  token, then apply one LoRA; needs equal ranks among the mixed adapters.

GenKnowSub (``general=[...]``, as PEFT offers it): before anything else, the mean of the general
adapters' A and of their B (factor-wise, as PEFT does; equal ranks needed) is subtracted from
each task adapter's A and B; prototypes are computed from the result.

An adapter that has no factors at a module is never selected there.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from quiver.library import LoraAdapter, LoraModule
from quiver.library import embeddings as emb

from .base import AdapterSource, GateScreen, LinearGate, Router, RoutingDecision, RoutingSite

MODES = ("merge-after", "merge-before")
# From this many adapters a float32 CPU gate keeps its prototypes' rows and an int8 copy of them,
# plus a bfloat16 copy where the CPU has bfloat16 matrix units (AMX) (routing.base.GateScreen:
# +131% / +181% of the prototypes' memory, +200 / +280 MB at E = 256 on SmolLM2-135M), with
# which decoding steps decide from an int8 pass and prefill-sized steps from a bfloat16 GEMM
# (kernels/native.py, _screen_args): the same decisions. At SmolLM2's shapes, the gates of a
# 1,024-token prefill: E = 256 641 → 318 ms, E = 128 335 → 229 ms, E = 64 201 → 199 ms (nothing
# to show in a whole forward: two runs of bench/runtime.py --screen-ab gave +0.05x and -0.10x of
# the base model, its noise); of a 1-token decoding step: E = 256 14.4 → 8.0 ms, E = 128
# 7.8 → 5.1 ms, E = 64 4.6 → 3.7 ms (1 ms of a ~65 ms step, not worth +131% of the memory).
SCREEN_MIN_ADAPTERS = 128


def _bf16_matrix_units() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


class _Stacks:
    """The prototypes of a list of adapters stacked per module (``protos``: ``[E, d_in]``, zero
    rows where an adapter has no factors; ``present``: bool ``[E]``) and the gate weights built
    from them (``gate_parts``). Shared by every Arrow router over the same adapters with the same
    content: a server builds one router per requested (top_k, temperature), and each private copy
    would hold E × 4,992 floats per layer of a SmolLM2-sized model twice over (~150 MB each at
    E=256). Read-only once built."""

    __slots__ = ("protos", "present", "_weights", "__weakref__")

    def __init__(self, protos: list[dict[str, tuple[Tensor, float]]]):
        self.protos: dict[str, Tensor] = {}
        self.present: dict[str, Tensor] = {}
        for path in sorted(set().union(*protos)):
            d_in = next(p[path][0].numel() for p in protos if path in p)
            P = torch.zeros(len(protos), d_in)
            for e, p in enumerate(protos):
                if path in p:
                    P[e] = p[path][0]
            self.protos[path] = P
            self.present[path] = torch.tensor([path in p for p in protos])
        self._weights: dict[tuple, tuple] = {}

    def gate_parts(self, paths: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> tuple:
        """``(weight [d_in, M·E], present [M, E] or None, fewest present, screen or None)`` for the
        modules at ``paths``. Float32 CPU gates over at least ``SCREEN_MIN_ADAPTERS`` adapters get
        a screen, with its bfloat16 part where the CPU has AMX."""
        key = (paths, device, dtype)
        hit = self._weights.get(key)
        if hit is None:
            present = torch.stack([self.present[p] for p in paths])  # bool [M, E], on the host
            rows = torch.cat([self.protos[p] for p in paths]).to(device, dtype)  # [M·E, d_in]
            screen = None
            if device.type == "cpu" and dtype == torch.float32 and present.shape[1] >= SCREEN_MIN_ADAPTERS:
                screen = GateScreen.of(rows, bf16=_bf16_matrix_units())
            hit = self._weights[key] = (rows.T.contiguous(), None if bool(present.all()) else present.to(device),
                                        int(present.sum(1).min()), screen)
        return hit


# adapters' content (their blob hashes, in order) -> the stacks routers over them share; an entry
# lives while a router holds it
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class Arrow(Router):
    fuses_siblings = True  # route_siblings: one logits GEMM for modules that share an input

    def __init__(self, top_k: int = 2, temperature: float = 1.0, adapters: list[str] | None = None,
                 mode: str = "merge-after", general: list[str] | None = None):
        super().__init__(adapters)
        if top_k < 1:
            raise ValueError(f"Arrow: top_k must be >= 1, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"Arrow: temperature must be > 0, got {temperature}")
        if mode not in MODES:
            raise ValueError(f"Arrow: mode must be one of {MODES}, got {mode!r}")
        self.top_k, self.temperature, self.mode = top_k, temperature, mode
        self.general = list(general or [])
        self._stacks: _Stacks | None = None  # prototypes and gate weights once bound (shared, see _Stacks)
        self._gates: dict[tuple, LinearGate] = {}  # (paths, device, dtype) -> the last gate handed out

    def config(self) -> dict:
        return {"top_k": self.top_k, "temperature": self.temperature, "mode": self.mode, "general": self.general}

    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        if self.adapters is None:
            self.adapters = [n for n in universe if n not in self.general]
        sources = super().bind(library, universe)
        if self.general:
            mean = _mean_factors([library.get(n) for n in self.general])
            sources = [AdapterSource(f"{n}#gks[{','.join(self.general)}]", _gks_loader(library, n, mean))
                       for n in self.adapters]
            protos = [_prototypes(s.load()) for s in sources]  # this router's own: not shared
            self._use(_Stacks(protos))
        else:
            blobs = {r.name: r.blob for r in library.list()}
            key = tuple(blobs[n] for n in self.adapters)  # content-addressed: a replaced adapter is a new key
            stacks = _SHARED.get(key)
            if stacks is None:
                stacks = _SHARED[key] = _Stacks([library.arrow_prototypes(n) for n in self.adapters])
            self._use(stacks)
        self.sources = sources
        return sources

    def _use(self, stacks: _Stacks) -> None:
        self._stacks = stacks
        self._gates.clear()

    @property
    def _protos(self) -> dict[str, Tensor]:
        """module path -> ``[E, d_in]`` prototypes (zero rows where an adapter is absent)."""
        return self._stacks.protos if self._stacks is not None else {}

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        return self.route_siblings(x, [site])[0]

    def route_siblings(self, x: Tensor, sites: list[RoutingSite]) -> list[RoutingDecision]:
        """The M modules of ``sites`` read the same ``x``: their logits in one GEMM against the
        stacked prototypes ``[d_in, M·E]``, one top-k and one softmax over ``[M, T, E]``. Each
        module's decision is exactly :meth:`route`'s at that module (its own prototypes)."""
        idx, w = self.linear_gate(tuple(s.module for s in sites), x.device, x.dtype).route(x)  # [M, T, k]
        return [RoutingDecision(idx[m], w[m]) for m in range(len(sites))]

    def linear_gate(self, paths: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> LinearGate:
        """Arrow at ``paths`` is the linear gate ``|x · v_e|`` over their stacked prototypes
        (host-side facts computed once per (paths, device, dtype): no device read per step;
        ``top_k`` and ``temperature`` are read live, so changing them takes effect at once). The
        same LinearGate object is returned while they stay unchanged, so that callers can keep
        work prepared for it (the step plan's native calls)."""
        key = (paths, device, dtype)
        gate = self._gates.get(key)  # the last gate handed out here: one object while top_k and temperature stay
        if gate is None or gate.top_k != self.top_k or gate.temperature != self.temperature:
            # the weight is the shared stacks' (one per adapters, paths, device, dtype)
            weight, present, n_present, screen = self._stacks.gate_parts(paths, device, dtype)
            gate = self._gates[key] = LinearGate(weight, present, n_present, len(paths), absolute=True,
                                                 top_k=self.top_k, temperature=self.temperature, screen=screen)
        return gate


def _prototypes(adapter: LoraAdapter) -> dict[str, tuple[Tensor, float]]:
    return {p: emb.arrow_prototype(m.A, m.B, adapter.scaling(p)) for p, m in adapter.modules.items()}


def _mean_factors(adapters: list[LoraAdapter]) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for path in adapters[0].modules:
        mods = [a.modules[path] for a in adapters if path in a.modules]
        if len({m.rank for m in mods}) != 1:
            raise ValueError(f"GenKnowSub needs general adapters of one rank at {path}")
        out[path] = (torch.stack([m.A.float() for m in mods]).mean(0), torch.stack([m.B.float() for m in mods]).mean(0))
    return out


def _gks_loader(library, name: str, mean: dict[str, tuple[Tensor, Tensor]]):
    def load() -> LoraAdapter:
        ad = library.get(name)
        modules = {}
        for path, m in ad.modules.items():
            if path in mean:
                a_bar, b_bar = mean[path]
                if a_bar.shape != m.A.shape:
                    raise ValueError(f"GenKnowSub: {name} has rank {m.rank} at {path}, the general "
                                     f"adapters rank {a_bar.shape[0]}")
                m = LoraModule(A=(m.A.float() - a_bar).to(m.A.dtype), B=(m.B.float() - b_bar).to(m.B.dtype), alpha=m.alpha)
            modules[path] = m
        return LoraAdapter(name=f"{name}-gks", base_model=ad.base_model, modules=modules,
                           use_rslora=ad.use_rslora, rank=ad.rank, alpha=ad.alpha)
    return load
