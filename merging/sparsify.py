"""Step 1 of the merge pipeline: sparsifiers, the part of a method that decides per entry.

A sparsifier maps the stacked task vectors of a chunk of one tensor, ``τ: [n, C]``, to
``(τ', c)``: ``c`` is a keep mask (TIES' trim, DARE's drop, breadcrumbs) or PCB's balancing
score ``β``. Its thresholds are order statistics of each source's row, computed beforehand by
``stages`` (per tensor or over the whole model: see :mod:`quiver.merging.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

Stats = tuple[torch.Tensor, ...]  # one [n, k] tensor of order statistics per stage


@dataclass(frozen=True)
class Stage:
    """One order-statistics pass: per-entry ``values(τ, earlier stats) -> [n, N]`` and the
    0-based ascending ``ranks(N)`` wanted from each source's row."""

    values: Callable[[torch.Tensor, Stats], torch.Tensor]
    ranks: Callable[[int], list[int]]


class Sparsifier(Protocol):
    """Step 1, entry by entry given the stages' statistics:
    ``apply(τ: [n, C], stats, generator) -> (τ', c)`` with ``c: [n, C]`` bool or float."""

    stages: tuple[Stage, ...]

    def apply(
        self, tau: torch.Tensor, stats: Stats, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _keep_count(density: float, numel: int) -> int:
    """``max(1, ⌊density·N⌋)``: a positive density never empties a tensor."""
    return max(1, int(density * numel))


def _magnitudes(tau: torch.Tensor, stats: Stats) -> torch.Tensor:
    return tau.abs()


@dataclass(frozen=True)
class Magnitude:
    """Keep each source's top ``density`` entries by magnitude: ``c = [|τ| ≥ t]``, ``t`` the
    ``max(1, ⌊density·N⌋)``-th largest ``|τ|`` (entries tied with ``t`` are all kept)."""

    density: float

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(_magnitudes, lambda n: [n - _keep_count(self.density, n)]),)

    def apply(self, tau, stats, generator):
        return tau, tau.abs() >= stats[0]


@dataclass(frozen=True)
class Outliers:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by magnitude (⌊γN⌋ entries) and
    enough of the smallest to keep ``K = max(1, ⌊density·N⌋)`` entries, i.e. keep ascending
    magnitude ranks ``[b, b + K)`` with ``b = max(0, N − K − ⌊γN⌋)``. When ``⌊γN⌋ = 0`` (a
    tiny tensor) nothing is dropped from the top; mergekit before 0.1.5 sliced ``[b:-0]`` and
    zeroed such tensors entirely."""

    density: float
    gamma: float

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(_magnitudes, self._ranks),)

    def _ranks(self, numel: int) -> list[int]:
        keep = _keep_count(self.density, numel)
        bottom = max(0, numel - keep - int(self.gamma * numel))
        return [bottom, bottom + keep - 1]

    def apply(self, tau, stats, generator):
        magnitude = tau.abs()
        return tau, (magnitude >= stats[0][:, :1]) & (magnitude <= stats[0][:, 1:])


@dataclass(frozen=True)
class RandomDrop:
    """DARE: keep each entry with probability ``density = 1 − p`` and rescale the survivors
    exactly: ``c ~ Bernoulli(1 − p)``, ``τ' = τ / (1 − p)`` (mergekit instead rescales to the
    original L1 norm when ``rescale: true``)."""

    density: float

    @property
    def stages(self) -> tuple[Stage, ...]:
        return ()

    def keep_mask(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return torch.bernoulli(torch.full(shape, self.density), generator=generator)

    def apply(self, tau, stats, generator):
        return tau / self.density, self.keep_mask(tau.shape, generator)


@dataclass(frozen=True)
class Balance:
    """PCB's parameter competition balancing (Du et al. 2024), as in the authors' code:

        |τ̃| = clamp(|τ|, q_clip, q_{1−clip})                     outliers clipped, per source
        intra = exp(n · minmax(|τ̃|)²)                             self-competition
        inter = tanh(τ ⊙ Σⱼ τⱼ)                                   cross-task competition
        s = intra ⊙ inter,  β = minmax(clamp(s, q_{1−ratio}, max s))   keep the top ``ratio``
        τ' = sign(τ) ⊙ |τ̃|,  c = β

    ``q_x`` is the value at ascending rank ``⌊N·x⌋`` of the source's row (``⌊N·(1−clip) − 1⌋``
    for the upper clip, as in the reference), minmax maps ``[lo, hi]`` to ``[0, 1]`` (0 where
    ``hi = lo``, where the reference divides by zero). Entries below the ``1 − ratio`` score
    quantile get ``β = 0``.
    """

    ratio: float
    clip: float

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (
            Stage(_magnitudes, self._clip_ranks),
            Stage(self._scores, lambda n: [int(n * (1 - self.ratio)), n - 1]),
        )

    def _clip_ranks(self, numel: int) -> list[int]:
        return [int(numel * self.clip), int(numel * (1 - self.clip) - 1)]

    def _scores(self, tau: torch.Tensor, stats: Stats) -> torch.Tensor:
        low, high = stats[0][:, :1], stats[0][:, 1:]
        intra = torch.exp(tau.shape[0] * _minmax(tau.abs().clamp(low, high), low, high) ** 2)
        inter = torch.tanh(tau * tau.sum(dim=0))
        return intra * inter  # [n, C]

    def apply(self, tau, stats, generator):
        low, high = stats[0][:, :1], stats[0][:, 1:]
        score_low, score_high = stats[1][:, :1], stats[1][:, 1:]
        beta = _minmax(self._scores(tau, stats).clamp(score_low, score_high), score_low, score_high)
        return tau.sign() * tau.abs().clamp(low, high), beta


def _minmax(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), 0.0)
