"""Train adapters with the shared loop: a plain LoRA, or a MoS adapter (shard pools).

The base model is frozen for the duration (its ``requires_grad`` flags are restored after) and
never modified; the trained factors come back as a :class:`~quiver.library.LoraAdapter` (or a
``MoSAdapter``) ready for ``Library.add`` (``save_mos``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from quiver.library import LoraAdapter
from quiver.merging.mos import MoSAdapter, MoSConfig

from .data import make_lm_loss, mean_loss, takes_logits_to_keep
from .lora import LoraParams
from .loop import Trainer, TrainConfig, TrainResult
from .mos import MoSModel


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Freeze every parameter of ``model``; restore the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _device(model: nn.Module):
    return next(model.parameters()).device


def train_lora(model: nn.Module, tok, train: Sequence[dict], name: str, *,
               targets: Sequence[str] = ("q_proj", "v_proj"), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, config: TrainConfig | None = None, valid: Sequence[dict] = (),
               init: LoraAdapter | None = None, chat_template: bool = True, max_length: int = 256,
               checkpoint_dir: str | os.PathLike | None = None, snapshot_steps: Sequence[int] = (),
               on_snapshot: Callable[[int, LoraAdapter, float | None], None] | None = None,
               factor_init: str = "a-random", lr_a_ratio: float = 1.0) -> tuple[LoraAdapter, TrainResult]:
    """Train one LoRA on ``train`` (examples with ``prompt``/``answer``); returns it and the log.

    ``init``: start from this adapter (MHR-μ fine-tunes the averaged skills this way); else the
    factors start as ``factor_init`` says (``"a-random"``: PEFT's, ``"b-random"``: A = 0 and B
    random; see :data:`~quiver.training.lora.FACTOR_INITS`). ``lr_a_ratio``: A learns at this
    multiple of ``config.lr`` (B at ``config.lr``).
    ``valid``: examples whose mean loss the evaluation hook reports as ``valid_loss``.
    ``snapshot_steps`` / ``on_snapshot(step, adapter, valid_loss)``: the adapter as it is after
    those steps of this one run (its learning-rate schedule spans ``config.steps``), e.g. to
    measure a quantity against the training budget without training once per budget.
    """
    config = config or TrainConfig()
    lora = LoraParams(model, targets, rank=rank, alpha=alpha, dropout=dropout,
                      init=[init] if init is not None else None, seed=config.seed, factor_init=factor_init)
    try:
        with frozen(model):
            loss_fn = make_lm_loss(model, tok, chat_template, max_length, _device(model))
            eval_fn = (lambda: {"valid_loss": mean_loss(loss_fn, valid)}) if valid else None
            wanted = {s for s in snapshot_steps if s < config.steps}

            def snapshot(step: int) -> None:
                if step in wanted and on_snapshot is not None:
                    with torch.no_grad():
                        on_snapshot(step, lora.to_adapter(name), mean_loss(loss_fn, valid) if valid else None)

            params = dict(lora.named_parameters())
            lr_scale = {k: lr_a_ratio for k in params if k.startswith("A.")} if lr_a_ratio != 1.0 else None
            result = Trainer(params, loss_fn, train, config, eval_fn=eval_fn, lr_scale=lr_scale,
                             modules=[lora], checkpoint_dir=checkpoint_dir, desc=f"lora {name}",
                             on_step=snapshot).fit()
        return lora.to_adapter(name), result
    finally:
        lora.detach()


def train_mos(model: nn.Module, tok, train: Sequence[dict], name: str, *, mos: MoSConfig | None = None,
              targets: Sequence[str] = ("q_proj", "v_proj"), config: TrainConfig | None = None,
              valid: Sequence[dict] = (), chat_template: bool = True, max_length: int = 256,
              checkpoint_dir: str | os.PathLike | None = None) -> tuple[MoSAdapter, TrainResult]:
    """Train a MoS adapter (its shard pools) on ``train``; returns it and the log."""
    config = config or TrainConfig()
    with frozen(model):
        wrapped = MoSModel(model, mos or MoSConfig(), targets)
        try:
            wrapped.mos.name = name
            loss_fn = make_lm_loss(wrapped, tok, chat_template, max_length, _device(model),
                                   at_targets=takes_logits_to_keep(model))  # MoSModel passes it on
            eval_fn = (lambda: {"valid_loss": mean_loss(loss_fn, valid)}) if valid else None
            params = {k: p for k, p in wrapped.mos.named_parameters() if p.requires_grad}
            result = Trainer(params, loss_fn, train, config, eval_fn=eval_fn, modules=[wrapped.mos],
                             checkpoint_dir=checkpoint_dir, desc=f"mos {name}").fit()
        finally:
            wrapped.remove()
    return wrapped.mos, result
