"""Compressing a library of K LoRA adapters into shared shard pools (k-means over all shard
vectors plus a least-squares correction of B), and expanding them back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from quiver.library.adapter import BaseModelRef, LoraAdapter, LoraModule

from .shards import assemble, group_by_projection, index_dtype


@dataclass(frozen=True)
class CompressConfig:
    """How :func:`compress` sizes and fits the pools.

    Each pool (projection × factor) gets ``pool_size`` shards if given, else
    ``round(budget · M)`` where ``M = K · L · r · l`` is the number of shard vectors it replaces
    (capped at ``M``). k-means runs ``iters`` Lloyd steps from ``restarts`` k-means++ seeds.
    """

    shards_per_vector: int = 2
    pool_size: int | None = None
    budget: float = 1 / 8
    iters: int = 30
    restarts: int = 2
    least_squares: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shards_per_vector < 1 or (self.pool_size is not None and self.pool_size < 1):
            raise ValueError("shards_per_vector and pool_size must be >= 1")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")


@dataclass
class MoSPools:
    """K adapters in pool form.

    ``pools[(proj, f)]: [N, s]``; ``index[(proj, f)]: [K, L, r, l]`` (layers = ``paths[proj]``);
    ``alphas[proj]: [K, L]``; per adapter ``names``, ``use_rslora``.
    """

    base_model: BaseModelRef
    names: list[str]
    paths: dict[str, list[str]]
    pools: dict[tuple[str, str], torch.Tensor]
    index: dict[tuple[str, str], torch.Tensor]
    alphas: dict[str, torch.Tensor]
    use_rslora: list[bool]
    config: CompressConfig = field(default_factory=CompressConfig)

    def storage_bytes(self) -> int:
        """Pool floats (their dtype) + indices at int16 (pools ≤ 32767 shards) or int32 + alphas (fp64)."""
        total = sum(p.numel() * p.element_size() for p in self.pools.values())
        total += sum(i.numel() * torch.empty(0, dtype=index_dtype(self.pools[k].shape[0])).element_size()
                     for k, i in self.index.items())
        return total + sum(a.numel() * a.element_size() for a in self.alphas.values())


def _kmeans(x: torch.Tensor, k: int, iters: int, restarts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means with k-means++ seeding: ``x: [M, s]`` -> ``(centroids [k, s], assign [M])``.

    Minimises ``Σ_m ||x_m - c_{assign_m}||²``; the best of ``restarts`` runs is kept. Empty
    clusters are re-seeded with the worst-fitted points.
    """
    best = None
    for _ in range(restarts):
        c = x[torch.randint(len(x), (1,), generator=g)]
        d2 = torch.cdist(x, c).squeeze(1) ** 2  # [M]
        for _ in range(1, k):  # k-means++: sample ∝ squared distance to the nearest centroid
            if d2.sum() <= 0:
                pick = torch.randint(len(x), (1,), generator=g)
            else:
                pick = torch.multinomial(d2, 1, generator=g)
            c = torch.cat([c, x[pick]])
            d2 = torch.minimum(d2, (torch.cdist(x, x[pick]).squeeze(1)) ** 2)
        for _ in range(iters):
            dist = torch.cdist(x, c)  # [M, k]
            assign = dist.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp(min=1)[:, None]
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                worst = dist.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
                new[empty] = x[worst]
            if torch.equal(new, c):
                break
            c = new
        assign = torch.cdist(x, c).argmin(1)
        err = ((x - c[assign]) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, c, assign)
    return best[1], best[2]


def _check_same_layout(adapters: Sequence[LoraAdapter]) -> int:
    if not adapters:
        raise ValueError("compress needs at least one adapter")
    first = adapters[0]
    ranks = {m.rank for a in adapters for m in a.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"compress needs one rank across all adapters and modules, got ranks {sorted(ranks)}")
    for a in adapters[1:]:
        if set(a.modules) != set(first.modules):
            diff = sorted(set(a.modules) ^ set(first.modules))
            raise ValueError(f"adapter {a.name!r} adapts different modules than {first.name!r}: {diff[:5]}")
        if a.base_model != first.base_model:
            raise ValueError(f"adapter {a.name!r} is for base model {a.base_model.id!r}, "
                             f"{first.name!r} for {first.base_model.id!r}")
        for p, m in a.modules.items():
            if m.A.shape != first.modules[p].A.shape or m.B.shape != first.modules[p].B.shape:
                raise ValueError(f"adapter {a.name!r}, {p}: factor shapes differ from {first.name!r}")
    return ranks.pop()


def compress(adapters: Sequence[LoraAdapter], config: CompressConfig = CompressConfig()) -> tuple[MoSPools, dict]:
    """Compress K LoRA adapters (same modules, one rank) into shared shard pools per projection.

    For each projection type, every adapter's and layer's rank vectors are cut into ``l``
    shards: A's rows ``A[j] = [a_1 | … | a_l]`` and B's columns likewise. Then
      1. A pool ``P_A: [N, s]`` = k-means centroids of all A shards, ``Â`` = gathered centroids;
      2. (``least_squares``) B is refitted to the quantised A in factor space,
         ``B' = argmin_X ||B A - X Â||_F = B A Â^+`` (never forming ΔW);
      3. ``P_B`` = k-means centroids of all shards of ``B'``.
    Returns ``(pools, report)``: ``report["compression_ratio"]`` = original factor bytes /
    :meth:`MoSPools.storage_bytes`; ``report["adapters"][name]`` has the relative Frobenius
    errors ``delta_error = ||ΔW - ΔŴ|| / ||ΔW||`` (over all modules together), ``A_error`` and
    ``B_error`` (of the stacked factors).
    """
    r = _check_same_layout(adapters)
    first = adapters[0]
    shapes = {p: (m.B.shape[0], m.A.shape[1]) for p, m in first.modules.items()}
    groups = group_by_projection(shapes)
    g = torch.Generator().manual_seed(config.seed)
    K, l = len(adapters), config.shards_per_vector
    pools, index, alphas = {}, {}, {}
    for proj, paths in groups.items():
        d_out, d_in = shapes[paths[0]]
        for dim, what in ((d_in, "A (d_in)"), (d_out, "B (d_out)")):
            if dim % l:
                raise ValueError(f"{proj} {what}: shards_per_vector {l} does not divide dimension {dim}")
        L = len(paths)
        A = torch.stack([torch.stack([a.modules[p].A.float() for p in paths]) for a in adapters])  # [K, L, r, d_in]
        B = torch.stack([torch.stack([a.modules[p].B.float() for p in paths]) for a in adapters])  # [K, L, d_out, r]
        alphas[proj] = torch.tensor([[a.modules[p].alpha for p in paths] for a in adapters], dtype=torch.float64)
        M = K * L * r * l
        n = min(config.pool_size or max(1, round(config.budget * M)), M)
        pool_a, assign_a = _kmeans(A.reshape(M, d_in // l), n, config.iters, config.restarts, g)
        A_hat = pool_a[assign_a].reshape(K, L, r, d_in)
        if config.least_squares:  # B' = B A Â^+ = B (A Â^T)(Â Â^T)^+   [K, L, d_out, r]
            B = B @ (A @ A_hat.transpose(-1, -2)) @ torch.linalg.pinv(A_hat @ A_hat.transpose(-1, -2), hermitian=True)
        Bt = B.transpose(-1, -2)  # [K, L, r, d_out]
        pool_b, assign_b = _kmeans(Bt.reshape(M, d_out // l), n, config.iters, config.restarts, g)
        pools[(proj, "A")], pools[(proj, "B")] = pool_a, pool_b
        index[(proj, "A")] = assign_a.reshape(K, L, r, l)
        index[(proj, "B")] = assign_b.reshape(K, L, r, l)
    result = MoSPools(base_model=first.base_model, names=[a.name for a in adapters], paths=groups,
                      pools=pools, index=index, alphas=alphas, use_rslora=[a.use_rslora for a in adapters],
                      config=config)
    original = sum(a.num_parameters() * 4 for a in adapters)  # fp32 factors
    report = {"compression_ratio": original / result.storage_bytes(), "original_bytes": original,
              "pool_bytes": result.storage_bytes(),
              "pool_sizes": {f"{p}.{f}": t.shape[0] for (p, f), t in pools.items()},
              "adapters": {a.name: reconstruction_error(a, expand(result, i)) for i, a in enumerate(adapters)}}
    return result, report


def reconstruction_error(original: LoraAdapter, approx: LoraAdapter) -> dict[str, float]:
    """Relative Frobenius errors over all modules: ``||X - X̂|| / ||X||`` for ΔW, A and B."""
    num = {"delta": 0.0, "A": 0.0, "B": 0.0}
    den = dict(num)
    for p, m in original.modules.items():
        h = approx.modules[p]
        dw = original.delta(p)  # [d_out, d_in], one module at a time
        num["delta"] += float((dw - approx.delta(p)).square().sum())
        den["delta"] += float(dw.square().sum())
        for f, x, y in (("A", m.A, h.A), ("B", m.B, h.B)):
            num[f] += float((x.float() - y.float()).square().sum())
            den[f] += float(x.float().square().sum())
    return {f"{k}_error": math.sqrt(num[k] / den[k]) if den[k] else math.sqrt(num[k]) for k in num}


def expand(pools: MoSPools, i: int, name: str | None = None) -> LoraAdapter:
    """Adapter ``i`` back as dense factors: ``A_k = P_A[I_A[i, k]]`` rows, ``B_k^T = P_B[I_B[i, k]]``."""
    if not 0 <= i < len(pools.names):
        raise IndexError(f"adapter index {i} out of range for {len(pools.names)} compressed adapters")
    modules = {}
    for proj, paths in pools.paths.items():
        A = assemble(pools.pools[(proj, "A")], pools.index[(proj, "A")][i])  # [L, r, d_in]
        Bt = assemble(pools.pools[(proj, "B")], pools.index[(proj, "B")][i])  # [L, r, d_out]
        for k, path in enumerate(paths):
            modules[path] = LoraModule(A=A[k].clone(), B=Bt[k].T.contiguous(),
                                       alpha=float(pools.alphas[proj][i, k]))
    return LoraAdapter(name=name or pools.names[i], base_model=pools.base_model, modules=modules,
                       use_rslora=pools.use_rslora[i])
