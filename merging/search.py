"""PCB's coefficient search: per-source ``λᵢ`` tuned by a gradient-free optimiser.

In PCB-Merging, ``τ_m(λ) = Σᵢ λᵢ βᵢ⊙τ̃ᵢ / Σⱼ βⱼ`` and neither the balancing scores ``β`` nor the
clipped ``τ̃`` depend on ``λ``. They are computed once, ``Cᵢ = βᵢ⊙τ̃ᵢ / Σⱼ βⱼ``, and each
candidate costs one weighted sum per tensor, ``τ_m(λ) = Σᵢ λᵢ Cᵢ``. The caller scores a
candidate (e.g. accuracy of ``θ₀ + τ_m`` on a few validation examples); nevergrad's ``NGOpt``
over the box ``[0.8, 1.3]ⁿ`` from ``λ = 1`` with 100 evaluations is the authors' setting.
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
    optimizer: str = "NGOpt",
    seed: int = 0,
) -> CoefficientSearch:
    """Maximise ``evaluate({name: τ_m(λ)})`` over ``λ ∈ [bounds]ⁿ`` with nevergrad.

    ``task_vectors`` is ``{name: [τᵢ per source]}``; ``evaluate`` receives the merged task
    vectors (before the base; the global ``λ`` is 1) and returns a score, higher is better.
    """
    nevergrad = _import_nevergrad()
    low, high = bounds
    if not low < high or not low <= init <= high:
        raise ValidationError(
            f"need lower < upper bound and init within them, got {bounds}, {init}"
        )
    if not isinstance(budget, int) or budget < 1:
        raise ValidationError(f"budget must be a positive integer, got {budget!r}")
    if optimizer not in nevergrad.optimizers.registry:
        raise ValidationError(f"unknown nevergrad optimizer {optimizer!r}")

    parts = _pcb_parts(task_vectors, build("pcb", ratio=ratio, clip=clip, scope=scope))
    count = next(iter(parts.values())).shape[0]

    def merged(lambdas: Sequence[float]) -> dict[str, torch.Tensor]:
        lam = torch.tensor([float(x) for x in lambdas])  # [n]
        return {name: torch.tensordot(lam, part, dims=1) for name, part in parts.items()}

    space = nevergrad.p.Array(init=[init] * count, lower=low, upper=high)
    space.random_state.seed(seed)
    search = nevergrad.optimizers.registry[optimizer](parametrization=space, budget=budget)
    best = search.minimize(lambda x: -float(evaluate(merged(x))))
    lambdas = [float(x) for x in best.value]
    return CoefficientSearch(lambdas, float(evaluate(merged(lambdas))), budget + 1)


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
