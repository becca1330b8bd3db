"""Examples -> token batches, and the causal-LM loss on the answer tokens.

An example is a mapping with ``prompt`` and ``answer`` (and optionally ``task``), as in the
JSON-lines files ``quiver train data=...`` reads. The prompt is rendered exactly as inference
renders it (:func:`quiver.runtime.answer.render_prompts`: the tokenizer's chat template with a
generation prompt, when it has one); the target is the answer followed by the end-of-sequence
token, so a trained adapter learns to stop. The loss is the mean cross-entropy over target
tokens only (prompt and padding are masked with -100).
"""

from __future__ import annotations

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
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def make_lm_loss(forward: Callable[..., object], tok, chat_template: bool = True, max_length: int = 256,
                 device=None, before: Callable[[list], None] | None = None) -> Callable[[list], Tensor]:
    """A ``loss_fn(examples)`` for :class:`~quiver.training.Trainer`: encode, ``forward``, LM loss.

    ``before(examples)`` runs first (e.g. to tell a per-example router the batch's tasks).
    """

    def loss_fn(examples: list) -> Tensor:
        if before is not None:
            before(examples)
        batch = encode_examples(tok, examples, chat_template, max_length, device)
        out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return lm_loss(out.logits, batch["labels"])

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
