"""Merge-before mixing (mttl's semantics): mix the factors per token, then apply one LoRA.

Index legend: T = tokens, k = slots per token, R = max rank, N = routed pairs.

For token t with slots j (adapter e_j = indices[t, j], weight w_j; scaling folded into B):

    h_t     = Σ_j w_j · A_{e_j} x_t          # [R]   (mixed A, applied)
    delta_t = Σ_j w_j · B_{e_j} h_t          # [d_out] (mixed B, applied)

i.e. ``delta_t = (Σ_j w_j B_j)(Σ_j w_j A_j) x_t``. Unlike merge-after (Σ_j w_j B_j A_j x_t) this has
cross terms B_i A_j, so it is only meaningful when the mixed adapters share a rank (their rank
axes are aligned slot by slot; lower-rank adapters contribute zeros beyond their rank).
Both functions are reached through ``mixture_lora(..., mode="merge-before")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bank import LoraBank
from .meta import MixtureMeta


def mixture_lora_merge_before_reference(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor) -> Tensor:
    """The oracle: form each token's mixed factors explicitly (memory O(T·R·(d_in + d_out)))."""
    # x: [T, d_in], indices / weights: [T, k]
    real = torch.arange(bank.max_rank, device=x.device) < bank.ranks[:, None]  # [E, R]
    A = torch.where(real[:, :, None], bank.A, 0)  # [E, R, d_in]
    B = torch.where(real[:, None, :], bank.B, 0)  # [E, d_out, R]
    slot = indices.clamp(min=0).long()  # [T, k]
    w = torch.where(indices >= 0, weights, 0).to(x.dtype)  # [T, k]
    A_mix = torch.einsum("tk,tkrd->trd", w, A[slot])  # [T, R, d_in]
    B_mix = torch.einsum("tk,tkor->tor", w, B[slot])  # [T, d_out, R]
    h = torch.einsum("trd,td->tr", A_mix, x)  # [T, R]
    return torch.einsum("tor,tr->to", B_mix, h)  # [T, d_out]


def mixture_lora_merge_before(x: Tensor, bank: LoraBank, meta: MixtureMeta) -> Tensor:
    """The grouped path: one shrink and one expand per active adapter over its tokens, in
    float32; cost follows the routed pairs, as in the grouped merge-after path. Without autograd
    it accumulates in place; with it (training MHR), out of place so autograd can follow."""
    # x: [T, d_in]
    T, R = x.shape[0], bank.max_rank
    grad = torch.is_grad_enabled() and (x.requires_grad or meta.pair_weights.requires_grad
                                        or bank.A.requires_grad or bank.B.requires_grad)
    segments = list(zip(meta.active, meta.token_ids.split(meta.active_counts),  # tok: [n_e]
                        meta.pair_weights[:, None].split(meta.active_counts)))  # w: [n_e, 1]
    h = x.new_zeros(T, R, dtype=torch.float32)  # [T, R]
    for e, tok, w in segments:
        r = bank.rank_list[e]
        part = w * (x[tok].float() @ bank.A[e, :r].float().T)  # [n_e, r]
        if grad:
            h = h.index_add(0, tok, torch.nn.functional.pad(part, (0, R - r)))
        else:
            h[:, :r].index_add_(0, tok, part)
    out = x.new_zeros(T, bank.d_out, dtype=torch.float32)  # [T, d_out]
    for e, tok, w in segments:
        r = bank.rank_list[e]
        part = w * (h[tok, :r] @ bank.B[e, :, :r].float().T)  # [n_e, d_out]
        out = out.index_add(0, tok, part) if grad else out.index_add_(0, tok, part)
    return out.to(x.dtype)


def mixture_lora_merge_before_dense(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor) -> Tensor:
    """Over every bank slot at once, no metadata and no host read (CUDA steps, graph capture):
    with ``W [T, E]`` the decision scattered densely (0 for unrouted slots),

        h_t     = Σ_e W[t,e] · A_e x_t        = Σ_e W[t,e] · (x A_flat^T)[t, e, :]
        delta_t = (W[t] ⊗ h_t) B_flat          with B_flat [E·R, d_out], B_flat[e·R + r] = B_e[:, r]

    Two GEMMs of ``T × E·R``: the right cost when a decision uses most of the bank (MHR routes
    every token over all its head views), E/k times too much for a sparse top-k decision.
    """
    # x: [T, d_in], indices / weights: [T, k]
    T, (E, R) = x.shape[0], bank.A.shape[:2]
    real = torch.arange(R, device=x.device) < bank.ranks[:, None]  # [E, R]
    A = torch.where(real[:, :, None], bank.A, 0).reshape(E * R, bank.d_in)  # [E·R, d_in]
    B = torch.where(real[:, None, :], bank.B, 0).transpose(1, 2).reshape(E * R, bank.d_out)  # [E·R, d_out]
    W = x.new_zeros(T, E, dtype=torch.float32).scatter_add(  # [T, E]
        1, indices.clamp(min=0).long(), torch.where(indices >= 0, weights.float(), 0))
    h = ((x.float() @ A.float().T).view(T, E, R) * W[:, :, None]).sum(1)  # [T, R]
    out = (W[:, :, None] * h[:, None, :]).reshape(T, E * R) @ B.float()  # [T, d_out]
    return out.to(x.dtype)
