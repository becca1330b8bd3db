"""Trainable LoRA skills: one adapter, or an inventory of skills mixed per example (MHR / Poly).

Index legend: Bt = batch rows, S = skills, H = heads (``n_splits``), r = rank. At each target
``nn.Linear`` (d_in → d_out) skill s holds ``A[s]: [r, d_in]`` and ``B[s]: [d_out, r]`` (PEFT
orientation; ``scaling = alpha / r``).

There is no training-only model wrapper: :class:`LoraParams` is a trainable adapter source
(:class:`~quiver.runtime.TrainableSource`) and attaching it wraps the model with the runtime's
own :class:`~quiver.runtime.RoutedModel`, the same ``MixtureLinear`` layers and step plan that
serve inference. A plain LoRA is S = 1 routed by ``Single``; MHR pre-training routes the skills
with an :class:`~quiver.routing.MHR` router in training mode, so MHR's head-split mixing is the
runtime's merge-before over head views, written once. The base model's parameters are never
changed; :meth:`LoraParams.detach` puts the original linears back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quiver.library import BaseModelRef, LoraAdapter, LoraModule, fingerprint
from quiver.library.base_model import model_id_of
from quiver.routing import Router, Single
from quiver.runtime import RoutedModel, TrainableSource, resolve_targets

target_paths = resolve_targets  # the one resolver of target modules (runtime.wrap)


class LoraParams(TrainableSource):
    """Trainable skills at the target linears of ``model``, attached on construction.

    ``init``: adapters to start from, one per skill (same targets; their rank must equal
    ``rank``); else the factors start as ``factor_init`` (a key of :data:`FACTOR_INITS`) says,
    seeded by ``seed``: ``"a-random"`` (PEFT's default) draws A Kaiming-uniform and sets B = 0;
    ``"b-random"`` swaps the roles (see :func:`_init_b_random`).
    ``names``: the skills' names (default ``skill-0 ..``, or ``lora`` for one skill).
    ``router``: routes the skills (default ``Single`` of the first skill).
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16.0,
                 n_skills: int = 1, dropout: float = 0.0, init: Sequence[LoraAdapter] | None = None,
                 seed: int = 0, names: Sequence[str] | None = None, router: Router | None = None,
                 factor_init: str = "a-random"):
        super().__init__()
        if rank < 1 or n_skills < 1:
            raise ValueError(f"rank and n_skills must be >= 1 (got {rank}, {n_skills})")
        if factor_init not in FACTOR_INITS:
            raise ValueError(f"unknown factor_init {factor_init!r}; known: {sorted(FACTOR_INITS)}")
        self.paths = resolve_targets(model, targets)
        self.names = list(names) if names is not None else (["lora"] if n_skills == 1 else
                                                             [f"skill-{s}" for s in range(n_skills)])
        if len(self.names) != n_skills or len(set(self.names)) != n_skills:
            raise ValueError(f"{n_skills} skills need {n_skills} distinct names; got {self.names}")
        self.rank, self.alpha, self.n_skills = rank, float(alpha), n_skills
        self.scaling = self.alpha / rank
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for path in self.paths:
            lin = model.get_submodule(path)
            A, B = FACTOR_INITS[factor_init](n_skills, rank, lin.in_features, lin.out_features, gen)
            self.A[_key(path)] = nn.Parameter(A)
            self.B[_key(path)] = nn.Parameter(B)
        if init is not None:
            self._load_init(list(init))
        self._model = [model]  # not a submodule: the base model's parameters are not ours
        # The base model's identity, taken before wrapping renames its linears' parameters.
        self._base = BaseModelRef(model_id_of(model), fingerprint(model))
        self.to(next(model.parameters()).device)
        self._routed: list[RoutedModel] = []
        self.attach(router)

    def _load_init(self, adapters: list[LoraAdapter]) -> None:
        if len(adapters) != self.n_skills:
            raise ValueError(f"init gives {len(adapters)} adapters for {self.n_skills} skills")
        with torch.no_grad():
            for s, ad in enumerate(adapters):
                missing = [p for p in self.paths if p not in ad.modules]
                if missing:
                    raise ValueError(f"init adapter {ad.name!r} lacks modules {missing[:3]}")
                for path in self.paths:
                    m = ad.modules[path]
                    if m.rank != self.rank:
                        raise ValueError(f"init adapter {ad.name!r} has rank {m.rank} at {path}; expected {self.rank}")
                    # Fold the adapter's scaling into B so that our own scaling reproduces its ΔW.
                    self.A[_key(path)][s] = m.A.float()
                    self.B[_key(path)][s] = m.B.float() * (ad.scaling(path) / self.scaling)

    # -- wrapping ----------------------------------------------------------------------------
    def attach(self, router: Router | None = None) -> RoutedModel:
        """Wrap the model (once) so that its forward adds the skills as ``router`` mixes them."""
        if not self._routed:
            self._routed.append(RoutedModel(self._model[0], self, router=router or Single(self.names[0])))
        return self._routed[0]

    def detach(self) -> None:
        """Put the model's original linears back."""
        if self._routed:
            self._routed.pop().unwrap()

    # -- TrainableSource -----------------------------------------------------------------------
    def factors(self, path: str) -> tuple[Tensor, Tensor]:
        return self.A[_key(path)], self.B[_key(path)] * self.scaling  # [S, r, d_in], [S, d_out, r]

    def dropout(self, x: Tensor) -> Tensor:
        return self.drop(x)

    def snapshot(self, name: str) -> LoraAdapter:
        return self.to_adapter(name, skill=self.names.index(name))

    # -- export ----------------------------------------------------------------------------
    def to_adapter(self, name: str, skill: int = 0, base_model: BaseModelRef | None = None) -> LoraAdapter:
        """Skill ``skill`` as a :class:`LoraAdapter` (fp32 factors, alpha and rank as trained)."""
        base_model = base_model or self._base
        modules = {p: LoraModule(A=self.A[_key(p)][skill].detach().float().cpu().clone(),
                                 B=self.B[_key(p)][skill].detach().float().cpu().clone(), alpha=self.alpha)
                   for p in self.paths}
        return LoraAdapter(name=name, base_model=base_model, modules=modules, rank=self.rank, alpha=self.alpha)


def _init_a_random(S: int, r: int, d_in: int, d_out: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """PEFT's default: ``A ~ U(-1/√d_in, 1/√d_in)`` (``kaiming_uniform_(a=√5)``, as ``nn.Linear``),
    ``B = 0``, so ΔW = B A starts at 0. Trained briefly, A stays close to its draw: ΔW's row space
    (where Arrow's prototypes live) is then mostly the random one."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.empty(S, r, d_in).uniform_(-bound, bound, generator=gen), torch.zeros(S, d_out, r)


def _init_b_random(S: int, r: int, d_in: int, d_out: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The roles swapped: ``A = 0`` and ``B ~ U(-1/√d_in, 1/√d_in)`` (the bound A has by default,
    so a step moves ΔW = B A by as much as under ``a-random``). ΔW still starts at 0; now
    ``∂L/∂A = scaling · Bᵀ G Xᵀ`` (G: the output gradients, X: the inputs ``[d_in, tokens]``), so
    A's rows, and with them ΔW's row space and Arrow's prototypes, are built from the task's
    input directions rather than drawn at random."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.zeros(S, r, d_in), torch.empty(S, d_out, r).uniform_(-bound, bound, generator=gen)


# factor_init -> (S, r, d_in, d_out, generator) -> (A [S, r, d_in], B [S, d_out, r])
FACTOR_INITS = {"a-random": _init_a_random, "b-random": _init_b_random}


def _key(path: str) -> str:
    return path.replace(".", "/")  # ParameterDict keys may not contain dots
