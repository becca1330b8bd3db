"""Trainable LoRA factors attached to a model by forward hooks: one adapter, or an inventory of
skills mixed per example with head splitting (MHR / Poly).

Index legend: Bt = batch rows, L = sequence length, S = skills, H = heads (``n_splits``),
r = rank. At each target ``nn.Linear`` (d_in → d_out) skill s holds ``A[s]: [r, d_in]`` and
``B[s]: [d_out, r]`` (PEFT orientation; ``scaling = alpha / r``).

Mixing (MHR, Caccia et al. 2023): d_in is cut into H equal blocks for A and d_out into H equal
blocks for B; head h mixes its own block of every skill with its own weights ``w[b, h, :]``:

    A_mix[b][:, blk_h(d_in)]  = Σ_s w[b,h,s] · A[s][:, blk_h(d_in)]
    B_mix[b][blk_h(d_out), :] = Σ_s w[b,h,s] · B[s][blk_h(d_out), :]
    y[b] = base(x[b]) + scaling · B_mix[b] A_mix[b] x[b]

Poly is H = 1; a plain LoRA is S = 1 with weight 1 (no weights needed). The hooks do not change
the base model's parameters; :meth:`LoraParams.detach` removes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quiver.library import BaseModelRef, LoraAdapter, LoraModule, fingerprint
from quiver.library.base_model import linear_shapes, model_id_of


def target_paths(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full paths of the ``nn.Linear`` modules whose last name is in ``targets`` (or that equal
    a full path in ``targets``), sorted; a clear error when nothing matches."""
    wanted = set(targets)
    paths = sorted(n for n in linear_shapes(model)
                   if (n in wanted or n.rsplit(".", 1)[-1] in wanted) and not n.endswith("lm_head"))
    if not paths:
        raise ValueError(f"no nn.Linear in the model matches target modules {sorted(wanted)}")
    return paths


class LoraParams(nn.Module):
    """Trainable skills at the target linears of ``model`` (see the module docstring).

    ``init``: adapters to start from, one per skill (same targets; their rank must equal
    ``rank``); else A is Kaiming-uniform and B zero (PEFT's default), seeded by ``seed``.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16.0,
                 n_skills: int = 1, n_splits: int = 1, dropout: float = 0.0,
                 init: Sequence[LoraAdapter] | None = None, seed: int = 0):
        super().__init__()
        if rank < 1 or n_skills < 1 or n_splits < 1:
            raise ValueError(f"rank, n_skills and n_splits must be >= 1 (got {rank}, {n_skills}, {n_splits})")
        self.paths = target_paths(model, targets)
        self.rank, self.alpha, self.n_skills, self.n_splits = rank, float(alpha), n_skills, n_splits
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for path in self.paths:
            lin = model.get_submodule(path)
            d_out, d_in = lin.out_features, lin.in_features
            if d_in % n_splits or d_out % n_splits:
                raise ValueError(f"n_splits={n_splits} does not divide {path}'s widths ({d_in} -> {d_out})")
            A = torch.empty(n_skills, rank, d_in)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT do
            A.uniform_(-bound, bound, generator=gen)
            self.A[_key(path)] = nn.Parameter(A)
            self.B[_key(path)] = nn.Parameter(torch.zeros(n_skills, d_out, rank))
        if init is not None:
            self._load_init(list(init))
        self.weights: Tensor | None = None  # [Bt, H, S] mixing weights of the current batch
        self._hooks: list = []
        self._model = [model]  # not a submodule: the base model's parameters are not ours
        device = next(model.parameters()).device
        self.to(device)
        self.attach()

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

    # -- hooks -----------------------------------------------------------------------------
    def attach(self) -> None:
        if self._hooks:
            return
        model = self._model[0]
        for path in self.paths:
            self._hooks.append(model.get_submodule(path).register_forward_hook(self._hook(path)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, path: str):
        def hook(module, args, out):
            return out + self.delta(path, args[0]).to(out.dtype)
        return hook

    def set_weights(self, weights: Tensor | None) -> None:
        """Mixing weights ``[Bt, H, S]`` for the next forward calls (None: a single skill)."""
        if weights is not None and tuple(weights.shape[1:]) != (self.n_splits, self.n_skills):
            raise ValueError(f"weights must be [Bt, {self.n_splits}, {self.n_skills}]; got {tuple(weights.shape)}")
        self.weights = weights

    def delta(self, path: str, x: Tensor) -> Tensor:  # x: [Bt, L, d_in] -> [Bt, L, d_out]
        A, B = self.A[_key(path)], self.B[_key(path)]  # [S, r, d_in], [S, d_out, r]
        x = self.dropout(x).to(A.dtype)
        if self.weights is None:
            if self.n_skills != 1:
                raise RuntimeError("LoraParams with several skills needs set_weights() before a forward")
            return (x @ A[0].T) @ B[0].T * self.scaling
        w = self.weights.to(A.dtype)  # [Bt, H, S]
        S, r, d_in = A.shape
        H, d_out = self.n_splits, B.shape[1]
        A_mix = torch.einsum("bhs,srhd->brhd", w, A.view(S, r, H, d_in // H)).reshape(-1, r, d_in)
        B_mix = torch.einsum("bhs,shor->bhor", w, B.view(S, H, d_out // H, r)).reshape(-1, d_out, r)
        h = torch.einsum("bld,brd->blr", x, A_mix)
        return torch.einsum("blr,bor->blo", h, B_mix) * self.scaling

    # -- export ----------------------------------------------------------------------------
    def to_adapter(self, name: str, skill: int = 0, base_model: BaseModelRef | None = None) -> LoraAdapter:
        """Skill ``skill`` as a :class:`LoraAdapter` (fp32 factors, alpha and rank as trained)."""
        if base_model is None:
            model = self._model[0]
            base_model = BaseModelRef(model_id_of(model), fingerprint(model))
        modules = {p: LoraModule(A=self.A[_key(p)][skill].detach().float().cpu().clone(),
                                 B=self.B[_key(p)][skill].detach().float().cpu().clone(), alpha=self.alpha)
                   for p in self.paths}
        return LoraAdapter(name=name, base_model=base_model, modules=modules, rank=self.rank, alpha=self.alpha)


def _key(path: str) -> str:
    return path.replace(".", "/")  # ParameterDict keys may not contain dots
