"""Low-rank factors of merged deltas: exact concatenation, and truncated SVDs.

Every function returns :class:`Factors` ``A: [r, d_in]``, ``B: [d_out, r]`` with ``B @ A``
approximating a target ``ΔW: [d_out, d_in]`` (scaling folded in, so the adapter's scaling is 1),
and ``energy = ‖B A‖²_F / ‖ΔW‖²_F``, the fraction of the target's energy the factors keep
(1 when exact; 1 for ``ΔW = 0``). Truncations keep ``B = U√S``, ``A = √S Vᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

OVERSAMPLE = 8  # extra columns of the randomized range finder
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class Factors:
    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    energy: float


def concat(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> Factors:
    """Exactly ``Σᵢ cᵢ Bᵢ Aᵢ`` at rank ``Σᵢ rᵢ``: ``A = [c₁A₁; …; cₙAₙ]``, ``B = [B₁ … Bₙ]``."""
    A = torch.cat([c * a.float() for c, a in zip(coefficients, As)], dim=0)  # [Σr, d_in]
    B = torch.cat([b.float() for b in Bs], dim=1)  # [d_out, Σr]
    return Factors(A, B, 1.0)


def truncate_factored(A: torch.Tensor, B: torch.Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of ``ΔW = B A`` (``A: [R, d_in]``, ``B: [d_out, R]``)
    without forming ``ΔW``: ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, ``R_B R_Aᵀ = U' S V'ᵀ`` (an
    ``R × R`` SVD), so ``ΔW = (Q_B U') S (Q_A V')ᵀ``."""
    q_b, r_b = torch.linalg.qr(B.float())  # [d_out, R], [R, R]
    q_a, r_a = torch.linalg.qr(A.float().T)  # [d_in, R], [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return _split(q_b @ u, s, vh @ q_a.T, rank, total=(s**2).sum())


def truncate_dense(delta: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    """Rank-``rank`` factors of a dense ``ΔW: [d_out, d_in]``.

    Randomized SVD (Halko et al. 2011): an orthonormal basis ``Q: [d_out, rank + p]`` of
    ``range(ΔW)`` from ``ΔW G`` and two power iterations, then the SVD of ``Qᵀ ΔW``. The factors
    are the projection ``U_r U_rᵀ ΔW``, so ``energy = Σ_{j<r} σⱼ² / ‖ΔW‖²_F`` is exactly what
    they keep. Falls back to the full SVD when ``rank + p`` reaches ``min(d_out, d_in)``.
    """
    delta = delta.float()
    total = (delta**2).sum()
    width = rank + OVERSAMPLE
    if width >= min(delta.shape):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _split(u, s, vh, rank, total)
    sketch = torch.randn(delta.shape[1], width, generator=generator)  # [d_in, r + p]
    q = torch.linalg.qr(delta @ sketch).Q  # [d_out, r + p]
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(delta.T @ q).Q  # [d_in, r + p]
        q = torch.linalg.qr(delta @ q).Q  # [d_out, r + p]
    u, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)  # [r + p, d_in] → small SVD
    return _split(q @ u, s, vh, rank, total)


def _split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, total: torch.Tensor
) -> Factors:
    root = s[:rank].sqrt()
    kept = (s[:rank] ** 2).sum()
    energy = 1.0 if total == 0 else min(1.0, float(kept / total))
    return Factors(A=root[:, None] * vh[:rank], B=u[:, :rank] * root, energy=energy)
