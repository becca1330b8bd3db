"""MHR / Poly training modes (Caccia et al. 2023): pre-training, MHR-z and MHR-μ.

- :func:`mhr_pretrain` — multi-task pre-training: a fresh inventory of S skills
  (:class:`~quiver.training.LoraParams` with ``n_skills=S``) and the routing logits
  ``[tasks, H, S]`` of an :class:`~quiver.routing.MHR` router train jointly, through the
  runtime's wrapping: the router (in training mode: relaxed-Bernoulli samples, as in the
  paper's code) mixes the skills' head views per example, exactly as at inference. The skills go into the library as adapters
  ``{name_prefix}-{s}`` and the router as a router artefact over them.
- :func:`mhr_z` — few-shot adaptation: only the routing logits train (new tasks get zero logits,
  i.e. start from uniform mixing); the base model and the skills stay bit-identical.
- :func:`mhr_mu` — average the skills into one adapter (:func:`average_skills`), then fine-tune
  it as a plain LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from quiver.library import LoraAdapter, LoraModule
from quiver.routing import MHR, Poly, save_router
from quiver.runtime import RoutedModel

from .adapter import frozen, train_lora
from .data import make_lm_loss, mean_loss
from .lora import LoraParams
from .loop import Trainer, TrainConfig, TrainResult
from .router import train_router


def _tasks_of(examples: Sequence[dict], what: str) -> list[str]:
    missing = [i for i, ex in enumerate(examples) if not isinstance(ex.get("task"), str)]
    if missing:
        raise ValueError(f"{what} needs a string 'task' in every example; examples {missing[:5]} have none")
    return sorted({ex["task"] for ex in examples})


def mhr_pretrain(model: nn.Module, tok, train: Sequence[dict], library, *, skills: int = 8,
                 n_splits: int = 1, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = ("q_proj", "v_proj"), temperature: float = 1.0,
                 dropout: float = 0.0, config: TrainConfig | None = None, name_prefix: str = "skill",
                 router_name: str = "mhr", valid: Sequence[dict] = (), replace: bool = False,
                 chat_template: bool = True, max_length: int = 256,
                 checkpoint_dir: str | os.PathLike | None = None) -> tuple[MHR, TrainResult]:
    """Pre-train ``skills`` skills and the routing logits on multi-task ``train`` (examples with
    ``prompt``/``answer``/``task``); register them in ``library``; returns the router and the log.

    The router is a :class:`~quiver.routing.Poly` for ``n_splits=1``, else an
    :class:`~quiver.routing.MHR`, over the adapters ``{name_prefix}-0 .. -{skills-1}``, saved as
    router artefact ``router_name``. ``valid``: examples whose mean loss (eval-mode weights)
    the evaluation hook reports as ``valid_loss``. ``replace``: overwrite existing skills.
    """
    config = config or TrainConfig()
    tasks = _tasks_of(train, "MHR pre-training")
    names = [f"{name_prefix}-{s}" for s in range(skills)]
    taken = [n for n in names if n in library]
    if taken and not replace:
        raise ValueError(f"the library already has adapters {taken}; pass replace=True or another name_prefix")
    router = (Poly(tasks, temperature=temperature, adapters=names) if n_splits == 1 else
              MHR(tasks, n_splits=n_splits, temperature=temperature, adapters=names))
    lora = LoraParams(model, targets, rank=rank, alpha=alpha, n_skills=skills, dropout=dropout, seed=config.seed,
                      names=names, router=router)
    device = next(model.parameters()).device
    router.to(device)

    def route(examples: list) -> None:  # this batch's tasks, one per request (row)
        router.prepare(tasks=[ex.get("task") for ex in examples])

    try:
        with frozen(model):
            loss_fn = make_lm_loss(model, tok, chat_template, max_length, device, before=route)
            eval_fn = (lambda: {"valid_loss": mean_loss(loss_fn, valid)}) if valid else None
            params = {f"skills.{k}": p for k, p in lora.named_parameters()} | {"router.logits": router.logits}
            result = Trainer(params, loss_fn, train, config, eval_fn=eval_fn, modules=[lora, router],
                             checkpoint_dir=checkpoint_dir, desc=f"mhr {router_name}").fit()
        for s, name in enumerate(names):
            library.add(lora.to_adapter(name, skill=s), replace=replace,
                        description=f"MHR skill {s} of {skills} ({router_name}; tasks: {', '.join(tasks)})")
    finally:
        lora.detach()
    router.eval()  # the router's inference mode (the final evaluation may leave it training)
    save_router(library, router_name, router)
    return router, result


def mhr_z(rm: RoutedModel, router: MHR, tok, train: Sequence[dict], *, config: TrainConfig | None = None,
          valid: Sequence[dict] = (), chat_template: bool = True, max_length: int = 256,
          checkpoint_dir: str | os.PathLike | None = None) -> TrainResult:
    """MHR-z: fit only ``router.logits`` on ``train`` (examples with ``task``) inside ``rm``.

    Tasks the router does not know yet get new rows of zero logits (uniform mixing) first. The
    base model and the skills (library blobs and the bank) are not touched.
    """
    if not isinstance(router, MHR):
        raise TypeError(f"MHR-z trains an MHR/Poly router, not {type(router).__name__}")
    router.add_tasks(_tasks_of(train, "MHR-z"))
    try:
        return train_router(rm, router, tok, train, config=config, valid=valid, chat_template=chat_template,
                            max_length=max_length, checkpoint_dir=checkpoint_dir)
    finally:
        router.eval()  # the router's inference mode (the final evaluation may leave it training)


def average_skills(skills: Sequence[LoraAdapter], name: str) -> LoraAdapter:
    """The factor-wise mean of ``skills`` (MHR-μ's starting point), per module:

        A_μ = (1/S) Σ_s A_s,     B_μ = (1/S) Σ_s (scaling_s / scaling_μ) B_s

    (a skill without the module counts as zero factors). ``scaling_μ · B_μ A_μ`` is what MHR and
    Poly compute with uniform weights, i.e. the mean of B times the mean of A, not the mean of
    the ΔW. Skills need one rank per module; alpha is the first skill's at each module.
    """
    skills = list(skills)
    if not skills:
        raise ValueError("average_skills needs at least one skill")
    S = len(skills)
    modules = {}
    for path in sorted(set().union(*(s.modules for s in skills))):
        present = [s for s in skills if path in s.modules]
        ranks = {s.name: s.modules[path].rank for s in present}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"averaging mixes factors, so the skills need one rank per module; at {path} "
                             f"they have {ranks}")
        first = present[0].modules[path]
        scaling = first.alpha / first.rank
        A = sum(s.modules[path].A.float() for s in present) / S
        B = sum(s.modules[path].B.float() * (s.scaling(path) / scaling) for s in present) / S
        modules[path] = LoraModule(A=A, B=B, alpha=first.alpha)
    return LoraAdapter(name=name, base_model=skills[0].base_model, modules=modules)


def mhr_mu(model: nn.Module, tok, library, skills: Sequence[str], train: Sequence[dict], name: str, *,
           config: TrainConfig | None = None, valid: Sequence[dict] = (), dropout: float = 0.0,
           chat_template: bool = True, max_length: int = 256,
           checkpoint_dir: str | os.PathLike | None = None) -> tuple[LoraAdapter, TrainResult]:
    """MHR-μ: average the library's ``skills`` (:func:`average_skills`) and fine-tune the result
    as one LoRA on ``train``; returns the adapter (not registered) and the log."""
    init = average_skills([library.get(s) for s in library.require(skills)], name)
    ranks = {m.rank for m in init.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"MHR-μ fine-tunes one LoRA of a single rank; the skills have ranks {sorted(ranks)}")
    return train_lora(model, tok, train, name, targets=sorted(init.modules), rank=init.rank, alpha=init.alpha,
                      dropout=dropout, config=config, valid=valid, init=init, chat_template=chat_template,
                      max_length=max_length, checkpoint_dir=checkpoint_dir)
