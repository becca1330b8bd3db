"""Examples -> token batches, and the causal-LM loss on the answer tokens.

An example is a mapping with ``prompt`` and ``answer`` (and optionally ``task``), as in the
JSON-lines files ``quiver train data=...`` reads. The prompt is rendered exactly as inference
renders it (:func:`quiver.runtime.answer.render_prompts`: the tokenizer's chat template with a
generation prompt, when it has one); the target is the answer followed by the end-of-sequence
token, so a trained adapter learns to stop. The loss is the mean cross-entropy over target
tokens only (prompt and padding are masked with -100).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from quiver.runtime.answer import render_prompts
from quiver.tasks import read_jsonl

IGNORE = -100


def read_examples(path: str | Path, require_task: bool = False) -> list[dict]:
    """Examples from a JSON-lines file (:func:`quiver.tasks.read_jsonl`: errors name the line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no data file at {p}")
    out = read_jsonl(p)
    if not out:
        raise ValueError(f"{p} holds no examples")
    if require_task and (bad := next((i for i, ex in enumerate(out) if not isinstance(ex.get("task"), str)), None)) is not None:
        raise ValueError(f"{p}: example {bad + 1} has no string \"task\" field")
    return out


def encode_examples(tok, examples: Sequence[Mapping], chat_template: bool = True,
                    max_length: int = 256, device=None) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, L]`` (right-padded; labels on the
    answer + EOS only). Longer examples are cut from the left of the prompt to ``max_length``."""
    rows = []
    texts = render_prompts(tok, [ex["prompt"] for ex in examples], chat_template)
    for text, ex in zip(texts, examples):
        p = tok(text, add_special_tokens=not chat_template)["input_ids"]
        a = tok(ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + a)[-max_length:]
        labels = ([IGNORE] * len(p) + a)[-max_length:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100."""
    return _mean_ce(logits[:, :-1], labels[:, 1:])


def _mean_ce(logits: Tensor, targets: Tensor) -> Tensor:  # logits [B, L, V] scored against targets [B, L]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def target_positions(labels: Tensor) -> Tensor:
    """The sequence positions whose logits the LM loss reads, in any row of the batch: ``p`` such
    that ``labels[:, p + 1]`` is a target somewhere (1-D, sorted; empty when nothing is)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()


def takes_logits_to_keep(model: Callable[..., object]) -> bool:
    """Whether ``model``'s forward takes transformers' ``logits_to_keep`` (a causal LM's does)."""
    # a module's __call__ is (*args, **kwargs): its forward's signature is the one that counts
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "logits_to_keep" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def batch_lm_loss(forward: Callable[..., object], batch: Mapping[str, Tensor], at_targets: bool, **kwargs) -> Tensor:
    """:func:`lm_loss` of ``forward(input_ids, attention_mask, **kwargs)`` on an encoded batch.

    ``at_targets``: pass ``logits_to_keep`` = :func:`target_positions`, so the vocabulary
    projection runs only where the loss reads it (``forward`` must pass it on to a causal LM).
    The answer tokens of a batch of short answers after long prompts are a small share of its
    positions, and the LM head is about a fifth of SmolLM2-135M's multiply-adds per position,
    forward and backward; the loss is the same mean over the same targets. A 1-D index (the union
    over the batch's rows) is what every transformers release with ``logits_to_keep`` accepts.
    """
    labels = batch["labels"]
    if not at_targets:
        out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        return lm_loss(out.logits, labels)
    pos = target_positions(labels)
    out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=pos, **kwargs)
    return _mean_ce(out.logits, labels[:, pos + 1])


def make_lm_loss(forward: Callable[..., object], tok, chat_template: bool = True, max_length: int = 256,
                 device=None, before: Callable[[list], None] | None = None,
                 at_targets: bool | None = None) -> Callable[[list], Tensor]:
    """A ``loss_fn(examples)`` for :class:`~quiver.training.Trainer`: encode, ``forward``, LM loss.

    ``before(examples)`` runs first (e.g. to tell a per-example router the batch's tasks).
    ``at_targets``: logits only at the targets' positions (:func:`batch_lm_loss`); by default
    when ``forward`` itself takes ``logits_to_keep``. A wrapper that passes keyword arguments
    on to a causal LM says so with ``at_targets=True``.
    """
    if at_targets is None:
        at_targets = takes_logits_to_keep(forward)

    def loss_fn(examples: list) -> Tensor:
        if before is not None:
            before(examples)
        return batch_lm_loss(forward, encode_examples(tok, examples, chat_template, max_length, device), at_targets)

    return loss_fn


@torch.no_grad()
def mean_loss(loss_fn: Callable[[list], Tensor], examples: Sequence, batch_size: int = 16) -> float:
    """Example-weighted mean of ``loss_fn`` over ``examples`` in batches (for eval hooks)."""
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i: i + batch_size])
        total += loss_fn(chunk).item() * len(chunk)
        n += len(chunk)
    return total / max(n, 1)
