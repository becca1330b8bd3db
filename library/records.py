"""What the catalog returns: an adapter's record, a verify report, the embedding settings.

Plain data (no tensors, no I/O); :class:`quiver.library.Library` builds them from catalog rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ValidationError


@dataclass(frozen=True)
class AdapterRecord:
    """One catalog row: what ``list``/``info`` return (no tensors)."""

    name: str
    blob: str
    size: int
    base_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: list[str]
    n_modules: int
    n_params: int
    description: str
    examples: list[str]
    tags: list[str]
    version: int
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    checked: int
    damaged: list[tuple[str, str]]  # (adapter name, problem)
    orphan_blobs: list[str]
    removed_orphans: list[str] = field(default_factory=list)  # by fix_orphans (past the grace period)
    refused: str | None = None  # why ``fix_orphans`` deleted nothing, when it refused

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "damaged": self.damaged,
                "orphan_blobs": self.orphan_blobs, "removed_orphans": self.removed_orphans, "refused": self.refused}


@dataclass
class EmbeddingConfig:
    """How derived data is computed; part of each cache key."""

    svd_keep: float = 0.1  # fraction of weights kept by magnitude before the SVD
    svd_dims: int = 64
    text_batch_size: int = 64


def record_from_row(row: dict) -> AdapterRecord:
    d = dict(row)
    for key in ("target_modules", "examples", "tags"):
        d[key] = json.loads(d[key])
    return AdapterRecord(**d)


def str_list(values: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not all(isinstance(v, str) for v in values):
        raise ValidationError(f"{what} must be strings")
    return values
