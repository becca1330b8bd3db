"""Merge-before mixing (mttl's semantics): mix the factors per token, then apply one LoRA.

For token t with slots j (adapter e_j = indices[t, j], weight w_j; scaling folded into B):

    h_t     = Σ_j w_j · A_{e_j} x_t          # [R]   (mixed A, applied)
    delta_t = Σ_j w_j · B_{e_j} h_t          # [d_out] (mixed B, applied)

i.e. ``delta_t = (Σ_j w_j B_j)(Σ_j w_j A_j) x_t``. Unlike merge-after (Σ_j w_j B_j A_j x_t) this has
cross terms B_i A_j, so it is only meaningful when the mixed adapters share a rank (their rank
axes are aligned slot by slot; lower-rank adapters contribute zeros beyond their rank).
Cost follows the routed pairs, as in the grouped merge-after path: one shrink and one expand
per active adapter over its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bank import LoraBank
from .meta import build_meta


def mixture_lora_merge_before(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor) -> Tensor:
    """``delta [T, d_out]`` for ``x [T, d_in]``, ``indices``/``weights [T, k]`` (see module doc)."""
    T = x.shape[0]
    meta = build_meta(indices, weights, bank.num_adapters)
    h = x.new_zeros(T, bank.max_rank, dtype=torch.float32)  # [T, R]
    segments = list(zip(meta.active, meta.token_ids.split(meta.active_counts),  # tok: [n_e]
                        meta.pair_weights[:, None].split(meta.active_counts)))  # w: [n_e, 1]
    for e, tok, w in segments:
        r = bank.rank_list[e]
        h[:, :r].index_add_(0, tok, w * (x[tok].float() @ bank.A[e, :r].float().T))
    out = x.new_zeros(T, bank.d_out, dtype=torch.float32)  # [T, d_out]
    for e, tok, w in segments:
        r = bank.rank_list[e]
        out.index_add_(0, tok, w * (h[tok, :r] @ bank.B[e, :, :r].float().T))
    return out.to(x.dtype)

