"""Triton backend: gather-shrink-scale by adapter segment, then a per-token expand.

Index legend: T = tokens, k = slots per token, E = adapters, R = max rank, r_e = rank of
adapter e, N = routed pairs, G = active adapters, p = t * k + j a flat slot.

Two launches, with a float32 intermediate ``h: [T*k, R]``:

1. **shrink** (segmented, like Punica's SGMV): program (m, g) takes rows m·BM … of active
   adapter e = active[g]'s segment of the sorted metadata, gathers those tokens' rows of x and
   computes, in float32, ``h[p, :r_e] = w_p · (A_e[:r_e] @ x[t_p])``. A_e is read once per
   BM tokens and the product runs on tensor cores (``tl.dot``). The rank loop stops at r_e,
   in steps of BLOCK_R (>= 16, the smallest ``tl.dot`` tile): a rank-8 adapter in a rank-64
   bank costs one step, not four; lanes between r_e and the step are masked, never loaded.
2. **expand** (per-token reduction): program (m, n) owns output tile [BM tokens, BN columns]
   and sums its k slots in float32 registers, ``out[t, n] = Σ_j B_e[n, :r_e] · h[t*k + j, :r_e]``,
   loading B rows of each (token, slot)'s adapter, masked to its rank. The output is written
   once, in x's dtype.

Why a per-token reduction rather than atomics in a sorted expand: it is deterministic (bitwise
reproducible generations), needs neither a zeroed float32 copy of the output nor a cast pass,
and slots with index -1 or all-empty rows need no special casing. Its cost: B is gathered per
(token, slot), i.e. T·k·r·d_out reads (from L2 when the active adapters fit there) instead of
once per segment. Measured on an H100 (bf16, r = 8, k = 2, T = 1024), the expand takes ~28 µs
for d_out = 576 and ~61 µs for 1536 against ~4 µs for the shrink: at prefill sizes a sorted,
``tl.dot`` expand with float32 atomics would be the faster choice; at decode sizes (T = 16)
the whole mixture is ~10 µs, launch-bound.

Autograd: :func:`mixture_lora_triton` is an ``autograd.Function``. Its backward is the
transposed segmented products, on the forward's metadata, for pair p = (token t, adapter e,
weight w) with ``h_p = A_e x_t``, ``u_p = B_e^T g_t`` (g = dL/d delta):

    dL/dw_p  = u_p · h_p          dL/dx_t += A_e^T (w_p u_p)
    dL/dA_e += Σ_p (w_p u_p) x_t^T    dL/dB_e += Σ_p g_t (w_p h_p)^T

computed in float32 by PyTorch, one pair of skinny GEMMs per active adapter and gradient
(training is not the latency-bound path; fusing these into Triton kernels is a later step).
Gradients reach the gate weights through ``meta.pair_weights`` (indexed from ``weights``).

On CPU these kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bank import LoraBank
from .meta import MixtureMeta


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr,  # x: [T, d_in], A: [E, R, d_in], h: [T*k, R] float32
    token_ids_ptr, pair_ids_ptr, pair_weights_ptr,  # [N] each, sorted by adapter
    active_ptr, offsets_ptr, counts_ptr, ranks_ptr,  # [G], [E + 1], [E], [E]
    d_in,
    stride_xt, stride_xd,
    stride_ae, stride_ar, stride_ad,
    stride_hp, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """h[p, :r_e] = w_p · (A_e[:r_e] @ x[t_p]) for the pairs p of one adapter segment block."""
    e = tl.load(active_ptr + tl.program_id(1)).to(tl.int64)
    count = tl.load(counts_ptr + e)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= count:  # this adapter's segment is shorter than the grid's longest one
        return
    start = tl.load(offsets_ptr + e)
    rank = tl.load(ranks_ptr + e)
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the segment
    mask_m = offs_m < count
    tok = tl.load(token_ids_ptr + start + offs_m, mask=mask_m, other=0)  # [BM]
    pair = tl.load(pair_ids_ptr + start + offs_m, mask=mask_m, other=0)  # [BM]
    w = tl.load(pair_weights_ptr + start + offs_m, mask=mask_m, other=0.0)  # [BM] float32
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
        mask_r = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
        for k0 in range(0, d_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            mask_k = offs_k < d_in
            x_tile = tl.load(  # [BM, BK] gathered token rows
                x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_tile = tl.load(  # [BK, BR] = A_e[r0:r0+BR, k0:k0+BK]^T
                a_ptr + e * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ad,
                mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                x_tile, a_tile = x_tile.to(tl.float32), a_tile.to(tl.float32)
            acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
        acc = acc * w[:, None]
        tl.store(h_ptr + pair[:, None] * stride_hp + offs_r[None, :] * stride_hr, acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, out_ptr,  # h: [T*k, R] float32, B: [E, d_out, R], out: [T, d_out]
    slot_adapters_ptr, ranks_ptr,  # [T*k] (-1 = no adapter), [E]
    T, d_out,
    stride_hp, stride_hr,
    stride_be, stride_bn, stride_br,
    stride_ot, stride_on,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, n] = Σ_j B_e[n, :r_e] · h[t*k + j, :r_e], e = slot_adapters[t*k + j], for one tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
    mask_m = offs_m < T
    mask_n = offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for j in range(TOP_K):
        slot = offs_m.to(tl.int64) * TOP_K + j  # [BM] flat slots
        e = tl.load(slot_adapters_ptr + slot, mask=mask_m, other=-1)  # [BM]
        rank = tl.load(ranks_ptr + tl.maximum(e, 0), mask=e >= 0, other=0)  # [BM], 0 if empty
        for r0 in range(0, tl.max(rank, axis=0), BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            mask_r = offs_r[None, :] < rank[:, None]  # [BM, BR], false for empty slots
            h = tl.load(h_ptr + slot[:, None] * stride_hp + offs_r[None, :] * stride_hr,
                        mask=mask_r, other=0.0)  # [BM, BR]
            b = tl.load(  # [BM, BN, BR] = B_e[n, r] per token row
                b_ptr + tl.maximum(e, 0)[:, None, None] * stride_be
                + offs_n[None, :, None] * stride_bn + offs_r[None, None, :] * stride_br,
                mask=mask_r[:, None, :] & mask_n[None, :, None], other=0.0)
            acc += tl.sum(b.to(tl.float32) * h[:, None, :], axis=2)
    tl.store(out_ptr + offs_m[:, None] * stride_ot + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def mixture_lora_triton(x: Tensor, bank: LoraBank, meta: MixtureMeta) -> Tensor:
    """``delta: [T, d_out]`` in x's dtype, differentiable w.r.t. x, the weights and the factors."""
    return _TritonMixture.apply(x, bank.A, bank.B, meta.pair_weights, bank, meta)


class _TritonMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, pair_weights, bank: LoraBank, meta: MixtureMeta):
        ctx.save_for_backward(x, A, B, pair_weights)
        ctx.bank, ctx.meta = bank, meta
        return _launch(x, bank, meta)

    @staticmethod
    def backward(ctx, g):  # g: [T, d_out]
        x, A, B, pw = ctx.saved_tensors
        bank, meta = ctx.bank, ctx.meta
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        g = g.float()
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device) if need_A else None
        dB = torch.zeros(B.shape, dtype=torch.float32, device=B.device) if need_B else None
        dw = torch.zeros(pw.shape, dtype=torch.float32, device=pw.device) if need_w else None
        if not meta.exact:  # the backward may read the host (training is not graph-captured)
            counts = meta.counts.tolist()
            meta = dataclasses.replace(meta, active=tuple(e for e, n in enumerate(counts) if n),
                                       active_counts=tuple(n for n in counts if n))
        lo = 0
        for e, n in zip(meta.active, meta.active_counts):
            r = bank.rank_list[e]
            tok, w = meta.token_ids[lo:lo + n], pw[lo:lo + n, None].float()  # [n], [n, 1]
            a, b = A[e, :r].float(), B[e, :, :r].float()  # [r, d_in], [d_out, r]
            xe, ge = x[tok].float(), g[tok]  # [n, d_in], [n, d_out]
            h, u = xe @ a.T, ge @ b  # [n, r] each
            if need_w:
                dw[lo:lo + n] = (h * u).sum(1)
            if need_x:
                dx.index_add_(0, tok, (w * u) @ a)
            if need_A:
                dA[e, :r] = (w * u).T @ xe
            if need_B:
                dB[e, :, :r] = ge.T @ (w * h)
            lo += n
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return cast(dx, x), cast(dA, A), cast(dB, B), cast(dw, pw), None, None


def _launch(x: Tensor, bank: LoraBank, meta: MixtureMeta) -> Tensor:
    """Launch shrink then expand; returns ``delta: [T, d_out]`` in x's dtype."""
    out, launches = launch_plan(x, bank, meta)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return out


def launch_plan(x: Tensor, bank: LoraBank, meta: MixtureMeta):
    """The output buffer and the kernel launches ``(kernel, grid, args, kwargs)`` of one call.

    Everything here is computed from shapes and the metadata's host fields, which for
    ``exact=False`` metadata are bounds (grid: every adapter × T·k rows): no host read of tensor
    data, so a CUDA step is free of synchronisation (tested under FakeTensorMode).
    """
    # x: [T, d_in]
    assert x.is_cuda or x.is_meta or os.environ.get("TRITON_INTERPRET") == "1", \
        "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
    assert x.dim() == 2 and x.shape[1] == bank.d_in, f"x {tuple(x.shape)} vs bank d_in {bank.d_in}"
    assert x.dtype == bank.dtype and x.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"x {x.dtype} and bank {bank.dtype} must match, one of float32 / float16 / bfloat16"
    assert x.device == bank.device == meta.pair_ids.device, "x, bank and meta on one device"
    assert meta.num_tokens == x.shape[0] and meta.num_adapters == bank.num_adapters
    T, d_in = x.shape
    E, d_out, R = bank.B.shape
    k = meta.top_k
    out = torch.empty(T, d_out, dtype=x.dtype, device=x.device)  # [T, d_out]
    launches = []
    if T == 0:
        return out, launches
    h = torch.empty(T * k, R, dtype=torch.float32, device=x.device)  # [T*k, R], read up to r_e only

    if meta.num_pairs:
        # Triton's interpreter multiplies bf16 tiles in tl.dot as their raw uint16 storage
        # (triton 3.x ``create_dot``); there, and only there, bf16 tiles go through float32.
        upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
        # BLOCK_M follows the longest segment (16 at decode); BLOCK_R >= 16 for tl.dot, <= 32 to
        # bound registers (ranks above 32 take more steps). Not autotuned.
        block_m = min(64, max(16, triton.next_power_of_2(meta.max_count)))
        block_r = min(32, max(16, triton.next_power_of_2(R)))
        groups = E if meta.active is None else len(meta.active)
        grid = (triton.cdiv(meta.max_count, block_m), groups)
        launches.append((_shrink_kernel, grid, (
            x, bank.A, h,
            meta.token_ids, meta.pair_ids, meta.pair_weights,
            meta.active_adapters, meta.offsets, meta.counts, bank.ranks,
            d_in,
            x.stride(0), x.stride(1),
            bank.A.stride(0), bank.A.stride(1), bank.A.stride(2),
            h.stride(0), h.stride(1),
        ), dict(
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",
            UPCAST=upcast,
        )))

    # A [16, 64, 8] register tile per slot step. On an H100, larger tiles were slower, and a 2-D
    # variant looping over single ranks was no faster at r <= 16 (~8% faster at r = 64, k = 8).
    block_m, block_n = 16, 64
    grid = (triton.cdiv(T, block_m), triton.cdiv(d_out, block_n))
    launches.append((_expand_kernel, grid, (
        h, bank.B, out,
        meta.slot_adapters, bank.ranks,
        T, d_out,
        h.stride(0), h.stride(1),
        bank.B.stride(0), bank.B.stride(1), bank.B.stride(2),
        out.stride(0), out.stride(1),
    ), dict(TOP_K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=min(8, triton.next_power_of_2(R)))))
    return out, launches
