"""MHR and Poly: per-task routing over an inventory of skills, with head splitting.

Index legend: N = requests, H = heads (``n_splits``), S = skills, T = tokens, r = rank.

Multi-Head Routing (Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task
Generalization"); Poly (Ponti et al. 2023) is the case H = 1. The skills are LoRA adapters of one
rank per module, ``A_s: [r, d_in]`` and ``B_s: [d_out, r]`` (scaling folded into B). Each task t
has routing logits ``Z[t]: [H, S]``; d_in is cut into H equal blocks for A and d_out into H equal
blocks for B, and head h mixes its own block of every skill with its own weights:

    w[t, h, s] = σ(Z[t, h, s]) / Σ_s' σ(Z[t, h, s'])            (eval)
    w[t, h, s] = u[h, s]       / Σ_s' u[h, s'],  u ~ RelaxedBernoulli(temperature, logits=Z[t])
                                                                  (training, as in the paper's code)
    A_mix[:, blk_h(d_in)]  = Σ_s w[t,h,s] · A_s[:, blk_h(d_in)]
    B_mix[blk_h(d_out), :] = Σ_s w[t,h,s] · B_s[blk_h(d_out), :]
    y = base(x) + B_mix A_mix x

A request whose task is unknown (not in ``tasks``, or None) gets uniform weights 1/S per head.
The logits start at 0, i.e. uniform mixing, the same as an unknown task.

Runtime: MHR is a per-request router (``per_token = False``; one row per request, repeated
over its tokens) in ``merge-before`` mode, which the runtime executes as
``(Σ_j w_j B_j)(Σ_j w_j A_j) x``. The sources are the skills. With H > 1 the router declares
``head_splits = H`` and routes over the H·S **head views** the runtime builds from them
(:func:`quiver.runtime.head_view`): view (h, s), index h·S + s, is skill s with A's columns
outside block h of d_in and B's rows outside block h of d_out set to zero. Since the blocks of
different heads are disjoint,

    Σ_{h,s} w[h,s] A_s^(h) = A_mix,     Σ_{h,s} w[h,s] B_s^(h) = B_mix

exactly, and merge-before over the views computes MHR's ``B_mix A_mix x``: this is the one
implementation of MHR's mixing, for inference and for training (trainable skills give
differentiable views). The shared rank axis carries no cross-head term: head h's columns of
A_mix and rows of B_mix are still mixed with head h's weights only. Budget: each head's weights
sum to 1, so **a decision row sums to H**. The views cost H times the bank memory and
shrink/expand work of the skills.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import RelaxedBernoulli

from quiver.library import LoraAdapter

from .base import AdapterSource, LearnedRouter, RoutingDecision, RoutingSite

EPS = 1e-12  # as in the paper's code: w / (Σ w + EPS)


class MHR(LearnedRouter):
    """Learned task × head × skill routing logits over ``adapters`` (the skills).

    ``tasks``: the task names the logits cover (row t of ``logits`` = ``tasks[t]``).
    ``n_splits``: H heads (1 = Poly). ``temperature``: of the relaxed Bernoulli used in training
    mode. Per-request tasks arrive through ``prepare(tasks=[...])`` (request i of the next steps =
    request i; a single task applies to every row). A new router is in eval mode (σ weights);
    ``.train()`` switches on the relaxed-Bernoulli sampling.
    """

    per_token = False
    mode = "merge-before"

    def __init__(self, tasks: list[str], n_splits: int = 1, temperature: float = 1.0,
                 adapters: list[str] | None = None):
        super().__init__(adapters)
        tasks = list(tasks)
        if len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"{type(self).__name__}: tasks must be distinct strings, got {tasks}")
        if n_splits < 1:
            raise ValueError(f"{type(self).__name__}: n_splits must be >= 1, got {n_splits}")
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        self.tasks, self.n_splits, self.temperature = tasks, int(n_splits), float(temperature)
        self.head_splits = self.n_splits
        self._index = {t: i for i, t in enumerate(tasks)}
        self.register_parameter("logits", None)  # [n_tasks, H, S], created once S is known
        if self.adapters is not None:
            self._ensure_logits(len(self.adapters))
        self._row_tasks: Tensor | None = None  # int64 [N] task index per batch row, -1 = unknown
        self.train(False)  # deterministic until a trainer switches it to training mode

    @property
    def n_skills(self) -> int | None:
        return None if self.adapters is None else len(self.adapters)

    def _ensure_logits(self, n_skills: int) -> None:
        if self.logits is None:
            self.logits = nn.Parameter(torch.zeros(len(self.tasks), self.n_splits, n_skills))
        elif self.logits.shape[-1] != n_skills:
            raise ValueError(f"{type(self).__name__} has logits for {self.logits.shape[-1]} skills, "
                             f"bound to {n_skills}")

    def add_tasks(self, names: list[str]) -> None:
        """Append routing rows for new tasks (logits 0: uniform mixing), e.g. before MHR-z."""
        new = [t for t in dict.fromkeys(names) if t not in self._index]
        if not new:
            return
        self.tasks += new
        self._index = {t: i for i, t in enumerate(self.tasks)}
        if self.logits is not None:
            old = self.logits.detach()
            rows = old.new_zeros(len(new), *old.shape[1:])
            self.logits = nn.Parameter(torch.cat([old, rows]), requires_grad=self.logits.requires_grad)

    # -- binding -----------------------------------------------------------------------------
    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        super().bind(library, universe)
        _check_skills([library.get(n) for n in self.adapters], self.n_splits)
        self._ensure_logits(len(self.adapters))
        return self.sources

    # -- weights -----------------------------------------------------------------------------
    def task_ids(self, tasks: list[str | None]) -> Tensor:
        """int64 ``[N]``: the row of each task name in ``logits``, -1 for an unknown one or None."""
        return torch.tensor([self._index.get(t, -1) if t is not None else -1 for t in tasks], dtype=torch.int64)

    def weights(self, task_ids: Tensor) -> Tensor:  # task_ids: int64 [N] -> [N, H, S]
        """Mixing weights per request (see the module docstring): sampled in training mode."""
        if self.logits is None:
            raise RuntimeError(f"{type(self).__name__}: bind the router (or give it adapters) first")
        task_ids = task_ids.to(self.logits.device)
        known = task_ids >= 0  # [N]
        Z = self.logits[task_ids.clamp_min(0)] if len(self.tasks) else self.logits.new_zeros(
            task_ids.shape[0], *self.logits.shape[1:])  # [N, H, S]
        if self.training:
            temp = torch.tensor(self.temperature, device=Z.device, dtype=Z.dtype)
            p = RelaxedBernoulli(temp, logits=Z).rsample()
        else:
            p = torch.sigmoid(Z)
        w = p / (p.sum(-1, keepdim=True) + EPS)
        return torch.where(known[:, None, None], w, torch.full_like(w, 1.0 / w.shape[-1]))

    # -- per request -------------------------------------------------------------------------
    def prepare(self, *, prompts: list[str] | None = None, tasks: list[str | None] | None = None) -> None:
        """Task names for the next forward/generate calls: row i = ``tasks[i]``. No tasks: every
        row is unknown (uniform weights)."""
        self._row_tasks = None if tasks is None else self.task_ids(list(tasks))

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        if self.logits is not None and self.logits.device != x.device:
            self.to(x.device)
        # One weight row per prepared request (in training mode: one sample each), then per token;
        # indexing on the device reads nothing back (a CUDA step stays free of synchronisation).
        tasks = self._row_tasks if self._row_tasks is not None else torch.full((1,), -1, dtype=torch.int64)
        w = self.weights(tasks).flatten(1)  # [R, H·S]; column h·S + s
        w = self.request_table(w.to(x.device), site.request_ids, "task")  # [T, H·S]
        w = w.to(x.device, x.dtype)
        idx = torch.arange(w.shape[1], device=x.device).expand(w.shape[0], -1)
        return RoutingDecision(idx, w)

    # -- persistence -------------------------------------------------------------------------
    def config(self) -> dict:
        return {"tasks": list(self.tasks), "n_splits": self.n_splits, "temperature": self.temperature}


class Poly(MHR):
    """MHR with a single head (n_splits = 1): Poly, Ponti et al. 2023."""

    def __init__(self, tasks: list[str], temperature: float = 1.0, adapters: list[str] | None = None):
        super().__init__(tasks, n_splits=1, temperature=temperature, adapters=adapters)

    def config(self) -> dict:
        return {"tasks": list(self.tasks), "temperature": self.temperature}


def _check_skills(skills: list[LoraAdapter], n_splits: int) -> None:
    """One rank per module among the skills; widths divisible by the number of heads."""
    for path in sorted(set().union(*(s.modules for s in skills))):
        mods = {s.name: s.modules[path] for s in skills if path in s.modules}
        ranks = {n: m.rank for n, m in mods.items()}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"MHR mixes factors, so its skills need one rank per module; at {path} "
                             f"they have {ranks}")
        m = next(iter(mods.values()))
        d_in, d_out = m.A.shape[1], m.B.shape[0]
        if d_in % n_splits or d_out % n_splits:
            raise ValueError(f"n_splits={n_splits} does not divide {path}'s widths ({d_in} -> {d_out})")
