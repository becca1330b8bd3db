"""The LoRA adapter data model and its canonical on-disk form.

A :class:`LoraAdapter` holds, for each adapted module of the base model (full module path,
e.g. ``model.layers.3.self_attn.q_proj``), the PEFT-oriented factors

    A: [r, d_in]     B: [d_out, r]     ΔW = scaling · B @ A,   scaling = alpha / r
                                                              (alpha / sqrt(r) with rsLoRA)

Ranks and alphas may differ per module. The canonical serialisation is one safetensors file
whose tensors are ``{module}.lora_A`` / ``{module}.lora_B`` and whose only metadata entry,
``quiver``, is a sorted-key JSON document (rank, alphas, base model, ...). Both are
deterministic, so the sha256 of the bytes is the adapter's content hash: the library stores
blobs under that hash. Catalog data (name, description, tags) is deliberately *not* part of the
blob, so renaming or re-describing an adapter never changes its content.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import AdapterFormatError

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise ``ValueError``.

    Safe: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, and no
    ``..``. Names are catalog keys, never paths, but they appear in exported directory names
    and CLI output, so they are kept boring.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name


@dataclass(frozen=True)
class BaseModelRef:
    """Which base model an adapter was trained for: a human id and the weights' fingerprint."""

    id: str
    fingerprint: str


@dataclass
class LoraModule:
    """Factors of one adapted linear: ``A: [r, d_in]``, ``B: [d_out, r]``."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scaling(self, use_rslora: bool) -> float:
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)


@dataclass
class LoraAdapter:
    """A LoRA adapter over one base model; see the module docstring for the math."""

    name: str
    base_model: BaseModelRef
    modules: dict[str, LoraModule]
    use_rslora: bool = False
    rank: int = 0  # the nominal (most common) rank; per-module ranks live in `modules`
    alpha: float = 0.0  # the nominal alpha
    metadata: dict = field(default_factory=dict)  # free-form, JSON-serialisable, part of content

    def __post_init__(self) -> None:
        if not self.modules:
            raise AdapterFormatError("an adapter needs at least one adapted module")
        if not self.rank:
            self.rank = _most_common([m.rank for m in self.modules.values()])
        if not self.alpha:
            self.alpha = _most_common([m.alpha for m in self.modules.values()])

    # -- math -------------------------------------------------------------------------------
    def scaling(self, module: str) -> float:
        return self.modules[module].scaling(self.use_rslora)

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW = scaling · B @ A`` for one module, ``[d_out, d_in]`` (forms the full matrix)."""
        m = self.modules[module]
        return self.scaling(module) * (m.B.to(dtype) @ m.A.to(dtype))

    @property
    def target_modules(self) -> list[str]:
        """Short names of the adapted projections (``q_proj``, ``down_proj``, ...), sorted."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    # -- canonical bytes ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Canonical safetensors bytes; ``sha256(to_bytes())`` is the content hash."""
        tensors: dict[str, torch.Tensor] = {}
        alphas: dict[str, float] = {}
        for path in sorted(self.modules):
            m = self.modules[path]
            tensors[f"{path}.lora_A"] = m.A.detach().contiguous().cpu()
            tensors[f"{path}.lora_B"] = m.B.detach().contiguous().cpu()
            alphas[path] = float(m.alpha)
        header = {
            "format_version": FORMAT_VERSION,
            "base_model": {"id": self.base_model.id, "fingerprint": self.base_model.fingerprint},
            "use_rslora": bool(self.use_rslora),
            "rank": int(self.rank),
            "alpha": float(self.alpha),
            "alphas": alphas,
            "metadata": self.metadata,
        }
        meta = {"quiver": json.dumps(header, sort_keys=True, separators=(",", ":"))}
        return st_save(tensors, metadata=meta)

    def content_hash(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> LoraAdapter:
        """Parse canonical bytes (safetensors only; nothing is unpickled)."""
        try:
            header_len = int.from_bytes(data[:8], "little")
            raw_header = json.loads(data[8 : 8 + header_len])
            tensors = st_load(data)
        except (SafetensorError, ValueError, UnicodeDecodeError) as e:
            raise AdapterFormatError(f"adapter {name!r}: corrupt safetensors data ({e})") from e
        try:
            header = json.loads(raw_header["__metadata__"]["quiver"])
            if header["format_version"] != FORMAT_VERSION:
                raise AdapterFormatError(
                    f"adapter {name!r}: format version {header['format_version']} "
                    f"is not supported (this Quiver reads version {FORMAT_VERSION})"
                )
            modules = {
                path: LoraModule(
                    A=tensors[f"{path}.lora_A"], B=tensors[f"{path}.lora_B"], alpha=alpha
                )
                for path, alpha in header["alphas"].items()
            }
            base = BaseModelRef(**header["base_model"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise AdapterFormatError(f"adapter {name!r}: malformed quiver header ({e})") from e
        return cls(
            name=name,
            base_model=base,
            modules=modules,
            use_rslora=header["use_rslora"],
            rank=header["rank"],
            alpha=header["alpha"],
            metadata=header.get("metadata", {}),
        )


def _most_common(values: list):
    return max(set(values), key=lambda v: (values.count(v), v))
