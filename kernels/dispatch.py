"""The one entry point, ``mixture_lora``, and its explicit registry of backends.

Every backend is a function ``(x [T, d_in], bank, indices [T, k], weights [T, k], meta) ->
delta [T, d_out]`` that trusts its inputs; ``mixture_lora`` validates them once, here. The
Triton backend is imported on first use, so CPU-only installs never import triton.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import Tensor

from .bank import LoraBank
from .meta import MixtureMeta, build_meta
from .torch_ref import mixture_lora_gather, mixture_lora_grouped, mixture_lora_reference

Backend = Callable[[Tensor, LoraBank, Tensor, Tensor, MixtureMeta | None], Tensor]


def _reference(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor, meta: MixtureMeta | None) -> Tensor:
    return mixture_lora_reference(x, bank, indices, weights)


def _gather(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor, meta: MixtureMeta | None) -> Tensor:
    return mixture_lora_gather(x, bank, indices, weights)


def _grouped(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor, meta: MixtureMeta | None) -> Tensor:
    return mixture_lora_grouped(x, bank, meta or build_meta(indices, weights, bank.num_adapters))


def _triton(x: Tensor, bank: LoraBank, indices: Tensor, weights: Tensor, meta: MixtureMeta | None) -> Tensor:
    from .triton_mixture import mixture_lora_triton

    return mixture_lora_triton(x, bank, meta or build_meta(indices, weights, bank.num_adapters))


BACKENDS: dict[str, Backend] = {"reference": _reference, "gather": _gather, "grouped": _grouped, "triton": _triton}

# At or below this many routed slots (T·k) a call is "small" (decoding): the gather backend's
# few launches beat building metadata and looping over adapters, on CPU and GPU alike.
SMALL_SLOTS = 32


def pick_backend(x: Tensor, slots: int | None = None) -> str:
    """``auto``: gather for small calls (``slots`` = T·k <= SMALL_SLOTS), else Triton for CUDA
    tensors when triton is installed, else the grouped torch path."""
    if slots is not None and slots <= SMALL_SLOTS:
        return "gather"
    if x.is_cuda and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "grouped"


def mixture_lora(
    x: Tensor,
    bank: LoraBank,
    indices: Tensor,
    weights: Tensor,
    meta: MixtureMeta | None = None,
    backend: str = "auto",
) -> Tensor:
    """``delta[t] = Σ_j weights[t, j] · B_e @ (A_e @ x[t])`` with ``e = indices[t, j]``.

    Shapes: ``x: [..., d_in]``; ``indices`` (integer, -1 = no adapter) and ``weights`` (float):
    ``[..., k]`` with the same leading dims, or already flat ``[T, k]``; returns
    ``[..., d_out]`` in x's dtype. ``meta`` is ``build_meta(indices, weights, E)`` when the
    caller shares one decision across modules; it is built here when omitted (and ignored by
    the reference backend). ``backend`` is ``"auto"`` or a name in ``BACKENDS``.
    """
    if backend == "auto":
        backend = pick_backend(x, indices.numel())
    if backend not in BACKENDS:
        raise ValueError(f"unknown mixture_lora backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if x.shape[-1] != bank.d_in:
        raise ValueError(f"x has d_in {x.shape[-1]}, the bank expects {bank.d_in}")
    if x.dtype != bank.dtype or x.device != bank.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) and bank ({bank.dtype}, {bank.device}) "
                         f"must share dtype and device")
    if indices.shape != weights.shape or indices.dim() == 0:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} "
                         f"must share one shape [..., k]")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point; got {weights.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, bank.d_in)  # [T, d_in]
    k = indices.shape[-1]
    idx2, w2 = indices.reshape(-1, k), weights.reshape(-1, k)  # [T, k]
    if idx2.shape[0] != x2.shape[0]:
        raise ValueError(f"routing decision covers {idx2.shape[0]} tokens, x holds {x2.shape[0]}")
    if meta is not None and (meta.num_tokens, meta.top_k, meta.num_adapters) != (x2.shape[0], k, bank.num_adapters):
        raise ValueError(f"meta is for (T, k, E) = {(meta.num_tokens, meta.top_k, meta.num_adapters)}, "
                         f"this call has {(x2.shape[0], k, bank.num_adapters)}")
    delta = BACKENDS[backend](x2, bank, idx2, w2, meta)  # [T, d_out]
    return delta.reshape(*lead, bank.d_out)
