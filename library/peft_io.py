"""PEFT LoRA directories in and out.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module path>.lora_A.weight`` (``[r, d_in]``) and ``...lora_B.weight``
(``[d_out, r]``). Per-module rank and alpha follow ``rank_pattern`` / ``alpha_pattern``
(PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins, else
``r`` / ``lora_alpha``); ``use_rslora`` changes the scaling to ``alpha / sqrt(r)``.
``layers_to_transform`` and ``target_modules`` only decide *which* modules were adapted, which
the weights already say. ``fan_in_fan_out`` never changes the factors' orientation (PEFT only
transposes when merging into a Conv1D weight), so it needs no conversion.

Export writes ``target_modules`` as the exact list of module paths, and ``rank_pattern`` /
``alpha_pattern`` with regex-escaped paths for modules that differ from the nominal values,
so ``PeftModel.from_pretrained`` rebuilds exactly the same adapter.

Unsupported kinds fail with :class:`UnsupportedAdapterError` naming the feature. Weights are
read only from safetensors: a ``.bin`` checkpoint would need unpickling and is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import BaseModelRef, LoraAdapter, LoraModule
from .errors import AdapterFormatError, UnsupportedAdapterError
from .paths import check_output_dir, publish, staging_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")

# Config switches that mean "not a plain LoRA on linear layers", with what to call them.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias terms (lora_bias=true)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "modules_to_save": "fully trained modules (modules_to_save)",
}
# Weight-key fragments of unsupported kinds.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA magnitude vectors",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_tokens": "trainable tokens",
}


def read_peft_config(peft_dir: str | os.PathLike) -> dict:
    peft_dir = Path(peft_dir)
    if not peft_dir.is_dir():
        raise AdapterFormatError(f"{peft_dir}: not a directory")
    cfg_path = peft_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{peft_dir}: missing {CONFIG_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path}: malformed JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{cfg_path}: peft_type {peft_type!r} is not supported; only LORA adapters are"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterFormatError(f"{cfg_path}: {key!r} must be a positive number")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise UnsupportedAdapterError(f"{cfg_path}: {what} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterFormatError(f"{cfg_path}: {key!r} must be an object")
    return cfg


def _pattern_value(pattern: dict, path: str, default):
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default


def read_peft_dir(peft_dir: str | os.PathLike, name: str, base: BaseModelRef) -> LoraAdapter:
    """Read a PEFT LoRA directory into a :class:`LoraAdapter` for the base model ``base``."""
    peft_dir = Path(peft_dir)
    cfg = read_peft_config(peft_dir)
    weights = peft_dir / WEIGHTS_NAME
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise UnsupportedAdapterError(
                f"{peft_dir}: only adapter_model.bin found; pickled weights are never loaded "
                "(save the adapter with safe_serialization=True)"
            )
        raise AdapterFormatError(f"{peft_dir}: missing {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{weights}: corrupt or truncated safetensors ({e})") from e

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for frag, what in _UNSUPPORTED_KEYS.items():
            if frag in key:
                raise UnsupportedAdapterError(f"{weights}: {what} is not supported ({key})")
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterFormatError(f"{weights}: unexpected tensor {key!r}")
        factors.setdefault(m["path"], {})[m["which"]] = t

    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for path, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            missing = "".join(sorted({"A", "B"} - set(ab)))
            raise AdapterFormatError(f"{weights}: module {path} lacks lora_{missing}")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise UnsupportedAdapterError(
                f"{weights}: module {path} has {A.ndim}-d factors; only linear layers are supported"
            )
        r = _pattern_value(rank_pattern, path, cfg["r"])
        if A.shape[0] != r or B.shape[1] != r:
            raise AdapterFormatError(
                f"{weights}: module {path} has rank {A.shape[0]}x{B.shape[1]} in its weights "
                f"but rank {r} in {CONFIG_NAME}"
            )
        alpha = float(_pattern_value(alpha_pattern, path, cfg["lora_alpha"]))
        modules[path] = LoraModule(A=A, B=B, alpha=alpha)
    if not modules:
        raise AdapterFormatError(f"{weights}: no LoRA tensors")
    _warn_config_mismatch(peft_dir, cfg, sorted(modules), base)
    return LoraAdapter(
        name=name,
        base_model=base,
        modules=modules,
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
    )


def _model_key(name: str) -> str:
    """A model name compared loosely: last path part, lower case, without -instruct/-chat."""
    key = str(name).rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-chat", "-it"):
        key = key.removesuffix(suffix)
    return key


def _warn_config_mismatch(peft_dir: Path, cfg: dict, paths: list[str], base: BaseModelRef) -> None:
    """Warn (the adapter is still read) when ``adapter_config.json`` promises modules the weights
    lack, or names a base model other than the library's: shapes alone cannot tell two models of
    one architecture apart."""
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        missing = [t for t in targets if isinstance(t, str)
                   and not any(p == t or p.endswith("." + t) for p in paths)]
        if missing:
            warnings.warn(f"{peft_dir}: {CONFIG_NAME} lists target module(s) {missing} but "
                          f"{WEIGHTS_NAME} has no tensors for them; only the modules present are imported",
                          stacklevel=3)
    named = cfg.get("base_model_name_or_path")
    if isinstance(named, str) and named and base.id and named != base.id:
        a, b = _model_key(named), _model_key(base.id)
        if a not in b and b not in a:
            warnings.warn(f"{peft_dir}: {CONFIG_NAME} says it was trained on {named!r}, but the library's base "
                          f"model is {base.id!r}; the shapes match, so it is imported, but check it belongs "
                          "to this model", stacklevel=3)


def peft_config_for(adapter: LoraAdapter) -> dict:
    """The ``adapter_config.json`` that makes PEFT rebuild ``adapter`` exactly."""
    paths = sorted(adapter.modules)
    rank_pattern = {
        re.escape(p): adapter.modules[p].rank for p in paths if adapter.modules[p].rank != adapter.rank
    }
    alpha_pattern = {
        re.escape(p): adapter.modules[p].alpha
        for p in paths
        if adapter.modules[p].alpha != adapter.alpha
    }
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model.id,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": paths,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": adapter.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_peft_dir(adapter: LoraAdapter, out_dir: str | os.PathLike, overwrite: bool = False, *,
                   protect: Sequence[str | os.PathLike] = (), hint: str = "overwrite=True") -> Path:
    """Write ``adapter`` as a PEFT directory, following the output-path rule of
    :mod:`quiver.library.paths` (``protect``: paths that must survive; ``hint``: how the caller
    asks for an overwrite). Written beside ``out_dir`` and swapped into place."""
    out = check_output_dir(out_dir, "peft", overwrite=overwrite, protect=protect, hint=hint)
    tmp = staging_dir(out)
    try:
        tensors = {}
        for path, m in adapter.modules.items():
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = m.B.contiguous()
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config_for(adapter), indent=2))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
