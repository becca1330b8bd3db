"""Routing metadata: one routing decision regrouped by adapter, built once per batch.

Index legend: T = tokens, k = slots per token, E = adapters in the bank, N = routed
(token, slot) pairs (slots whose index is >= 0), G = active adapters (those with >= 1 pair).

A decision ``indices: [T, k]``, ``weights: [T, k]`` is token-major; the kernels want it
adapter-major, so that each adapter's factors are read once for all the tokens routed to it
(segmented GEMM, as in Punica's SGMV and vLLM's ``LoRAKernelMeta.prepare_tensors``). The flat
slot ``p = t * k + j`` names a pair; a stable sort by adapter keeps, inside each adapter's
segment, the pairs in slot order (so token ids are non-decreasing there).

The metadata depends on the decision and E only, not on the module's dimensions, so modules
that share a decision (one router for several projections) share one ``MixtureMeta``.

Two flavours:
- ``exact=True`` (CPU, the grouped backend): one device-to-host copy of ``E + 2`` counts gives
  the host the active adapters and the largest segment, to size Python loops; it also checks
  that every index is in range.
- ``exact=False`` (CUDA, the Triton backend): no host read at all. The host fields hold upper
  bounds instead (every adapter "active", segments up to T·k long); a launch grid sized by them
  has programs that find an empty segment and exit. A decode step then launches a fixed
  sequence of kernels whatever the routing, which a CUDA graph can capture. Indices are
  trusted (routers produce them with ``topk``; out-of-range ones are never read: they sort
  past every segment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class MixtureMeta:
    """A routing decision sorted by adapter. Device tensors live with ``indices``."""

    num_tokens: int  # T
    top_k: int  # k
    num_adapters: int  # E
    slot_adapters: Tensor  # int64 [T*k]: adapter of flat slot p = t*k + j, -1 = no adapter
    pair_ids: Tensor  # int64 [N]: flat slot of each pair, grouped by adapter, slot order within
    token_ids: Tensor  # int64 [N]: pair_ids // k, the token each pair reads and writes
    pair_weights: Tensor  # float32 [N]: weights[t, j] of each pair
    counts: Tensor  # int64 [E]: pairs per adapter
    offsets: Tensor  # int64 [E + 1]: adapter e's pairs are pair_ids[offsets[e]:offsets[e+1]]
    active_adapters: Tensor  # int64 [G]: adapters with counts > 0, ascending
    active: tuple[int, ...] | None  # host copy of active_adapters (None: not read, exact=False)
    active_counts: tuple[int, ...] | None  # host copy of counts[active_adapters] (likewise)
    num_pairs: int  # N (exact=False: the bound T·k; pair_ids then also holds the empty slots, last)
    max_count: int  # the longest adapter segment (exact=False: the bound T·k)
    exact: bool = True


def build_meta(indices: Tensor, weights: Tensor, num_adapters: int, exact: bool = True) -> MixtureMeta:
    """Regroup ``indices [T, k]`` / ``weights [T, k]`` by adapter for a bank of ``num_adapters``.

    Slots with index -1 are dropped; with ``exact`` any other index outside
    ``[0, num_adapters)`` is an error. ``exact=False``: no host read (see the module docstring).
    """
    if indices.dim() != 2 or weights.shape != indices.shape:
        raise ValueError(f"build_meta wants indices and weights of one shape [T, k]; got "
                         f"indices {tuple(indices.shape)}, weights {tuple(weights.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor; got {indices.dtype}")
    T, k = indices.shape
    E = num_adapters
    slot_adapters = indices.reshape(-1).long()  # [T*k]
    # Sort key: the adapter for a routed slot, E for an empty slot (-1), E + 1 for an invalid one.
    invalid = (slot_adapters < -1) | (slot_adapters >= E)
    key = torch.where(slot_adapters >= 0, slot_adapters, E).masked_fill(invalid, E + 1)  # [T*k]
    order = torch.sort(key, stable=True).indices  # [T*k]
    bins = torch.zeros(E + 2, dtype=torch.int64, device=key.device)  # [E + 2]
    bins.scatter_add_(0, key, torch.ones_like(key))  # (bincount would sync once more on CUDA)
    counts = bins[:E]  # [E]
    if exact:
        host = bins.tolist()  # the one device-to-host copy
        if host[E + 1]:
            bad = slot_adapters[invalid][:5].tolist()
            raise ValueError(f"{host[E + 1]} routing indices outside [-1, {E}), e.g. {bad}")
        n = sum(host[:E])
        pair_ids = order[:n]  # [N]; empty and invalid slots sort last
        active = tuple(e for e in range(E) if host[e])
        active_adapters = torch.tensor(active, dtype=torch.int64, device=indices.device)
        active_counts, max_count = tuple(host[e] for e in active), max(host[:E], default=0)
    else:  # bounds instead of host reads; empty and invalid slots stay at the end of pair_ids
        n, pair_ids = T * k, order
        slot_adapters = slot_adapters.masked_fill(invalid, -1)  # never read out of range
        active, active_counts, max_count = None, None, T * k
        active_adapters = torch.arange(E, device=indices.device)
    return MixtureMeta(
        num_tokens=T,
        top_k=k,
        num_adapters=E,
        slot_adapters=slot_adapters,
        pair_ids=pair_ids,
        token_ids=pair_ids // k,
        pair_weights=weights.reshape(-1)[pair_ids].float(),
        counts=counts,
        offsets=torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)),
        active_adapters=active_adapters,
        active=active,
        active_counts=active_counts,
        num_pairs=n,
        max_count=max_count,
        exact=exact,
    )
