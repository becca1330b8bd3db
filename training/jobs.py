"""`quiver train` jobs: a composed config in, a trained router or adapter stored in the library.

Everything is checked before the (long) training starts: the data files parse, the name is
valid and free (unless ``replace=true``), the adapters exist, the router is trainable. The
library is written only after training succeeded, so a failed or interrupted run leaves it as
it was (with ``train.checkpoint_dir``, a rerun resumes).
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig, OmegaConf

from quiver.library import DuplicateNameError, Library, check_name, load_base_model
from quiver.merging.mos import MoSConfig, save_mos

from .adapter import train_lora, train_mos
from .data import read_examples
from .loop import TrainConfig, TrainResult

ADAPTER_KINDS = ("lora", "mos", "mhr", "mhr_mu")


def train_config(cfg: DictConfig) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in OmegaConf.to_container(cfg.train).items() if k in fields})


def run_train_job(cfg: DictConfig, lib: Library, what: str) -> dict:
    """Train what ``cfg`` describes (``what``: "adapter" or "router"); returns a summary."""
    if not cfg.data:
        raise ValueError("give the training examples: data=path.jsonl")
    if not cfg.name:
        raise ValueError("name the result: name=NAME")
    name = check_name(cfg.name)
    train = read_examples(cfg.data)
    valid = read_examples(cfg.valid) if cfg.valid else []
    tcfg = train_config(cfg)
    kind = cfg.adapter.kind if what == "adapter" else None
    if what == "adapter" and kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(ADAPTER_KINDS)}")
    _check_free(lib, name, kind or "router", cfg.replace)
    model, tok = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                                 dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)
    common = dict(config=tcfg, valid=valid, chat_template=cfg.train.chat_template,
                  max_length=cfg.train.max_length, checkpoint_dir=cfg.train.checkpoint_dir)
    if what == "router":
        summary, result = _train_router(cfg, lib, model, tok, name, train, common)
    elif kind == "lora":
        a = cfg.adapter
        adapter, result = train_lora(model, tok, train, name, targets=list(a.targets), rank=a.rank,
                                     alpha=a.alpha, dropout=a.dropout, **common)
        rec = lib.add(adapter, name, description=cfg.description, examples=_examples(train),
                      tags=["trained"], replace=cfg.replace)
        summary = {"adapter": rec.name, "version": rec.version, "rank": rec.rank}
    elif kind == "mos":
        a = OmegaConf.to_container(cfg.adapter)
        a.pop("kind")
        targets = a.pop("targets")
        mos, result = train_mos(model, tok, train, name, mos=MoSConfig(**a), targets=targets, **common)
        summary = {"mos": name, "version": save_mos(lib, name, mos), "parameters": mos.num_parameters()}
    else:
        summary, result = _train_mhr(cfg, lib, model, tok, name, kind, train, common)
    return {**summary, **_losses(result)}


def _train_router(cfg, lib, model, tok, name, train, common) -> tuple[dict, TrainResult]:
    from hydra.utils import instantiate

    from quiver.routing import LearnedRouter, save_router
    from quiver.runtime import RoutedModel

    from .router import train_router

    router_cfg = cfg.router
    if "tasks" in router_cfg and not router_cfg.tasks:  # per-task routers: the tasks of the data
        tasks = sorted({ex.get("task") for ex in train} - {None})
        if not tasks:
            raise ValueError(f"router={cfg.router._target_.rsplit('.', 1)[-1]} needs a \"task\" field in the data")
        router_cfg = OmegaConf.merge(router_cfg, {"tasks": tasks})
    router = instantiate(router_cfg)
    if not isinstance(router, LearnedRouter):
        raise ValueError(f"{type(router).__name__} learns nothing; train router=moe, mhr or poly")
    rm = RoutedModel(model, lib, router=router, adapters=list(cfg.adapters) or None)
    result = train_router(rm, router, tok, train, **common)
    version = save_router(lib, name, router)
    return {"router": name, "type": type(router).__name__, "version": version, "adapters": router.adapters}, result


def _train_mhr(cfg, lib, model, tok, name, kind, train, common) -> tuple[dict, TrainResult]:
    from .mhr import mhr_mu, mhr_pretrain

    a = cfg.adapter
    if kind == "mhr":
        router, result = mhr_pretrain(model, tok, train, lib, skills=a.skills, n_splits=a.n_splits,
                                      rank=a.rank, alpha=a.alpha, targets=list(a.targets),
                                      temperature=a.temperature, name_prefix=name, router_name=name,
                                      replace=cfg.replace, **common)
        return {"router": name, "skills": router.adapters}, result
    if not cfg.adapters:
        raise ValueError("adapter=mhr_mu averages skills: name them with adapters=[a,b,...]")
    adapter, result = mhr_mu(model, tok, lib, list(cfg.adapters), train, name, **common)
    rec = lib.add(adapter, name, description=cfg.description, examples=_examples(train), tags=["trained"],
                  replace=cfg.replace)
    return {"adapter": rec.name, "version": rec.version, "from_skills": list(cfg.adapters)}, result


def _check_free(lib: Library, name: str, kind: str, replace: bool) -> None:
    if replace:
        return
    if kind in ("lora", "mhr_mu") and name in lib.names():
        raise DuplicateNameError(f"an adapter named {name!r} already exists (replace=true makes a new version)")
    artefact = {"router": "router", "mhr": "router", "mos": "mos"}.get(kind)
    if artefact and any(r["name"] == name for r in lib.artifacts(artefact)):
        raise DuplicateNameError(f"a {artefact} named {name!r} already exists (replace=true makes a new version)")


def _examples(train: list[dict], n: int = 5) -> list[str]:
    return [ex["prompt"] for ex in train[:n]]


def _losses(result: TrainResult) -> dict:
    out = {"steps": result.steps, "first_loss": round(result.history[0]["loss"], 4) if result.history else None,
           "final_loss": round(result.final_loss, 4)}
    if result.evals:
        out["valid_loss"] = round(result.evals[-1].get("valid_loss", float("nan")), 4)
    return out
