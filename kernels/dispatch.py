"""The one entry point, ``mixture_lora``, and its explicit registry of backends.

Two mixing modes (the adapter scaling is folded into B; index -1 = no adapter):

    merge-after   delta[t] = Σ_j w[t,j] · B_{e_j} A_{e_j} x[t]              (mix the outputs)
    merge-before  delta[t] = (Σ_j w[t,j] B_{e_j}) (Σ_j w[t,j] A_{e_j}) x[t]  (mix the factors)

Every backend is a :class:`Backend`: one function per mode it implements, ``(x [T, d_in], bank,
indices [T, k], weights [T, k], meta) -> delta [T, d_out]``, trusting its inputs, plus what it
*declares* it supports: devices, dtypes and autograd. ``mixture_lora`` validates the inputs
once, here, and the dispatcher picks by those declarations: ``auto`` takes the first backend of
the mode's preference list that supports the call; a backend named explicitly that does not
support it is refused with a message saying why. A backend may also offer, per mode, an
*accumulating* form ``(x, bank, indices, weights, meta, out) -> out`` that adds the delta into
``out [T, d_out]`` in place (the base layer's output: one pass fewer over a ``d_out``-wide
buffer); callers use it without gradients and fall back to ``out += impl(...)`` otherwise. Every
backend with ``autograd=True`` gives the reference's gradients for x, the gate weights and the
factors (tested); the native C backend (``kernels/native.py``, fp32 on the CPU, the default
there for inference calls of every size) declares ``autograd=False`` and is never chosen when a
gradient is needed.
The Triton backend is imported on first use, so CPU-only installs never import triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bank import LoraBank
from .merge_before import (mixture_lora_merge_before, mixture_lora_merge_before_dense,
                           mixture_lora_merge_before_reference)
from .meta import MixtureMeta, build_meta
from .torch_ref import mixture_lora_gather, mixture_lora_grouped, mixture_lora_reference

Impl = Callable[[Tensor, LoraBank, Tensor, Tensor, MixtureMeta | None], Tensor]
AccumulateImpl = Callable[[Tensor, LoraBank, Tensor, Tensor, MixtureMeta | None, Tensor], Tensor]
MODES = ("merge-after", "merge-before")
FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def sync_free(device: torch.device) -> bool:
    """Devices whose steps never read tensor data back to the host: CUDA (a read is a
    synchronisation, and a step with none can be captured in a CUDA graph) and ``meta``
    (shapes without data: a step planned on it shows, without a GPU, that nothing reads back)."""
    return device.type in ("cuda", "meta")


def _triton_device(device: torch.device) -> bool:
    """CUDA (or meta, which plans launches without running them), or the CPU under Triton's
    interpreter (TRITON_INTERPRET=1 before importing triton)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return sync_free(device) or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class Backend:
    """One implementation of the mixture and what it supports."""

    impls: dict[str, Impl]  # mode -> function
    devices: Callable[[torch.device], bool]
    dtypes: frozenset[torch.dtype]
    autograd: bool
    device_note: str  # for the refusal message
    accumulate: dict[str, AccumulateImpl] = field(default_factory=dict)  # mode -> out += delta, in place

    def refusal(self, x: Tensor, mode: str, needs_grad: bool) -> str | None:
        """Why this backend cannot run the call, or None."""
        if mode not in self.impls:
            return f"does not implement {mode} (it implements {', '.join(self.impls)})"
        if not self.devices(x.device):
            return f"does not run on {x.device.type} ({self.device_note})"
        if x.dtype not in self.dtypes:
            return f"does not support {x.dtype}"
        if needs_grad and not self.autograd:
            return "has no backward, and this call needs gradients"
        return None


def _native_device(device: torch.device) -> bool:
    """The CPU, once the C kernel is built (at the first call that asks; see kernels/native.py)."""
    from .native import available

    return device.type == "cpu" and available()


def _native(x, bank, indices, weights, meta):
    from .native import mixture_lora_native

    return mixture_lora_native(x, bank, indices, weights)


def _native_into(x, bank, indices, weights, meta, out):
    from .native import mixture_lora_native

    return mixture_lora_native(x, bank, indices, weights, out=out)


def _reference(x, bank, indices, weights, meta):
    return mixture_lora_reference(x, bank, indices, weights)


def _gather(x, bank, indices, weights, meta):
    return mixture_lora_gather(x, bank, indices, weights)


def _exact(meta, indices, weights, bank):
    """The grouped paths loop on the host over active adapters: they need exact metadata."""
    return meta if meta is not None and meta.exact else build_meta(indices, weights, bank.num_adapters)


def _gather_into(x, bank, indices, weights, meta, out):
    return mixture_lora_gather(x, bank, indices, weights, out=out)


def _grouped(x, bank, indices, weights, meta):
    return mixture_lora_grouped(x, bank, _exact(meta, indices, weights, bank))


def _grouped_into(x, bank, indices, weights, meta, out):
    return mixture_lora_grouped(x, bank, _exact(meta, indices, weights, bank), out=out)


def _triton(x, bank, indices, weights, meta):
    from .triton_mixture import mixture_lora_triton

    # On CUDA the metadata is built without a host read (a graph-capturable step).
    exact = not sync_free(x.device)
    return mixture_lora_triton(x, bank, meta or build_meta(indices, weights, bank.num_adapters, exact=exact))


def _merge_before_reference(x, bank, indices, weights, meta):
    return mixture_lora_merge_before_reference(x, bank, indices, weights)


def _merge_before_dense(x, bank, indices, weights, meta):
    return mixture_lora_merge_before_dense(x, bank, indices, weights)


def _merge_before_grouped(x, bank, indices, weights, meta):
    return mixture_lora_merge_before(x, bank, _exact(meta, indices, weights, bank))


_ANY = lambda device: True  # noqa: E731
BACKENDS: dict[str, Backend] = {
    "reference": Backend({"merge-after": _reference, "merge-before": _merge_before_reference},
                         _ANY, FLOATS, autograd=True, device_note="any device"),
    "gather": Backend({"merge-after": _gather}, _ANY, FLOATS, autograd=True, device_note="any device",
                      accumulate={"merge-after": _gather_into}),
    "grouped": Backend({"merge-after": _grouped, "merge-before": _merge_before_grouped},
                       _ANY, FLOATS, autograd=True, device_note="any device",
                       accumulate={"merge-after": _grouped_into}),
    "dense": Backend({"merge-before": _merge_before_dense}, _ANY, FLOATS, autograd=True, device_note="any device"),
    "native": Backend({"merge-after": _native}, _native_device, frozenset({torch.float32}), autograd=False,
                      device_note="it runs on the cpu, once its C kernel is built (kernels/native.py)",
                      accumulate={"merge-after": _native_into}),
    "triton": Backend({"merge-after": _triton}, _triton_device,
                      frozenset({torch.float32, torch.float16, torch.bfloat16}), autograd=True,
                      device_note="it runs on cuda, or on cpu under TRITON_INTERPRET=1"),
}

# At or below this many routed slots (T·k) a call is "small" (decoding): a gathering backend's
# few launches beat building metadata and looping over adapters, on CPU and GPU alike.
SMALL_SLOTS = 32


def preference(x: Tensor, slots: int, mode: str = "merge-after") -> list[str]:
    """The order ``auto`` tries backends in: the native C kernel (float32 on the CPU without
    gradients), or gathering, for small calls (``slots`` = T·k <= SMALL_SLOTS); for larger ones
    Triton on CUDA, else the native kernel, else the grouped torch path; the reference last.
    Merge-before: the reference for small calls, else the dense path on CUDA (no host read),
    else the grouped path."""
    if mode == "merge-before":
        if slots <= SMALL_SLOTS:
            return ["reference", "grouped"]
        return ["dense", "reference"] if sync_free(x.device) else ["grouped", "reference"]
    if slots <= SMALL_SLOTS:
        return ["native", "gather", "grouped", "reference"]
    return (["triton"] if sync_free(x.device) else []) + ["native", "grouped", "reference"]


def needs_grad(x: Tensor, bank: LoraBank, weights: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (x, bank.A, bank.B, weights))


def pick_backend(x: Tensor, slots: int | None = None, mode: str = "merge-after", grad: bool = False) -> str:
    """The backend ``auto`` runs for this call (see :func:`preference`)."""
    for name in preference(x, slots if slots is not None else SMALL_SLOTS + 1, mode):
        if BACKENDS[name].refusal(x, mode, grad) is None:
            return name
    raise ValueError(f"no mixture_lora backend supports {mode} on {x.device} in {x.dtype}")


def resolve_backend(x: Tensor, bank: LoraBank, weights: Tensor, slots: int, backend: str = "auto",
                    mode: str = "merge-after") -> str:
    """The backend a call runs on: ``auto``'s pick, or the named one if it supports the call."""
    grad = needs_grad(x, bank, weights)
    if backend == "auto":
        return pick_backend(x, slots, mode, grad)
    if backend not in BACKENDS:
        raise ValueError(f"unknown mixture_lora backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    why = BACKENDS[backend].refusal(x, mode, grad)
    if why is not None:
        raise ValueError(f"mixture_lora backend {backend!r} {why}; use backend='auto' or another of "
                         f"{', '.join(BACKENDS)}")
    return backend


def mixture_lora(
    x: Tensor,
    bank: LoraBank,
    indices: Tensor,
    weights: Tensor,
    meta: MixtureMeta | None = None,
    backend: str = "auto",
    mode: str = "merge-after",
) -> Tensor:
    """``delta`` of the mixture (see the module docstring for both modes).

    Shapes: ``x: [..., d_in]``; ``indices`` (integer, -1 = no adapter) and ``weights`` (float):
    ``[..., k]`` with the same leading dims, or already flat ``[T, k]``; returns
    ``[..., d_out]`` in x's dtype. ``meta`` is ``build_meta(indices, weights, E)`` when the
    caller shares one decision across modules; it is built here when a backend needs it.
    ``backend`` is ``"auto"`` or a name in ``BACKENDS``; ``mode`` one of ``MODES``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mixing mode {mode!r}; valid: {', '.join(MODES)}")
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
    backend = resolve_backend(x, bank, weights, indices.numel(), backend, mode)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, bank.d_in)  # [T, d_in]
    k = indices.shape[-1]
    idx2, w2 = indices.reshape(-1, k), weights.reshape(-1, k)  # [T, k]
    if idx2.shape[0] != x2.shape[0]:
        raise ValueError(f"routing decision covers {idx2.shape[0]} tokens, x holds {x2.shape[0]}")
    if meta is not None and (meta.num_tokens, meta.top_k, meta.num_adapters) != (x2.shape[0], k, bank.num_adapters):
        raise ValueError(f"meta is for (T, k, E) = {(meta.num_tokens, meta.top_k, meta.num_adapters)}, "
                         f"this call has {(x2.shape[0], k, bank.num_adapters)}")
    delta = BACKENDS[backend].impls[mode](x2, bank, idx2, w2, meta)  # [T, d_out]
    return delta.reshape(*lead, bank.d_out)
