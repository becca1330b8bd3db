"""Fold merged task vectors into a base model and write a Hugging Face checkpoint.

``θ = θ₀ + λ τ_m`` for every tensor some source changes; every other tensor is copied as is.
The result is written as sharded safetensors plus ``model.safetensors.index.json``, with the
base directory's config, generation config and tokenizer files copied beside them, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it unchanged.

Memory: one tensor at a time. The shard layout is planned from the base's headers (sizes are
known before any data is read), each shard's header is written first and its tensors are then
merged and appended one by one, so peak memory is one tensor's task vectors plus the
interpreter, not a copy of the model. Nothing is half-written: the output is assembled in a
temporary directory next to ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from quiver.library.adapter import LoraAdapter
from quiver.library.base_model import FINGERPRINT_FILE
from quiver.library.errors import ValidationError
from quiver.library.paths import check_output_dir, publish, staging_dir

from .inputs import INDEX_NAME, CheckpointDir, Source, TaskVectors, TensorInfo, warn_degenerate
from .methods import MergeSpec, build, check_weights

PROVENANCE_NAME = "quiver_merge.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_ITEM_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
}  # fmt: skip


def merge_to_checkpoint(
    base_model_dir: str | os.PathLike,
    sources: Sequence[LoraAdapter | str | os.PathLike],
    out_dir: str | os.PathLike,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    protect: Sequence[str | os.PathLike] = (),
    overwrite_hint: str = "overwrite=True",
    **params,
) -> Path:
    """Merge adapters and/or fine-tuned checkpoint directories into the base model's weights.

    ``sources``: :class:`LoraAdapter` objects (module paths are the base's, the weight is
    ``{path}.weight``) and/or paths of full fine-tuned checkpoints of the same base. ``weights``
    are per source; ``params`` the method's (see :data:`quiver.merging.METHODS`). An existing,
    ``out_dir`` follows the output-path rule of :mod:`quiver.library.paths` (never the current
directory, a library, a folder holding an input or one of ``protect``, or a file; an existing
checkpoint is replaced only with ``overwrite``, written beside it and swapped in). The base's
``quiver-fingerprint.json`` is not copied: the merged weights have their own fingerprint.
Returns the output directory.
    """
    out = Path(out_dir)
    base = CheckpointDir(base_model_dir)
    readers = [s if isinstance(s, LoraAdapter) else CheckpointDir(s) for s in sources]
    if not readers:
        raise ValidationError("nothing to merge: no adapters or checkpoints given")
    check_output_dir(out, "checkpoint", overwrite=overwrite, hint=overwrite_hint,
                     protect=[base.path, *(r.path for r in readers if isinstance(r, CheckpointDir)), *protect])
    warn_degenerate([_label(r) for r in readers])
    task_vectors = TaskVectors(base, readers)
    w = check_weights(weights, len(readers), "sources")
    spec = build(method, **params)
    shard_limit = _parse_size(max_shard_size)

    staging = staging_dir(out)
    try:
        _write_weights(staging, base, task_vectors, spec, w, shard_limit, progress)
        _copy_side_files(base.path, staging)
        provenance = {
            "method": spec.method,
            "params": spec.params,
            "base_model": str(base.path),
            "sources": [_label(r) for r in readers],
            "weights": w.tolist(),
        }
        (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_weights(
    staging: Path,
    base: CheckpointDir,
    task_vectors: TaskVectors,
    spec: MergeSpec,
    weights: torch.Tensor,
    shard_limit: int,
    progress: bool = False,
) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(base.tensors), desc=f"merging ({spec.method})", unit="tensor", disable=not progress)
    stats = spec.model_stats(lambda: (task_vectors.stack(name) for name in task_vectors.names))
    changed = set(task_vectors.names)

    def merged(name: str) -> torch.Tensor:
        bar.update()
        theta = base.read(name)
        if name not in changed:
            return theta
        tau = spec.merge(task_vectors.stack(name, theta), weights, stats, key=name)
        return (theta.float() + spec.lambda_ * tau).to(theta.dtype)

    shards = plan_shards(base.tensors, shard_limit)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(staging / file, {n: base.tensors[n] for n in names}, map(merged, names))
        weight_map.update(dict.fromkeys(names, file))
    bar.close()
    total = sum(_nbytes(info) for info in base.tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(tensors: dict[str, TensorInfo], limit: int) -> list[list[str]]:
    """Tensor names in order, cut greedily into shards of at most ``limit`` bytes (a single
    larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.items():
        nbytes = _nbytes(info)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(
    path: Path, layout: dict[str, TensorInfo], tensors: Iterable[torch.Tensor]
) -> None:
    """Stream a safetensors file: the header from ``layout`` (name → dtype, shape, in order),
    then each tensor's bytes as ``tensors`` yields them, one in memory at a time.

    Written here rather than with ``safetensors.torch.save_file`` because that takes every
    tensor of a shard at once; streaming keeps peak memory near one tensor (the format is a
    length-prefixed JSON header plus raw little-endian bytes, which ``safe_open`` reads back)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info in layout.items():
        header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                        "data_offsets": [offset, offset + _nbytes(info)]}  # fmt: skip
        offset += _nbytes(info)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, info), tensor in zip(layout.items(), tensors, strict=True):
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            if tuple(tensor.shape) != info.shape or data.numel() != _nbytes(info):
                raise RuntimeError(f"tensor {name!r} does not match its planned layout")
            f.write(memoryview(data.numpy()))
        f.flush()
        os.fsync(f.fileno())


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * _ITEM_SIZE[info.dtype]


def _copy_side_files(base: Path, staging: Path) -> None:
    """Config, generation config, tokenizer, chat template...: every top-level file of the base
    directory that is not a weight file, a weight index or the base's fingerprint record."""
    for item in base.iterdir():
        if (item.is_file() and not item.name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))
                and item.name != FINGERPRINT_FILE):
            shutil.copy2(item, staging / item.name)


def _label(source: Source) -> str:
    return source.name if isinstance(source, LoraAdapter) else str(source.path)


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"`` or ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValidationError(
            f"max_shard_size must be bytes or like '500MB' / '2GiB', got {size!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
