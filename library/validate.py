"""Checks an adapter against the library's base model before anything is written."""

from __future__ import annotations

import torch

from .adapter import LoraAdapter
from .base_model import BaseModelSpec
from .errors import ValidationError

_SHOW = 5  # how many offending modules an error lists


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def validate_adapter(adapter: LoraAdapter, spec: BaseModelSpec) -> None:
    """Raise :class:`ValidationError` unless ``adapter`` fits ``spec`` and has finite weights.

    Checked: the base-model fingerprint, that every module path is a linear of the base model,
    ``A: [r, d_in]`` / ``B: [d_out, r]`` against the linear's shape, floating dtypes, and
    NaN/Inf values.
    """
    name = adapter.name
    if adapter.base_model.fingerprint != spec.fingerprint:
        raise ValidationError(
            f"adapter {name!r} was made for base model {adapter.base_model.id!r} "
            f"(fingerprint {adapter.base_model.fingerprint[:12]}), but this library's base model "
            f"is {spec.id!r} (fingerprint {spec.fingerprint[:12]})"
        )
    unknown = [p for p in adapter.modules if p not in spec.linears]
    if unknown:
        raise ValidationError(
            f"adapter {name!r}: {len(unknown)} module path(s) are not linear layers of the base "
            f"model {spec.id!r}: {_listing(unknown)}"
        )
    bad_shapes, bad_dtype, non_finite = [], [], []
    for path, m in adapter.modules.items():
        d_out, d_in = spec.linears[path]
        r = m.A.shape[0] if m.A.ndim == 2 else -1
        if m.A.ndim != 2 or m.B.ndim != 2 or m.A.shape[1] != d_in or tuple(m.B.shape) != (d_out, r):
            bad_shapes.append(
                f"{path}: A {tuple(m.A.shape)}, B {tuple(m.B.shape)}, "
                f"expected A (r, {d_in}), B ({d_out}, r)"
            )
        elif r == 0:
            bad_shapes.append(f"{path}: rank 0")
        elif not (m.A.is_floating_point() and m.B.is_floating_point()):
            bad_dtype.append(f"{path}: {m.A.dtype}/{m.B.dtype}")
        elif not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all()):
            non_finite.append(path)
    if bad_shapes:
        raise ValidationError(f"adapter {name!r}: shape mismatch: {_listing(bad_shapes)}")
    if bad_dtype:
        raise ValidationError(f"adapter {name!r}: factors must be floating point: {_listing(bad_dtype)}")
    if non_finite:
        raise ValidationError(f"adapter {name!r}: NaN or Inf weights in {_listing(non_finite)}")
    if not (adapter.alpha > 0 and all(m.alpha > 0 for m in adapter.modules.values())):
        raise ValidationError(f"adapter {name!r}: alpha must be positive")
