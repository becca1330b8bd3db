"""Merge LoRA adapters into one LoRA adapter.

Per module, with ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (``sᵢ`` the scaling of adapter i):

* linear methods (``linear``, ``task_arithmetic``), ``λτ_m = Σᵢ cᵢ ΔWᵢ``, within the rank
  budget (``rank`` is None or ``≥ Σᵢ rᵢ``): exact concatenation ``A = [c₁s₁A₁; …]``,
  ``B = [B₁ … Bₙ]``, so ``B A = Σᵢ cᵢ sᵢ Bᵢ Aᵢ`` exactly. (PEFT's ``add_weighted_adapter``
  with ``linear`` instead averages A and B separately, which is not ``Σᵢ wᵢΔWᵢ``.)
* linear methods over the budget: the best rank-``rank`` approximation, computed from the
  concatenated factors (QR + a small SVD, never forming ``ΔW``).
* every other method: ``λτ_m`` formed densely and truncated to ``rank`` (default: the largest
  rank among the adapters' factors of that module) by a randomized SVD.

The output has scaling 1 (``alpha = r`` per module, no rsLoRA). The retained spectral energy
``‖B A‖²_F / ‖λτ_m‖²_F`` of every module goes into ``adapter.metadata["merge"]`` (with the
method, its parameters, the sources and weights), so it travels with the adapter into a
library; see :func:`retained_energy`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from tqdm import tqdm

from quiver.library.adapter import LoraAdapter, LoraModule, check_name
from quiver.library.errors import ValidationError

from .inputs import check_adapters, delta_shape, warn_degenerate, write_delta
from .lowrank import Factors, concat, truncate_dense, truncate_factored
from .methods import MergeSpec, build, check_weights
from .sparsify import Stats


def merge(
    adapters: Sequence[LoraAdapter],
    method: str = "ties",
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    name: str = "merged",
    progress: bool = False,
    **params,
) -> LoraAdapter:
    """Merge ``adapters`` (one base model, one module set) into one LoRA adapter.

    ``weights`` are per adapter (default 1 each); ``params`` the method's (see
    :data:`quiver.merging.METHODS`); ``rank`` the output rank per module (see the module
    docstring for the default and when the result is exact).
    """
    adapters = list(adapters)
    check_adapters(adapters)
    warn_degenerate([adapter.name for adapter in adapters])
    w = check_weights(weights, len(adapters), "adapters")
    spec = build(method, **params)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValidationError(f"rank must be a positive integer, got {rank!r}")
    check_name(name)

    paths = list(adapters[0].modules)
    stats = spec.model_stats(lambda: (_deltas(adapters, path) for path in paths))
    dtype = adapters[0].modules[paths[0]].A.dtype
    modules: dict[str, LoraModule] = {}
    energy: dict[str, float] = {}
    conflict: dict[str, float] = {}
    for path in tqdm(paths, desc=f"merging ({spec.method})", unit="module", disable=not progress):
        factors = _merge_module(spec, adapters, path, w, rank, stats)
        if len(adapters) > 1:
            conflict[path] = round(sign_conflict_rate(_deltas(adapters, path)), 6)
        r = factors.A.shape[0]
        modules[path] = LoraModule(A=factors.A.to(dtype), B=factors.B.to(dtype), alpha=float(r))
        energy[path] = round(factors.energy, 6)
    report = {
        "method": spec.method,
        "params": spec.params,
        "sources": [adapter.name for adapter in adapters],
        "weights": w.tolist(),
        "rank": rank,
        "retained_energy": energy,
        "min_retained_energy": min(energy.values()),
        "sign_conflict": conflict,
        "mean_sign_conflict": sum(conflict.values()) / len(conflict) if conflict else 0.0,
    }
    return LoraAdapter(
        name=name,
        base_model=adapters[0].base_model,
        modules=modules,
        use_rslora=False,
        metadata={"merge": report},
    )


def sign_conflict_rate(deltas: torch.Tensor) -> float:
    """Among entries where at least two task vectors are non-zero, the fraction whose non-zero
    values disagree in sign (the interference TIES and PCB resolve). ``deltas: [n, ...]``."""
    nonzero = deltas != 0
    pos = (deltas > 0).sum(0)
    neg = (deltas < 0).sum(0)
    contested = nonzero.sum(0) >= 2
    return float(((pos > 0) & (neg > 0)).sum() / contested.sum().clamp_min(1))


def retained_energy(adapter: LoraAdapter) -> dict[str, float]:
    """Per module, the fraction ``‖B A‖²_F / ‖ΔW_merged‖²_F`` a merged adapter keeps."""
    return adapter.metadata["merge"]["retained_energy"]


def _merge_module(
    spec: MergeSpec,
    adapters: list[LoraAdapter],
    path: str,
    weights: torch.Tensor,
    rank: int | None,
    stats: Stats | None,
) -> Factors:
    modules = [adapter.modules[path] for adapter in adapters]
    if spec.is_linear:
        scalings = torch.tensor([adapter.scaling(path) for adapter in adapters])
        coefficients = (spec.coefficients(weights) * scalings).tolist()
        exact = concat([m.A for m in modules], [m.B for m in modules], coefficients)
        if rank is None or exact.A.shape[0] <= rank:
            return exact
        return truncate_factored(exact.A, exact.B, rank)
    merged = spec.lambda_ * spec.merge(_deltas(adapters, path), weights, stats, key=path)
    generator = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    return truncate_dense(merged, rank or max(m.rank for m in modules), generator)


def _deltas(adapters: list[LoraAdapter], path: str) -> torch.Tensor:
    stack = torch.empty((len(adapters), *delta_shape(adapters[0], path)))  # [n, d_out, d_in]
    for adapter, row in zip(adapters, stack):
        write_delta(adapter, path, row)
    return stack
