"""`quiver train` jobs: a composed config in, a trained router or adapter stored in the library.

What to train is the config's choice, never the command line's spelling: ``conf/train.yaml``
defaults both ``router`` and ``adapter`` to null and exactly one must be chosen. Each option of
``conf/adapter/`` names its job class with ``_target_`` (:class:`LoraJob`, :class:`MoSJob`,
:class:`MHRJob`, :class:`MHRMuJob`); a router option is trained by :class:`RouterJob`. A job
says what it stores (``stores``: an adapter, or an artefact kind) and ``run``s on a
:class:`JobInputs`.

Everything is checked before the (long) training starts: the data files parse, the name is
valid and free (unless ``replace=true``), the adapters exist, the router is trainable. The
library is written only after training succeeded, so a failed or interrupted run leaves it as
it was (with ``train.checkpoint_dir``, a rerun resumes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from quiver.library import DuplicateNameError, Library, check_name, load_base_model
from quiver.merging.mos import MoSConfig, save_mos

from .adapter import train_lora, train_mos
from .data import read_examples
from .loop import TrainConfig, TrainResult

WHAT = "say what to train: router=moe|mhr|poly or adapter=lora|mos|mhr|mhr_mu"


@dataclass
class JobInputs:
    """What every job gets: the model, the library, the result's name and the examples."""

    model: Any
    tok: Any
    lib: Library
    name: str
    train: list[dict]
    common: dict  # config, valid, chat_template, max_length, checkpoint_dir (the loop's keywords)
    description: str = ""
    replace: bool = False
    adapters: list[str] = field(default_factory=list)  # the library adapters the result is made of


@dataclass
class LoraJob:
    """``adapter=lora``: one LoRA, registered as an adapter."""

    targets: Sequence[str] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    stores: ClassVar[str] = "adapter"

    def run(self, job: JobInputs) -> tuple[dict, TrainResult]:
        adapter, result = train_lora(job.model, job.tok, job.train, job.name, targets=list(self.targets),
                                     rank=self.rank, alpha=self.alpha, dropout=self.dropout, **job.common)
        rec = _register(job, adapter)
        return {"adapter": rec.name, "version": rec.version, "rank": rec.rank}, result


class MoSJob:
    """``adapter=mos``: a MoS adapter (shard pools), stored as a ``"mos"`` artefact."""

    stores: ClassVar[str] = "mos"

    def __init__(self, targets: Sequence[str] = ("q_proj", "v_proj"), **mos):
        self.targets = list(targets)
        self.mos = MoSConfig(**mos)  # every other key is a MoSConfig field

    def run(self, job: JobInputs) -> tuple[dict, TrainResult]:
        mos, result = train_mos(job.model, job.tok, job.train, job.name, mos=self.mos, targets=self.targets,
                                **job.common)
        return {"mos": job.name, "version": save_mos(job.lib, job.name, mos),
                "parameters": mos.num_parameters()}, result


@dataclass
class MHRJob:
    """``adapter=mhr``: multi-task pre-training of a skill inventory (adapters NAME-0..) and its
    routing logits (the router artefact NAME); the data needs "task"."""

    skills: int = 4
    n_splits: int = 1
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = ("q_proj", "v_proj")
    temperature: float = 1.0
    stores: ClassVar[str] = "router"

    def run(self, job: JobInputs) -> tuple[dict, TrainResult]:
        from .mhr import mhr_pretrain

        router, result = mhr_pretrain(job.model, job.tok, job.train, job.lib, skills=self.skills,
                                      n_splits=self.n_splits, rank=self.rank, alpha=self.alpha,
                                      targets=list(self.targets), temperature=self.temperature,
                                      name_prefix=job.name, router_name=job.name, replace=job.replace,
                                      **job.common)
        return {"router": job.name, "skills": router.adapters}, result


@dataclass
class MHRMuJob:
    """``adapter=mhr_mu``: average the skills ``adapters=[...]`` into one LoRA and fine-tune it."""

    stores: ClassVar[str] = "adapter"

    def run(self, job: JobInputs) -> tuple[dict, TrainResult]:
        from .mhr import mhr_mu

        if not job.adapters:
            raise ValueError("adapter=mhr_mu averages skills: name them with adapters=[a,b,...]")
        adapter, result = mhr_mu(job.model, job.tok, job.lib, job.adapters, job.train, job.name, **job.common)
        rec = _register(job, adapter)
        return {"adapter": rec.name, "version": rec.version, "from_skills": job.adapters}, result


@dataclass
class RouterJob:
    """``router=moe|mhr|poly``: train a learned router over library adapters, saved as an artefact."""

    router_cfg: DictConfig
    stores: ClassVar[str] = "router"

    def run(self, job: JobInputs) -> tuple[dict, TrainResult]:
        from hydra.utils import instantiate

        from quiver.routing import LearnedRouter, save_router
        from quiver.runtime import RoutedModel

        from .router import train_router

        router_cfg = self.router_cfg
        if "tasks" in router_cfg and not router_cfg.tasks:  # per-task routers: the tasks of the data
            tasks = sorted({ex.get("task") for ex in job.train} - {None})
            if not tasks:
                raise ValueError(f"router={router_cfg._target_.rsplit('.', 1)[-1]} needs a \"task\" field in the data")
            router_cfg = OmegaConf.merge(router_cfg, {"tasks": tasks})
        router = instantiate(router_cfg)
        if not isinstance(router, LearnedRouter):
            raise ValueError(f"{type(router).__name__} learns nothing; train router=moe, mhr or poly")
        rm = RoutedModel(job.model, job.lib, router=router, adapters=job.adapters or None)
        result = train_router(rm, router, job.tok, job.train, **job.common)
        version = save_router(job.lib, job.name, router)
        return {"router": job.name, "type": type(router).__name__, "version": version,
                "adapters": router.adapters}, result


def train_config(cfg: DictConfig) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in OmegaConf.to_container(cfg.train).items() if k in fields})


def build_job(cfg: DictConfig):
    """The job ``cfg`` (``conf/train.yaml``) chooses: exactly one of ``router=`` / ``adapter=``."""
    from hydra.utils import instantiate

    router_cfg, adapter_cfg = cfg.get("router"), cfg.get("adapter")
    if (router_cfg is None) == (adapter_cfg is None):
        raise ValueError(WHAT)
    return RouterJob(router_cfg) if router_cfg is not None else instantiate(adapter_cfg)


def run_train_job(cfg: DictConfig, lib: Library) -> dict:
    """Train what ``cfg`` describes; returns a summary (the result's name, version, losses)."""
    job = build_job(cfg)
    if not cfg.data:
        raise ValueError("give the training examples: data=path.jsonl")
    if not cfg.name:
        raise ValueError("name the result: name=NAME")
    name = check_name(cfg.name)
    train = read_examples(cfg.data)
    valid = read_examples(cfg.valid) if cfg.valid else []
    tcfg = train_config(cfg)
    _check_free(lib, name, job.stores, cfg.replace)
    model, tok = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                                 dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)
    common = dict(config=tcfg, valid=valid, chat_template=cfg.train.chat_template,
                  max_length=cfg.train.max_length, checkpoint_dir=cfg.train.checkpoint_dir)
    inputs = JobInputs(model, tok, lib, name, train, common, description=cfg.description, replace=cfg.replace,
                       adapters=list(cfg.adapters or []))
    summary, result = job.run(inputs)
    return {**summary, **_losses(result)}


def _register(job: JobInputs, adapter):
    return job.lib.add(adapter, job.name, description=job.description, examples=_examples(job.train),
                       tags=["trained"], replace=job.replace)


def _check_free(lib: Library, name: str, stores: str, replace: bool) -> None:
    if replace:
        return
    if stores == "adapter":
        if name in lib.names():
            raise DuplicateNameError(f"an adapter named {name!r} already exists (replace=true makes a new version)")
    elif any(r["name"] == name for r in lib.artifacts(stores)):
        raise DuplicateNameError(f"a {stores} named {name!r} already exists (replace=true makes a new version)")


def _examples(train: list[dict], n: int = 5) -> list[str]:
    return [ex["prompt"] for ex in train[:n]]


def _losses(result: TrainResult) -> dict:
    out = {"steps": result.steps, "first_loss": round(result.history[0]["loss"], 4) if result.history else None,
           "final_loss": round(result.final_loss, 4)}
    if result.evals:
        out["valid_loss"] = round(result.evals[-1].get("valid_loss", float("nan")), 4)
    return out
