"""PyTorch backends of the mixture-of-LoRAs delta: the readable oracle and the grouped CPU path.

Index legend: T = tokens, k = slots per token, E = adapters, R = max rank, r_e = rank of
adapter e, N = routed (token, slot) pairs, G = active adapters.

Semantics (both backends)::

    delta[t] = Σ_j weights[t, j] · B_e[:, :r_e] @ (A_e[:r_e] @ x[t]),   e = indices[t, j] >= 0

Slots with index -1 contribute nothing; the scaling is already folded into B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .bank import LoraBank
from .meta import MixtureMeta

BLOCK_ROWS = 512  # routed rows per block of the grouped path (float32 buffers: 1.1 + 3 MiB for 576 -> 1536)


def mixture_lora_reference(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor) -> Tensor:
    """The oracle: gather every slot's factors, shrink, scale by the gate, expand, sum over k.

    Computes in x's dtype, exactly as written (so in bf16 it *is* torch's own low-precision
    answer, against which tests measure the other backends). Memory O(T·k·R·(d_in + d_out)):
    for tests, not for serving.
    """
    # x: [T, d_in], indices / weights: [T, k]
    real = torch.arange(bank.max_rank, device=x.device) < bank.ranks[:, None]  # [E, R]
    A = torch.where(real[:, :, None], bank.A, 0)  # [E, R, d_in], padding rows zeroed
    B = torch.where(real[:, None, :], bank.B, 0)  # [E, d_out, R], padding columns zeroed
    routed = indices >= 0  # [T, k]
    slot = indices.clamp(min=0).long()  # [T, k]
    w = torch.where(routed, weights, 0).to(x.dtype)  # [T, k]
    h = torch.einsum("tkrd,td->tkr", A[slot], x)  # [T, k, R]   shrink
    h = h * w[:, :, None]  # [T, k, R]   gate
    return torch.einsum("tkor,tkr->to", B[slot], h)  # [T, d_out]  expand + sum over slots


def mixture_lora_gather(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor,
                        out: Tensor | None = None) -> Tensor:
    """Small batches (decoding): gather the T·k selected adapters' factors, two batched matmuls.

    No routing metadata and no device-to-host sync, so its fixed cost is a handful of kernel
    launches; memory is O(T·k·R·(d_in + d_out)), which is why the dispatcher uses it only for
    small T·k. Padding beyond an adapter's rank is masked out (skipped when every adapter in
    the bank has the full rank R, the common case). With ``out: [T, d_out]`` (x's dtype) the
    delta is added into it in place (``out += delta``, one ``baddbmm_``) and ``out`` returned.
    """
    # x: [T, d_in], indices / weights: [T, k]
    T, k = indices.shape
    R, d_in, d_out = bank.max_rank, bank.d_in, bank.d_out
    slot = indices.clamp(min=0).reshape(-1)  # [T*k]
    A = bank.A.index_select(0, slot).view(T, k * R, d_in)  # [T, k·R, d_in]: one rank-k·R LoRA per token
    h = torch.bmm(x.unsqueeze(1), A.transpose(1, 2)).view(T * k, R)  # [T*k, R]   shrink
    gate = weights.masked_fill(indices < 0, 0)  # [T, k]
    h = h * (gate if gate.dtype == x.dtype else gate.to(x.dtype)).reshape(-1, 1)
    # [T*k, R, d_out], contiguous: a plain copy of rows when the bank stores B transposed (the
    # runtime's AdapterBank does), a transposing copy otherwise
    h, Bt = _mask_padding(bank, slot, h, bank.B.transpose(1, 2).index_select(0, slot))
    Bt = Bt.reshape(T, k * R, d_out)  # [T, k·R, d_out]
    if out is not None:  # out[t] += h[t] @ Bt[t]   expand + Σ slots, into the caller's buffer
        out.view(T, 1, d_out).baddbmm_(h.view(T, 1, k * R), Bt)
        return out
    return torch.bmm(h.view(T, 1, k * R), Bt).view(T, d_out)  # expand + Σ slots


def _mask_padding(bank: LoraBank, slot: Tensor, h: Tensor, Bt: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the gathered rank columns beyond each selected adapter's own rank (``h: [N, R]``,
    ``Bt: [N, R, d_out]`` for the ``N`` slots ``slot``); unchanged when every adapter has rank R."""
    if not bank.padded:
        return h, Bt
    real = torch.arange(bank.max_rank, device=h.device) < bank.ranks.index_select(0, slot)[:, None]  # [N, R]
    return torch.where(real, h, 0), torch.where(real[:, :, None], Bt, 0)  # where, not *: padding may hold NaN


def mixture_lora_gather_siblings(x: Tensor, banks: Sequence[LoraBank], indices: Tensor, weights: Tensor,
                                 outs: Sequence[Tensor]) -> None:
    """The gather path for M modules that read the same ``x`` (q/k/v, gate/up), each with its
    own bank and decision: ``outs[m] += delta_m`` in place, where ``delta_m`` is
    :func:`mixture_lora_gather` of ``(x, banks[m], indices[m], weights[m])``.

    One clamp, one gate and one batched shrink serve all M modules (their gathered A factors
    side by side in one ``[M, T·k, R, d_in]`` buffer); only the gathers and the expands, whose
    d_out differ, stay per module. Needs banks of one max rank R and one d_in (the caller
    checks); an adapter below R is masked as in :func:`mixture_lora_gather`.
    """
    # x: [T, d_in], indices / weights: [M, T, k], outs[m]: [T, d_out_m]
    M, T, k = indices.shape
    R, d_in = banks[0].max_rank, banks[0].d_in
    slot = indices.clamp(min=0).view(M, T * k)  # [M, T*k]
    A = torch.empty(M, T * k, R, d_in, dtype=x.dtype, device=x.device)
    for m, bank in enumerate(banks):
        torch.index_select(bank.A, 0, slot[m], out=A[m])
    h = torch.matmul(x.unsqueeze(1), A.view(M, T, k * R, d_in).transpose(2, 3))  # [M, T, 1, k·R]  shrink
    gate = weights.masked_fill(indices < 0, 0)  # [M, T, k]
    h = h.view(M, T, k, R) * (gate if gate.dtype == x.dtype else gate.to(x.dtype)).unsqueeze(3)
    for m, (bank, out) in enumerate(zip(banks, outs)):
        Bt = bank.B.transpose(1, 2).index_select(0, slot[m])  # [T*k, R, d_out]
        h_m, Bt = _mask_padding(bank, slot[m], h[m].reshape(T * k, R), Bt)
        out.view(T, 1, bank.d_out).baddbmm_(h_m.view(T, 1, k * R), Bt.view(T, k * R, bank.d_out))  # expand + Σ slots


def mixture_lora_grouped(x: Tensor, bank: LoraBank, meta: MixtureMeta, out: Tensor | None = None) -> Tensor:
    """The CPU path: one skinny GEMM pair per *active* adapter, at its real rank.

    With ``xs`` the routed rows sorted by adapter, each pre-scaled by its gate weight
    (``B A (w x) = w B A x``), adapter e's rows ``xs_e: [n_e, d_in]`` give
    ``ys_e = (xs_e @ A_e[:r_e]^T) @ B_e[:, :r_e]^T: [n_e, d_out]``, and ``index_add_`` sums
    every token's k rows into the output. The sorted pairs are processed in blocks of
    ``BLOCK_ROWS`` (a segment may straddle two), so the gathered and expanded rows live in
    two small reused buffers that stay in cache instead of two fresh ``[N, d]`` tensors:
    measured on one CPU thread, 1.2-1.6 ms instead of 1.4-5 ms for T = 1024, E = 4 to 64.

    Cost: gather + scatter of N = T·k rows, FLOPs 2·N·r·(d_in + d_out), plus a fixed host
    overhead per active adapter (~10 µs: two ``mm`` calls). It follows the routed tokens, not
    E: unrouted adapters cost nothing, and a decision with k slots but few distinct adapters
    (a per-example router repeating its row) runs as few large GEMMs. Low-precision inputs
    multiply in their dtype and sum the k slots in float32.

    With ``out: [T, d_out]`` (x's dtype; the base layer's output) the delta is added into it in
    place and ``out`` returned: in float32 the rows are summed straight into it (no ``[T, d_out]``
    buffer, no extra pass), in low precision through a float32 buffer, as above.
    """
    # x: [T, d_in]
    if torch.is_grad_enabled() and (x.requires_grad or meta.pair_weights.requires_grad
                                    or bank.A.requires_grad or bank.B.requires_grad):
        delta = _grouped_differentiable(x, bank, meta)
        return delta if out is None else out.add_(delta)
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    into = out is not None and out.dtype == acc_dtype
    acc = out if into else torch.zeros(x.shape[0], bank.d_out, dtype=acc_dtype, device=x.device)  # [T, d_out]
    rows = min(BLOCK_ROWS, meta.num_pairs)
    x_buf = torch.empty(rows, bank.d_in, dtype=x.dtype, device=x.device)  # [rows, d_in]
    y_buf = torch.empty(rows, bank.d_out, dtype=x.dtype, device=x.device)  # [rows, d_out]
    w = meta.pair_weights.to(x.dtype)[:, None]  # [N, 1]
    views = bank.rank_views
    for lo, hi, adapters, sizes in _row_blocks(meta.active, meta.active_counts, BLOCK_ROWS):
        tok = meta.token_ids[lo:hi]  # [n]
        xs = torch.index_select(x, 0, tok, out=x_buf[: hi - lo]).mul_(w[lo:hi])  # [n, d_in]
        ys = y_buf[: hi - lo]  # [n, d_out]
        for e, x_e, y_e in zip(adapters, xs.split(sizes), ys.split(sizes)):
            a_t, b_t = views[e]  # [d_in, r_e], [r_e, d_out]
            torch.mm(torch.mm(x_e, a_t), b_t, out=y_e)  # y_e: [n_e, d_out]
        acc.index_add_(0, tok, ys if ys.dtype == acc_dtype else ys.to(acc_dtype))
    if into:
        return out
    return acc.to(x.dtype) if out is None else out.add_(acc)


def _grouped_differentiable(x: Tensor, bank: LoraBank, meta: MixtureMeta) -> Tensor:
    """The same sums without in-place writes into buffers, so autograd can follow them
    (gradients reach x, the gate weights and the factors: what router training needs)."""
    xs = x.index_select(0, meta.token_ids) * meta.pair_weights.to(x.dtype)[:, None]  # [N, d_in]
    views = bank.rank_views
    ys = [x_e @ views[e][0] @ views[e][1] for e, x_e in zip(meta.active, xs.split(meta.active_counts))]
    ys = torch.cat(ys) if ys else xs.new_zeros(0, bank.d_out)  # [N, d_out]
    return x.new_zeros(x.shape[0], bank.d_out).index_add(0, meta.token_ids, ys)  # [T, d_out]


def _row_blocks(active: tuple[int, ...], counts: tuple[int, ...], rows: int):
    """Cut the adapter-sorted pairs into consecutive blocks of at most ``rows``.

    Yields ``(lo, hi, adapters, sizes)``: pairs ``lo:hi`` are, in order, ``sizes[i]`` pairs of
    ``adapters[i]`` (an adapter whose segment crosses a block boundary appears in both blocks).
    """
    lo, filled, adapters, sizes = 0, 0, [], []
    for e, n in zip(active, counts):
        while n:
            take = min(n, rows - filled)
            adapters.append(e)
            sizes.append(take)
            filled, n = filled + take, n - take
            if filled == rows:
                yield lo, lo + rows, adapters, sizes
                lo, filled, adapters, sizes = lo + rows, 0, [], []
    if filled:
        yield lo, lo + filled, adapters, sizes
