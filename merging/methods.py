"""Merge methods: one task-vector pipeline, each method a configured :class:`MergeSpec`.

Legend: ``n`` sources (adapters or fine-tuned checkpoints), ``N`` entries of one tensor,
flattened. For one tensor the sources' task vectors are stacked, ``τ: [n, N]``, with per-source
weights ``w: [n]``, and every method is these three steps with different parts plugged in:

1. sparsify  ``(τ', c) = S(τ)``: ``c: [n, N]`` is a per-entry coefficient, a 0/1 keep mask
   (TIES' trim, DARE's drop, breadcrumbs) or PCB's balancing score ``β``; ``τ'`` is ``τ``
   rescaled (DARE) or clipped (PCB). See :mod:`quiver.merging.sparsify`.
2. elect     ``a = [sign(w c τ') = σ]`` with ``σ = sign Σᵢ wᵢcᵢτ'ᵢ`` ("total") or
   ``σ = sign Σᵢ sign(wᵢcᵢτ'ᵢ)`` ("frequency"), a zero vote counting as ``+``; without a
   consensus step ``a = 1``.
3. combine   ``τ_m = Σᵢ wᵢ aᵢ cᵢ τ'ᵢ / D`` with ``D = Σᵢ wᵢaᵢ`` ("normalize", mergekit's
   convention; ``D = 0`` counts as 1), ``D = max(Σᵢ aᵢcᵢ, 1e-12)`` (PCB) or ``D = 1``.

The merged weights are ``θ = θ₀ + λ τ_m``; :meth:`MergeSpec.merge` returns ``τ_m`` (before
``λ`` and the base). Thresholds are order statistics of each source's row, taken per tensor
(``scope="tensor"``, as mergekit and PEFT) or over the whole model (``scope="model"``, as the
TIES and PCB papers): see :func:`quiver.merging.order_stats.kth_smallest`. Each tensor is
worked through ``CHUNK`` entries at a time, so temporaries stay small and in cache.

Methods are built by the functions in :data:`METHODS`, whose docstrings give the formulas;
:func:`build` validates the parameters (the boundary) and everything after trusts them.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from quiver.library.errors import ValidationError

from .order_stats import kth_smallest
from .sparsify import Balance, Magnitude, Outliers, RandomDrop, Sparsifier, Stage, Stats

Consensus = Literal["total", "frequency"]
Normalize = Literal["none", "weights", "balance"]
Scope = Literal["tensor", "model"]


# -- the pipeline -------------------------------------------------------------------------------
CHUNK = 1 << 16  # entries of each row processed at once: [n, CHUNK] float32 stays in cache


@dataclass(frozen=True)
class MergeSpec:
    """A merge method with its parameters: the sparsifier, consensus and normalisation plugged
    into the pipeline of the module docstring, plus ``λ`` (``lambda_``) for ``θ₀ + λτ_m``."""

    method: str
    sparsifier: Sparsifier | None = None
    consensus: Consensus | None = None
    normalize: Normalize = "none"
    lambda_: float = 1.0
    scope: Scope = "tensor"
    seed: int = 0
    params: dict = field(default_factory=dict, compare=False)  # as given, for provenance

    @property
    def is_linear(self) -> bool:
        """A fixed linear combination ``Σ cᵢτᵢ`` (so LoRA factors can be concatenated)."""
        return self.sparsifier is None and self.consensus is None and self.normalize != "balance"

    def coefficients(self, weights: torch.Tensor) -> torch.Tensor:
        """For linear specs, the ``cᵢ`` of ``λτ_m = Σ cᵢτᵢ``: ``λwᵢ / D``."""
        total = weights.sum()
        divisor = total if self.normalize == "weights" and total != 0 else 1.0
        return self.lambda_ * weights / divisor

    def model_stats(self, stacks: Callable[[], Iterable[torch.Tensor]]) -> Stats | None:
        """Whole-model order statistics (``scope="model"``) from a stream of ``[n, ...]``
        task-vector stacks, one per tensor; ``None`` when thresholds are per tensor."""
        if self.scope == "tensor" or self.sparsifier is None:
            return None
        return self.stats(lambda: (chunk for stack in stacks() for chunk in _columns(stack)))

    def tensor_stats(self, stack: torch.Tensor) -> Stats:
        """The order statistics of one tensor's task vectors ``stack: [n, *shape]``."""
        return self.stats(lambda: _columns(stack))

    def stats(self, chunks: Callable[[], Iterable[torch.Tensor]]) -> Stats:
        """The sparsifier's order statistics over ``[n, C]`` chunks of task vectors."""
        stats: Stats = ()
        for stage in self.sparsifier.stages:
            stats = (*stats, kth_smallest(chunks, stage.ranks, _values(stage, stats)))
        return stats

    def merge(
        self, stack: torch.Tensor, weights: torch.Tensor, stats: Stats | None = None, key: str = ""
    ) -> torch.Tensor:
        """``τ_m`` of one tensor from the stacked task vectors ``stack: [n, *shape]``.

        ``stats`` are :meth:`model_stats` for ``scope="model"`` (else computed from this tensor);
        ``key`` (the tensor's name) seeds random drops, so they do not depend on the order in
        which tensors are merged. Works through ``CHUNK`` entries at a time.
        """
        if self.sparsifier is not None and stats is None:
            stats = self.tensor_stats(stack)
        # the CPU generator keeps 32 bits of its seed: hash the seed and the name into 32 bits
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{key}".encode()))
        weights = weights.float()
        merged = torch.empty(stack[0].numel())  # [N]
        start = 0
        for chunk in _columns(stack):
            tau, coeff = chunk.float(), None
            if self.sparsifier is not None:
                tau, coeff = self.sparsifier.apply(tau, stats, generator)
            end = start + chunk.shape[1]
            merged[start:end] = combine(tau, coeff, weights, self.consensus, self.normalize)
            start = end
        return merged.view(stack.shape[1:])


def _columns(stack: torch.Tensor) -> Iterator[torch.Tensor]:
    """``[n, *shape]`` → views ``[n, ≤ CHUNK]`` over the flattened entries, in order."""
    flat = stack.flatten(1)
    for start in range(0, flat.shape[1], CHUNK):
        yield flat[:, start : start + CHUNK]


def _values(stage: Stage, stats: Stats) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda chunk: stage.values(chunk.float(), stats)


def combine(
    tau: torch.Tensor,
    coeff: torch.Tensor | None,
    weights: torch.Tensor,
    consensus: Consensus | None,
    normalize: Normalize,
) -> torch.Tensor:
    """Steps 2-3: ``τ, c: [n, C]``, ``w: [n]`` → ``τ_m = Σᵢ wᵢaᵢcᵢτᵢ / D: [C]``."""
    contrib = tau * weights[:, None]  # [n, C], a new tensor: updated in place below
    if coeff is not None:
        contrib.mul_(coeff)
    agree = None if consensus is None else elect(contrib, consensus)  # [n, C] bool
    if agree is not None:
        contrib.mul_(agree)
    merged = contrib.sum(dim=0)
    if normalize == "weights":
        divisor = weights.sum() if agree is None else weights @ agree.to(weights.dtype)  # Σᵢwᵢaᵢ
        return merged / torch.where(divisor == 0, 1.0, divisor)
    if normalize == "balance":  # PCB, which has no consensus step
        return merged / coeff.sum(dim=0).clamp_min(1e-12)
    return merged


def elect(contrib: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """Sign election on ``contrib: [n, C]`` → ``agree: [n, C]`` bool: nonzero entries with the
    sign of the weighted sum ("total") or of the vote count ("frequency"), ties counting as +."""
    votes = contrib.sum(dim=0) if consensus == "total" else contrib.sign().sum(dim=0)
    return contrib * torch.where(votes >= 0, 1.0, -1.0) > 0


# -- the methods ----------------------------------------------------------------------------------
def linear(normalize: bool = True, lambda_: float = 1.0) -> MergeSpec:
    """Weighted average: ``τ_m = Σᵢ wᵢτᵢ / Σᵢ wᵢ`` (``Σᵢ wᵢτᵢ`` with ``normalize=False``)."""
    return MergeSpec("linear", normalize=_norm(normalize), lambda_=lambda_)


def task_arithmetic(lambda_: float = 1.0) -> MergeSpec:
    """Task arithmetic (Ilharco et al. 2023): ``θ = θ₀ + λ Σᵢ wᵢτᵢ``."""
    return MergeSpec("task_arithmetic", lambda_=lambda_)


def ties(
    density: float = 0.2,
    consensus: Consensus = "total",
    scope: Scope = "tensor",
    normalize: bool = True,
    lambda_: float = 1.0,
) -> MergeSpec:
    """TIES (Yadav et al. 2023): trim, elect sign, disjoint mean.

    ``τ̂ᵢ = τᵢ ⊙ [|τᵢ| ≥ tᵢ]`` (``tᵢ``: the top-``density`` magnitude of source i, per tensor or
    over the whole model), ``σ = sign Σᵢ wᵢτ̂ᵢ`` (or by frequency),
    ``τ_m = Σᵢ wᵢτ̂ᵢ[sign τ̂ᵢ = σ] / Σᵢ wᵢ[sign τ̂ᵢ = σ]``.
    """
    return MergeSpec("ties", Magnitude(density), consensus, _norm(normalize), lambda_, scope=scope)


def dare_linear(
    density: float = 0.5, seed: int = 0, normalize: bool = False, lambda_: float = 1.0
) -> MergeSpec:
    """DARE (Yu et al. 2024) then a weighted sum: ``τ_m = Σᵢ wᵢ mᵢτᵢ/(1−p)``,
    ``mᵢ ~ Bernoulli(1−p)``, ``1 − p = density`` (normalised by ``Σᵢ wᵢ`` if asked)."""
    return MergeSpec("dare_linear", RandomDrop(density), None, _norm(normalize), lambda_, seed=seed)


def dare_ties(
    density: float = 0.5,
    seed: int = 0,
    consensus: Consensus = "total",
    normalize: bool = False,
    lambda_: float = 1.0,
) -> MergeSpec:
    """DARE's drop and rescale, then TIES' sign election:
    ``τ̂ᵢ = mᵢτᵢ/(1−p)``, ``τ_m = Σᵢ wᵢτ̂ᵢ[sign τ̂ᵢ = σ]`` (÷ ``Σᵢ wᵢ[sign τ̂ᵢ = σ]`` if normalised)."""
    return MergeSpec(
        "dare_ties", RandomDrop(density), consensus, _norm(normalize), lambda_, seed=seed
    )


def breadcrumbs(
    density: float = 0.9,
    gamma: float = 0.01,
    consensus: Consensus | None = None,
    scope: Scope = "tensor",
    normalize: bool = False,
    lambda_: float = 1.0,
) -> MergeSpec:
    """Model Breadcrumbs (Davari & Belilovsky 2023): ``τ_m = Σᵢ wᵢ τᵢ ⊙ [lᵢ ≤ |τᵢ| ≤ hᵢ]``,
    dropping the top ``gamma`` and the smallest entries so that ``density`` remain (see
    :class:`Outliers`); with ``consensus`` it is breadcrumbs-TIES."""
    return MergeSpec(
        "breadcrumbs", Outliers(density, gamma), consensus, _norm(normalize), lambda_, scope=scope
    )


def pcb(
    ratio: float = 0.1, clip: float = 1e-4, scope: Scope = "model", lambda_: float = 1.0
) -> MergeSpec:
    """PCB-Merging (Du et al. 2024): ``τ_m = Σᵢ wᵢ βᵢ⊙τ̃ᵢ / Σᵢ βᵢ``, ``θ = θ₀ + λτ_m``, with the
    balancing scores ``β`` and clipped ``τ̃`` of :class:`Balance`; the weights are the paper's
    per-task ``λᵢ`` (tune them with :func:`quiver.merging.search_pcb_coefficients`). The
    authors flatten the whole model, hence ``scope="model"`` by default."""
    return MergeSpec("pcb", Balance(ratio, clip), None, "balance", lambda_, scope=scope)


def magnitude_prune(
    density: float = 0.2, scope: Scope = "tensor", lambda_: float = 1.0
) -> MergeSpec:
    """Magnitude pruning then a weighted sum (PEFT's ``magnitude_prune``):
    ``τ_m = Σᵢ wᵢ τᵢ ⊙ [|τᵢ| ≥ tᵢ]``."""
    return MergeSpec("magnitude_prune", Magnitude(density), None, "none", lambda_, scope=scope)


def _norm(normalize: bool) -> Normalize:
    return "weights" if normalize else "none"


METHODS: dict[str, Callable[..., MergeSpec]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "pcb": pcb,
    "magnitude_prune": magnitude_prune,
}


# -- validation (the boundary) ------------------------------------------------------------------
_RANGES = {  # parameter -> (test, description)
    "density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gamma": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "clip": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "lambda_": (math.isfinite, "finite"),
}
_CHOICES = {
    "consensus": ("total", "frequency"),
    "scope": ("tensor", "model"),
}


def build(method: str, **params) -> MergeSpec:
    """The :class:`MergeSpec` of a registered method, its parameters checked.

    Raises :class:`~quiver.library.errors.ValidationError` naming the valid methods, the
    method's parameters, or the allowed range of a value.
    """
    if method not in METHODS:
        raise ValidationError(
            f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    builder = METHODS[method]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValidationError(
            f"merge method {method!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters: {', '.join(accepted)}"
        )
    for name, value in params.items():
        _check(method, name, value, accepted[name].default)
    defaults = {name: p.default for name, p in accepted.items()}
    return replace(builder(**params), params={**defaults, **params})


def _check(method: str, name: str, value, default) -> None:
    if name in _CHOICES:
        allowed = _CHOICES[name] + ((None,) if default is None else ())
        if value not in allowed:
            raise ValidationError(f"{method}: {name} must be one of {allowed}, got {value!r}")
    elif name == "normalize":
        if not isinstance(value, bool):
            raise ValidationError(f"{method}: normalize must be true or false, got {value!r}")
    elif name == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValidationError(f"{method}: seed must be a non-negative integer, got {value!r}")
    else:
        test, allowed = _RANGES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise ValidationError(f"{method}: {name} must be {allowed}, got {value!r}")


def check_weights(weights: Sequence[float] | None, count: int, what: str) -> torch.Tensor:
    """Per-source weights as ``[n]`` float32 (all ones by default), or a clear error."""
    if weights is None:
        return torch.ones(count)
    weights = list(weights)
    if len(weights) != count:
        raise ValidationError(f"got {len(weights)} weights for {count} {what}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValidationError(f"weights must be finite numbers, got {weights}")
    if all(w == 0 for w in weights):
        raise ValidationError(f"weights are all zero ({weights}): the merge would change nothing")
    return torch.tensor(weights, dtype=torch.float32)


def merge_tensors(
    tensors: Sequence[torch.Tensor] | Mapping[str, Sequence[torch.Tensor]],
    method: str = "ties",
    weights: Sequence[float] | None = None,
    **params,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The merged task vector ``τ_m`` (before ``λ`` and the base) of ``n`` task vectors.

    ``tensors`` is one tensor per source (all one shape) → one tensor, or a model as
    ``{name: [one tensor per source]}`` → ``{name: τ_m}`` (``scope="model"`` then takes its
    thresholds over all of it). ``params`` are the method's (see :data:`METHODS`).
    """
    spec = build(method, **params)
    if not isinstance(tensors, Mapping):
        count = len(tensors)
        return spec.merge(stack_task_vectors(tensors), check_weights(weights, count, "tensors"))
    counts = {len(group) for group in tensors.values()}
    if len(counts) != 1:
        raise ValidationError("every tensor of the model needs one task vector per source")
    w = check_weights(weights, counts.pop(), "sources")
    stats = spec.model_stats(lambda: (stack_task_vectors(group) for group in tensors.values()))
    return {
        key: spec.merge(stack_task_vectors(group), w, stats, key) for key, group in tensors.items()
    }


def stack_task_vectors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n, *shape]`` float32 from one task vector per source (all one shape)."""
    if not tensors:
        raise ValidationError("nothing to merge: no task vectors given")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValidationError(f"task vectors of one tensor differ in shape: {sorted(shapes)}")
    return torch.stack([t.float() for t in tensors])
