"""`quiver merge`: merge library adapters into one LoRA or into the base weights (conf/merge.yaml).

Each ``output=`` option (``conf/output/``) names its class with ``_target_``: :class:`LoraOutput`
(register the merge as an adapter, optionally also export it as PEFT) or
:class:`CheckpointOutput` (a full model directory). An output ``check``s everything before the
merge runs and then ``write``s it.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer
from omegaconf import OmegaConf

from .common import JsonOpt, LibraryOpt, command_config, console, emit, existing_library, table

__all__ = ["CheckpointOutput", "LoraOutput", "merge_cmd"]


@dataclass
class LoraOutput:
    """``output=lora``: the merge as one LoRA adapter, registered in the library as ``name``."""

    name: str = "merged"
    rank: int | None = None  # null: exact concatenation for linear methods, else the largest source rank
    path: str | None = None  # also write a PEFT directory here
    overwrite: bool = False  # allow replacing a previous PEFT export at ``path``
    replace: bool = False  # replace an adapter of the same name in the library

    def check(self, lib) -> None:
        from quiver.library import check_name
        from quiver.library.paths import check_output_dir

        check_name(self.name)
        if self.name in lib and not self.replace:
            raise ValueError(f"an adapter named {self.name!r} already exists; "
                             "choose another output.name or pass output.replace=true")
        if self.path:
            check_output_dir(self.path, "peft", overwrite=self.overwrite, protect=[lib.path],
                             hint="output.overwrite=true")

    def write(self, lib, cfg, adapters, names, method, weights, params) -> dict:
        from quiver.merging import merge

        merged = merge(adapters, method=method, weights=weights, rank=self.rank, name=self.name,
                       progress=True, **params)
        peft_dir = None
        if self.path:  # written first: a failed export leaves the library unchanged
            from quiver.library import write_peft_dir

            peft_dir = write_peft_dir(merged, self.path, overwrite=self.overwrite, protect=[lib.path],
                                      hint="output.overwrite=true")
        rec = lib.add(merged, self.name, description=f"{method} merge of {', '.join(names)}",
                      tags=["merged"], replace=self.replace)
        report = merged.metadata["merge"]
        result = {"method": method, "adapters": names, "registered": rec.name,
                  "rank": rec.rank, "min_retained_energy": report["min_retained_energy"],
                  "mean_sign_conflict": report["mean_sign_conflict"]}
        if peft_dir is not None:
            result["peft_dir"] = str(peft_dir)
        return result


@dataclass
class CheckpointOutput:
    """``output=checkpoint``: the base model with the merge folded into its weights, written as a
    checkpoint directory at ``path`` (loads with AutoModelForCausalLM)."""

    path: str
    max_shard_size: str = "5GB"
    overwrite: bool = False  # allow replacing a previous checkpoint at ``path``

    def check(self, lib) -> None:
        """Checked by :func:`quiver.merging.merge_to_checkpoint` itself before any work."""

    def write(self, lib, cfg, adapters, names, method, weights, params) -> dict:
        from quiver.library import base_model_dir
        from quiver.merging import merge_to_checkpoint

        path = merge_to_checkpoint(base_model_dir(cfg.model.name, cfg.model.cache_dir), adapters, self.path,
                                   method=method, weights=weights, max_shard_size=self.max_shard_size,
                                   overwrite=self.overwrite, progress=True, protect=[lib.path],
                                   overwrite_hint="output.overwrite=true", **params)
        return {"method": method, "adapters": names, "checkpoint": str(path)}


def _merge_inputs(cfg) -> tuple[list[str], list[float] | None]:
    """The adapter names and weights of a merge, refused when the merge would be degenerate."""
    names = list(cfg.adapters or [])
    if len(names) < 2:
        raise ValueError("a merge needs at least two adapters: adapters=[a,b,...]"
                         + (f" (to copy {names[0]!r}, use `quiver library export`)" if names else ""))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"adapter(s) {dup} listed more than once; to weight one more, use weights=[...]")
    weights = [float(w) if isinstance(w, (int, float)) else w for w in cfg.weights] if cfg.weights is not None else None
    if weights is not None:
        if len(weights) != len(names):
            raise ValueError(f"weights has {len(weights)} value(s) for {len(names)} adapters")
        if not all(isinstance(w, float) for w in weights):
            raise ValueError(f"weights must be numbers, got {list(cfg.weights)}")
        if all(w == 0 for w in weights):
            raise ValueError("weights are all zero: the merge would change nothing")
    return names, weights


def merge_cmd(ctx: typer.Context, library: LibraryOpt = None, as_json: JsonOpt = False):
    """Merge library adapters into one LoRA (registered) or into the base weights (a checkpoint).

    quiver merge merge=ties merge.density=0.2 adapters=\\[a,b,c] output=lora output.name=abc
    quiver merge merge=linear adapters=\\[a,b] weights=\\[0.7,0.3] output=lora output.path=./peft-out
    quiver merge merge=pcb adapters=\\[a,b] output=checkpoint output.path=./merged-model

    Keys: adapters=[...] (two or more, each once); weights=[...] (one per adapter, default 1 each);
    merge=METHOD (conf/merge/*.yaml: ties (the default), linear, task_arithmetic, dare_linear,
    dare_ties, breadcrumbs, pcb, magnitude_prune) and merge.KEY=VALUE; output=lora: output.name
    (registered name), output.rank, output.replace=true (replace an adapter of that name), output.path (also
    export a PEFT directory), output.overwrite=true (replace a previous export there);
    output=checkpoint: output.path (required), output.max_shard_size, output.overwrite=true
    (replace a previous checkpoint there). An output path is never the current directory, the
    library, a folder containing it or a file; everything is checked before the merge runs.
    """
    from hydra.utils import instantiate

    cfg = command_config(ctx, "merge")
    names, weights = _merge_inputs(cfg)
    lib = existing_library(cfg, library)
    output = instantiate(cfg.output)
    lib.require(names)
    output.check(lib)  # every check before the merge work and before any write
    adapters = [lib.get(n) for n in names]
    params = OmegaConf.to_container(cfg.merge)
    method = params.pop("name")
    result = output.write(lib, cfg, adapters, names, method, weights, params)
    if as_json:
        return emit(result, True)
    console.print(table(result, title=f"{method} merge"))
