"""What a merge reads: LoRA adapters and Hugging Face safetensors checkpoint directories.

Validation of the inputs lives here (the boundary): adapters on one base model with one set of
modules, checkpoints with the base's tensor names and shapes. Task vectors are built one tensor
at a time: ``ΔW = scaling · B A`` for an adapter, ``θ − θ₀`` for a fine-tuned checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quiver.library.adapter import LoraAdapter
from quiver.library.errors import ValidationError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHOWN = 5  # how many offending names an error lists


def check_adapters(adapters: Sequence[LoraAdapter]) -> None:
    """One base model (by fingerprint), one module set, one ``ΔW`` shape per module."""
    if not adapters:
        raise ValidationError("nothing to merge: no adapters given")
    first = adapters[0]
    for adapter in adapters[1:]:
        if adapter.base_model.fingerprint != first.base_model.fingerprint:
            raise ValidationError(
                f"adapters are for different base models: {first.name!r} is for "
                f"{_describe(first)}, {adapter.name!r} is for {_describe(adapter)}"
            )
        missing = sorted(set(first.modules) - set(adapter.modules))
        extra = sorted(set(adapter.modules) - set(first.modules))
        if missing or extra:
            raise ValidationError(
                f"adapter {adapter.name!r} adapts other modules than {first.name!r}: "
                f"missing {_names(missing)}, extra {_names(extra)}"
            )
        for path in first.modules:
            if delta_shape(adapter, path) != delta_shape(first, path):
                raise ValidationError(
                    f"module {path!r}: ΔW is {list(delta_shape(adapter, path))} in adapter "
                    f"{adapter.name!r} but {list(delta_shape(first, path))} in {first.name!r}"
                )


def warn_degenerate(names: Sequence[str]) -> None:
    """Warn about merges that are valid but rarely meant: one source (the result is that source,
    rescaled by the method) or a source given twice (it counts twice: weight it instead)."""
    if len(names) == 1:
        warnings.warn(f"merging a single source ({names[0]!r}): the result is that source as the method "
                      "rescales it", stacklevel=3)
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        warnings.warn(f"source(s) {dup} given more than once count once per mention; use weights instead",
                      stacklevel=3)


def write_delta(adapter: LoraAdapter, path: str, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = scaling · B @ A`` (float32 ``[d_out, d_in]``) without a temporary."""
    module = adapter.modules[path]
    torch.matmul(module.B.float(), module.A.float(), out=out)
    return out.mul_(adapter.scaling(path))


def delta_shape(adapter: LoraAdapter, path: str) -> tuple[int, int]:
    module = adapter.modules[path]
    return module.B.shape[0], module.A.shape[1]


def _describe(adapter: LoraAdapter) -> str:
    return f"{adapter.base_model.id!r} (fingerprint {adapter.base_model.fingerprint[:16]})"


def _names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(map(repr, names[:_SHOWN]))
    return f"[{shown}{f', … {len(names) - _SHOWN} more' if len(names) > _SHOWN else ''}]"


@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the checkpoint directory
    dtype: str  # safetensors dtype code: F32, BF16, ...
    shape: tuple[int, ...]


class CheckpointDir:
    """A Hugging Face checkpoint directory with safetensors weights (one file or an index).

    Tensors are read one at a time through ``safe_open``, the file opened for that read only,
    so no mapping of a whole shard stays resident while a merge streams through the model.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValidationError(f"checkpoint directory {str(self.path)!r} does not exist")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            with safe_open(self.path / file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, no dict)
                    piece = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(
                        file, piece.get_dtype(), tuple(piece.get_shape())
                    )

    def _weight_files(self) -> list[str]:
        if (self.path / INDEX_NAME).is_file():
            weight_map = json.loads((self.path / INDEX_NAME).read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        if (self.path / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        raise ValidationError(
            f"{str(self.path)!r} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})"
        )

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.path / self.tensors[name].file, framework="pt") as handle:
            return handle.get_tensor(name)

    def check_matches(self, base: CheckpointDir) -> None:
        """Same tensor names and shapes as the base checkpoint, or an error naming them."""
        missing = sorted(set(base.tensors) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(base.tensors))
        if missing or extra:
            raise ValidationError(
                f"checkpoint {str(self.path)!r} is not a fine-tune of {str(base.path)!r}: "
                f"missing {_names(missing)}, extra {_names(extra)}"
            )
        reshaped = sorted(n for n in base.tensors if base.tensors[n].shape != self.tensors[n].shape)
        if reshaped:
            raise ValidationError(
                f"checkpoint {str(self.path)!r} differs from the base in the shapes of "
                f"{_names(reshaped)}"
            )


Source = LoraAdapter | CheckpointDir


class TaskVectors:
    """The sources' task vectors over a base checkpoint, one weight tensor at a time.

    An adapter's task vector is ``scaling · B A`` on ``{module}.weight`` and zero elsewhere; a
    fine-tuned checkpoint's is ``θ − θ₀`` on every tensor. ``names`` lists, in the base's order,
    the tensors that at least one source changes.
    """

    def __init__(self, base: CheckpointDir, sources: Sequence[Source]) -> None:
        self.base = base
        self.sources = list(sources)
        self._check()
        changed = set()
        for source in self.sources:
            changed |= set(base.tensors) if isinstance(source, CheckpointDir) else _weights(source)
        self.names = [name for name in base.tensors if name in changed]

    def _check(self) -> None:
        adapters = [s for s in self.sources if isinstance(s, LoraAdapter)]
        if adapters:
            check_adapters(adapters)
            for path in adapters[0].modules:
                info = self.base.tensors.get(f"{path}.weight")
                expected = delta_shape(adapters[0], path)
                if info is None or info.shape != expected:
                    found = "no such weight" if info is None else f"weight {list(info.shape)}"
                    raise ValidationError(
                        f"module {path!r} of adapter {adapters[0].name!r} (ΔW {list(expected)}) "
                        f"does not fit the base checkpoint {str(self.base.path)!r}: {found}"
                    )
        for source in self.sources:
            if isinstance(source, CheckpointDir):
                source.check_matches(self.base)

    def stack(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, *shape]`` float32 task vectors of tensor ``name`` (``base``: θ₀, if read)."""
        if base is None and any(isinstance(s, CheckpointDir) for s in self.sources):
            base = self.base.read(name)
        stack = torch.empty((len(self.sources), *self.base.tensors[name].shape))
        path = name.removesuffix(".weight")
        for source, row in zip(self.sources, stack):
            if isinstance(source, CheckpointDir):
                torch.sub(source.read(name).float(), base.float(), out=row)
            elif name.endswith(".weight") and path in source.modules:
                write_delta(source, path, row)
            else:
                row.zero_()
        return stack


def _weights(adapter: LoraAdapter) -> set[str]:
    return {f"{path}.weight" for path in adapter.modules}
