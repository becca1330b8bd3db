"""PCB's coefficient search: per-source ``λᵢ`` tuned by a gradient-free optimiser.

In PCB-Merging, ``τ_m(λ) = Σᵢ λᵢ βᵢ⊙τ̃ᵢ / Σⱼ βⱼ`` and neither the balancing scores ``β`` nor the
clipped ``τ̃`` depend on ``λ``. They are computed once, ``Cᵢ = βᵢ⊙τ̃ᵢ / Σⱼ βⱼ``, and each
candidate costs one weighted sum per tensor, ``τ_m(λ) = Σᵢ λᵢ Cᵢ``. The caller scores a
candidate (e.g. accuracy of ``θ₀ + τ_m`` on a few validation examples); nevergrad's ``NGOpt``
over the box ``[0.8, 1.3]ⁿ`` from ``λ = 1`` with 100 evaluations is the authors' setting.
When the candidates are scored in batches (``batch > 1``, e.g. in parallel on a cluster), the
default optimiser is ``TwoPointsDE``, a differential evolution whose population gives a batch
of candidates at once: NGOpt told it has several workers picks a meta-model optimiser that
fails with numpy 2 (a scalar conversion error) and leaves a thread that blocks the interpreter's exit.
``nevergrad`` is an optional dependency, imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from quiver.library.adapter import LoraAdapter
from quiver.library.errors import ValidationError

from .inputs import check_adapters
from .methods import build, stack_task_vectors

Evaluate = Callable[[dict[str, torch.Tensor]], float]


@dataclass(frozen=True)
class CoefficientSearch:
    lambdas: list[float]  # one per source: pass as ``weights`` to ``merge(..., method="pcb")``
    score: float  # evaluate() of the merge with these lambdas
    evaluations: int


def task_vectors(adapters: Sequence[LoraAdapter]) -> dict[str, list[torch.Tensor]]:
    """``{module path: [ΔWᵢ = sᵢ Bᵢ Aᵢ per adapter]}`` (dense: for searches on small models or
    on a chosen subset of modules)."""
    check_adapters(adapters)
    return {path: [a.delta(path) for a in adapters] for path in adapters[0].modules}


class PcbParts:
    """PCB's per-source parts ``Cᵢ = βᵢ⊙τ̃ᵢ / Σⱼ βⱼ`` of every tensor, computed once; a candidate
    ``λ`` then costs one weighted sum per tensor, :meth:`merged`."""

    def __init__(self, task_vectors: Mapping[str, Sequence[torch.Tensor]], *, ratio: float = 0.1,
                 clip: float = 1e-4, scope: str = "model"):
        self.parts = _pcb_parts(task_vectors, build("pcb", ratio=ratio, clip=clip, scope=scope))
        self.count = next(iter(self.parts.values())).shape[0]

    def merged(self, lambdas: Sequence[float]) -> dict[str, torch.Tensor]:
        """``{name: τ_m(λ) = Σᵢ λᵢ Cᵢ}``."""
        if len(lambdas) != self.count:
            raise ValidationError(f"{len(lambdas)} coefficients for {self.count} sources")
        lam = torch.tensor([float(x) for x in lambdas])  # [n]
        return {name: torch.tensordot(lam, part, dims=1) for name, part in self.parts.items()}


def search_pcb_coefficients(
    task_vectors: Mapping[str, Sequence[torch.Tensor]],
    evaluate: Evaluate,
    *,
    ratio: float = 0.1,
    clip: float = 1e-4,
    scope: str = "model",
    bounds: tuple[float, float] = (0.8, 1.3),
    init: float = 1.0,
    budget: int = 100,
    optimizer: str | None = None,
    seed: int = 0,
    batch: int = 1,
) -> CoefficientSearch:
    """Maximise ``evaluate({name: τ_m(λ)})`` over ``λ ∈ [bounds]ⁿ`` with nevergrad.

    ``task_vectors`` is ``{name: [τᵢ per source]}``; ``evaluate`` receives the merged task
    vectors (before the base; the global ``λ`` is 1) and returns a score, higher is better.
    ``batch``: candidates the optimiser proposes at once; ``optimizer``: a nevergrad
    optimiser's name (default: NGOpt, or TwoPointsDE when ``batch > 1``; see
    :func:`search_coefficients`).
    """
    check_search(bounds, init, budget, optimizer, batch)
    parts = PcbParts(task_vectors, ratio=ratio, clip=clip, scope=scope)
    return search_coefficients(parts.count, lambda cands: [float(evaluate(parts.merged(c))) for c in cands],
                               bounds=bounds, init=init, budget=budget, optimizer=optimizer, seed=seed, batch=batch)


def default_optimizer(batch: int) -> str:
    return "NGOpt" if batch == 1 else "TwoPointsDE"


def check_search(bounds: tuple[float, float], init: float, budget: int, optimizer: str | None,
                 batch: int = 1) -> None:
    """The search's settings, checked before any work (a clear error for each)."""
    nevergrad = _import_nevergrad()
    low, high = bounds
    if not low < high or not low <= init <= high:
        raise ValidationError(
            f"need lower < upper bound and init within them, got {bounds}, {init}"
        )
    if not isinstance(budget, int) or budget < 1:
        raise ValidationError(f"budget must be a positive integer, got {budget!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValidationError(f"batch must be a positive integer, got {batch!r}")
    if optimizer is not None and optimizer not in nevergrad.optimizers.registry:
        raise ValidationError(f"unknown nevergrad optimizer {optimizer!r}")


def search_coefficients(
    count: int,
    score_batch: Callable[[list[list[float]]], Sequence[float]],
    *,
    bounds: tuple[float, float] = (0.8, 1.3),
    init: float = 1.0,
    budget: int = 100,
    optimizer: str | None = None,
    seed: int = 0,
    batch: int = 1,
) -> CoefficientSearch:
    """The search loop over ``λ ∈ [bounds]^count`` alone: ``score_batch`` scores a list of
    candidates (higher is better), which lets the caller evaluate them where it likes (in this
    process, one after another, or as parallel tasks on a cluster).

    The optimiser is told it has ``batch`` workers and proposes that many candidates before it
    hears their scores; with the same ``batch`` and ``seed`` the candidates, and so the result,
    depend only on the scores, not on where or in which order they were computed. The last
    call scores the recommendation alone (``evaluations = budget + 1``)."""
    check_search(bounds, init, budget, optimizer, batch)
    nevergrad = _import_nevergrad()
    low, high = bounds
    space = nevergrad.p.Array(init=[init] * count, lower=low, upper=high)
    space.random_state.seed(seed)
    name = optimizer or default_optimizer(batch)
    search = nevergrad.optimizers.registry[name](parametrization=space, budget=budget, num_workers=batch)
    done = 0
    while done < budget:
        asked = [search.ask() for _ in range(min(batch, budget - done))]
        scores = list(score_batch([[float(x) for x in c.value] for c in asked]))
        if len(scores) != len(asked):
            raise RuntimeError(f"score_batch returned {len(scores)} scores for {len(asked)} candidates")
        for cand, score in zip(asked, scores):
            search.tell(cand, -float(score))  # nevergrad minimises
        done += len(asked)
    lambdas = [float(x) for x in search.provide_recommendation().value]
    return CoefficientSearch(lambdas, float(score_batch([lambdas])[0]), budget + 1)


def _pcb_parts(task_vectors, spec) -> dict[str, torch.Tensor]:
    """``{name: C: [n, *shape]}`` with ``Cᵢ = βᵢ⊙τ̃ᵢ / max(Σⱼ βⱼ, 1e-12)``."""
    stacks = {name: stack_task_vectors(group) for name, group in task_vectors.items()}
    if len({s.shape[0] for s in stacks.values()}) != 1:
        raise ValidationError("every tensor needs one task vector per source")
    model_stats = spec.model_stats(lambda: iter(stacks.values()))
    parts = {}
    for name, stack in stacks.items():
        stats = spec.tensor_stats(stack) if model_stats is None else model_stats
        tau, beta = spec.sparsifier.apply(stack.flatten(1), stats, None)  # [n, N] each
        parts[name] = (beta * tau / beta.sum(dim=0).clamp_min(1e-12)).view(stack.shape)
    return parts


def _import_nevergrad():
    try:
        import nevergrad
    except ImportError as e:
        raise ImportError(
            "the PCB coefficient search needs nevergrad: pip install nevergrad"
        ) from e
    return nevergrad
