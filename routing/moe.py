"""MoEGate: a learned top-k gate over the library's adapters, with the Switch load-balancing loss.

Index legend: T = tokens at the module, E = adapters (experts), k = slots per token.

At an adapted module with input ``x: [T, d_in]`` and gate ``W: [E, d_in]``:

    logits = x W^T / temperature                  [T, E]   (float32; absent adapters -inf)
    S      = top-k(logits)                        [T, k]
    w      = softmax over S of the selected logits          (differentiable w.r.t. W)

as in a sparse MoE layer (Shazeer et al. 2017; Mixtral). Only the gate trains: the base model and
the adapters stay frozen and gradients reach W through the routing weights, so a training step
is one forward and one backward pass (X-LoRA needs a second forward to compute its scalings).

Granularity: ``"module"`` — one gate per adapted module; ``"layer"`` — one gate per decoder layer
and input width, shared by the modules of that layer that read inputs of that width (in a Llama:
q/k/v/o/gate/up share one gate, down_proj has its own). The layer of a module is its path up to
the first integer component (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); a module
without one gets its own gate.

Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4, with the T·k slots of top-k):

    L_balance = N · Σ_i f_i · P_i,   f_i = (# slots routed to i) / (# routed slots),
                                     P_i = mean over tokens of softmax(logits)[:, i]

with N the number of adapters present at the module. f is a count (no gradient); P carries
the gradient. Uniform routing (f_i = 1/N) gives exactly 1. During a forward pass with grad
enabled in training mode, each routed module adds its L_balance to a collection;
:meth:`MoEGate.aux_loss` returns ``balance_coef ×`` their mean and empties it. The collection
holds one forward pass: routing a module that is already in it starts a new one.

Init: ``"random"`` — N(0, 0.02²) entries (the ``initializer_range`` transformers uses for MoE
router weights), seeded by ``seed`` and the gate's name; ``"arrow"`` — row e is adapter e's Arrow
prototype at the module (see quiver.library.embeddings; for a layer gate the top principal
direction of the adapter's prototypes over the gate's modules, which ignores their arbitrary
signs), scaled to the norm a random row has (0.02·√d_in). Arrow routes on |x·v|, the gate on
x·w, so this is a starting point that knows which directions each adapter acts on, not Arrow.

Gate parameters are created in :meth:`bind` (widths from ``library.base.linears``) unless they
exist already (loaded from a router artefact). They move to the inputs' device on first use.
An adapter with no factors at a module is never selected there.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor, nn

from .base import AdapterSource, LearnedRouter, RoutingDecision, RoutingSite, top_k_softmax

GRANULARITIES = ("module", "layer")
INITS = ("random", "arrow")
INIT_STD = 0.02


def load_balancing_loss(logits: Tensor, indices: Tensor, num_experts: int | None = None) -> Tensor:
    """Switch-style ``N · Σ_i f_i · P_i`` for one routed call.

    ``logits: [T, E]`` (-inf for experts that cannot be chosen), ``indices: [T, k]`` the chosen
    experts (-1 = empty slot, not counted); ``N = num_experts`` (default E). Differentiable
    w.r.t. ``logits`` through P only.
    """
    E = logits.shape[-1]
    n = E if num_experts is None else num_experts
    chosen = indices[indices >= 0]
    f = torch.bincount(chosen, minlength=E).to(torch.float32) / max(chosen.numel(), 1)  # [E]
    P = torch.softmax(logits.float(), dim=-1).mean(0)  # [E]
    return n * (f * P).sum()


class MoEGate(LearnedRouter):
    """A learned top-k gate per module (or per layer and width); see the module docstring."""

    def __init__(self, top_k: int = 2, granularity: str = "module", balance_coef: float = 0.01,
                 init: str = "random", temperature: float = 1.0, seed: int = 0,
                 adapters: list[str] | None = None):
        super().__init__(adapters)
        if top_k < 1:
            raise ValueError(f"MoEGate: top_k must be >= 1, got {top_k}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"MoEGate: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if init not in INITS:
            raise ValueError(f"MoEGate: init must be one of {INITS}, got {init!r}")
        if temperature <= 0:
            raise ValueError(f"MoEGate: temperature must be > 0, got {temperature}")
        if balance_coef < 0:
            raise ValueError(f"MoEGate: balance_coef must be >= 0, got {balance_coef}")
        self.top_k, self.granularity, self.init = top_k, granularity, init
        self.balance_coef, self.temperature, self.seed = float(balance_coef), float(temperature), seed
        self.gates = nn.ParameterDict()  # gate name -> W: [E, d_in]
        self._gate_of: dict[str, str] = {}  # module path -> gate name
        self._present: dict[str, Tensor] = {}  # module path -> bool [E]
        self._n_present: dict[str, int] = {}  # module path -> adapters present there
        self._balance: dict[str, Tensor] = {}  # module path -> L_balance of the current forward

    # -- binding --------------------------------------------------------------------------------
    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        sources = super().bind(library, universe)
        protos = [library.arrow_prototypes(n) for n in self.adapters]  # cached; says who is where
        modules = sorted(set().union(*protos))
        self._gate_of = {p: self.gate_name(p, library.base.linears[p][1]) for p in modules}
        self._present = {p: torch.tensor([p in pr for pr in protos]) for p in modules}
        self._n_present = {p: sum(p in pr for pr in protos) for p in modules}  # host counts
        E = len(self.adapters)
        for name in sorted(set(self._gate_of.values())):
            paths = [p for p in modules if self._gate_of[p] == name]
            d_in = library.base.linears[paths[0]][1]
            if name in self.gates:
                if tuple(self.gates[name].shape) != (E, d_in):
                    raise ValueError(f"MoEGate: gate {name!r} has shape {tuple(self.gates[name].shape)}, "
                                     f"this binding needs ({E}, {d_in}) ({E} adapters)")
                continue
            W = self._init_rows(name, paths, protos, d_in)
            ref = next(iter(self.gates.values()), None)
            self.gates[name] = nn.Parameter(W if ref is None else W.to(ref.device))
        return sources

    def weight(self, path: str) -> nn.Parameter:
        """The gate ``W: [E, d_in]`` serving module ``path`` (shared by a layer's modules with
        ``granularity="layer"``)."""
        return self.gates[self._gate_of[path]]

    def gate_name(self, path: str, d_in: int) -> str:
        """The gate serving module ``path`` (dots become slashes: ParameterDict keys have none)."""
        if self.granularity == "module":
            return path.replace(".", "/")
        parts = path.split(".")
        layer = next((i for i, s in enumerate(parts) if s.isdigit()), None)
        if layer is None:
            return path.replace(".", "/")
        return "/".join(parts[: layer + 1]) + f"/in{d_in}"

    def _init_rows(self, name: str, paths: list[str], protos, d_in: int) -> Tensor:
        if self.init == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            return torch.randn(len(protos), d_in, generator=g) * INIT_STD
        W = torch.zeros(len(protos), d_in)
        for e, pr in enumerate(protos):
            vs = [pr[p][0] for p in paths if p in pr]
            if len(vs) == 1:
                W[e] = vs[0]
            elif vs:  # the top principal direction of ±v over the gate's modules
                W[e] = torch.linalg.svd(torch.stack(vs).double(), full_matrices=False)[2][0].float()
        return W * (INIT_STD * math.sqrt(d_in))

    # -- routing --------------------------------------------------------------------------------
    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        if site.module not in self._gate_of:  # none of this gate's adapters adapts the module
            k = min(self.top_k, len(self.adapters))
            return RoutingDecision(torch.full((x.shape[0], k), -1, dtype=torch.int64, device=x.device),
                                   x.new_zeros(x.shape[0], k))
        W = self.weight(site.module)  # [E, d_in]
        if W.device != x.device:
            self.to(x.device)
        present, n_present = self._present[site.module], self._n_present[site.module]
        if present.device != x.device:
            present = self._present[site.module] = present.to(x.device)
        logits = (x.float() @ W.T) / self.temperature  # [T, E]
        idx, w = top_k_softmax(logits, self.top_k, 1.0, None if n_present == present.numel() else present,
                               n_present)  # [T, k]
        if self.training and self.balance_coef > 0 and torch.is_grad_enabled() and W.requires_grad:
            if site.module in self._balance:  # a new forward pass
                self._balance.clear()
            self._balance[site.module] = load_balancing_loss(logits.masked_fill(~present, float("-inf")), idx,
                                                             n_present)
        return RoutingDecision(idx, w.to(x.dtype))

    def aux_loss(self) -> Tensor | None:
        """``balance_coef ×`` the mean load-balancing loss of the last forward pass (then reset)."""
        if not self._balance:
            return None
        losses = list(self._balance.values())
        self._balance = {}
        return self.balance_coef * torch.stack(losses).mean()

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"top_k": self.top_k, "granularity": self.granularity, "balance_coef": self.balance_coef,
                "init": self.init, "temperature": self.temperature, "seed": self.seed}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, Tensor], adapters: list[str]) -> MoEGate:
        router = cls(adapters=adapters, **config)
        for key, t in tensors.items():
            router.gates[key.removeprefix("gates.")] = nn.Parameter(torch.empty_like(t, dtype=torch.float32))
        router.load_state_tensors(tensors)
        return router
