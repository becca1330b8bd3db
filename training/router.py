"""Train a learned router inside a RoutedModel with the base model and the adapters frozen.

The loss is the causal-LM loss on the answers plus the router's auxiliary loss (e.g. the MoE
gate's load balancing), one forward pass per micro-batch. Per-example routers receive each
batch's prompts and task names through ``router.prepare`` before the forward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from quiver.routing import LearnedRouter
from quiver.runtime import RoutedModel

from .adapter import frozen
from .data import batch_lm_loss, encode_examples, mean_loss, takes_logits_to_keep
from .loop import Trainer, TrainConfig, TrainResult


def router_loss_fn(rm: RoutedModel, router: LearnedRouter, tok, chat_template: bool = True,
                   max_length: int = 256, with_aux: bool = True):
    """``loss_fn(examples)``: LM loss of ``rm`` routed by ``router`` (+ its auxiliary loss)."""
    device = next(rm.model.parameters()).device
    at_targets = takes_logits_to_keep(rm.model)  # RoutedModel passes it on to the model

    def loss_fn(examples: list):
        router.prepare(prompts=[ex["prompt"] for ex in examples], tasks=[ex.get("task") for ex in examples])
        batch = encode_examples(tok, examples, chat_template, max_length, device)
        router.aux_loss()  # drop anything collected outside this step
        loss = batch_lm_loss(rm, batch, at_targets, routers=[router] * len(examples))  # one request per example
        aux = router.aux_loss() if with_aux else None
        return loss + aux if aux is not None else loss

    return loss_fn


def train_router(rm: RoutedModel, router: LearnedRouter, tok, train: Sequence[dict], *,
                 config: TrainConfig | None = None, valid: Sequence[dict] = (), chat_template: bool = True,
                 max_length: int = 256, checkpoint_dir: str | os.PathLike | None = None) -> TrainResult:
    """Fit ``router.trainable()`` on ``train``; ``valid`` gives the eval hook's ``valid_loss``
    (the LM loss alone, without the auxiliary term)."""
    if not isinstance(router, LearnedRouter):
        raise TypeError(f"{type(router).__name__} has nothing to train")
    rm.bind(router)  # parameters that depend on the library exist once bound
    params = {n: p for n, p in router.named_parameters() if any(p is q for q in router.trainable())}
    if not params:
        raise ValueError(f"{type(router).__name__} has no trainable parameters")
    with frozen(rm.model):
        for p in params.values():
            p.requires_grad_(True)
        loss_fn = router_loss_fn(rm, router, tok, chat_template, max_length)
        eval_loss = router_loss_fn(rm, router, tok, chat_template, max_length, with_aux=False)
        eval_fn = (lambda: {"valid_loss": mean_loss(eval_loss, valid)}) if valid else None
        return Trainer(params, loss_fn, train, config, eval_fn=eval_fn, modules=[router],
                       checkpoint_dir=checkpoint_dir, desc=f"router {type(router).__name__}").fit()
