"""Batched prompt answering with a RoutedModel: what `quiver generate` and the demo call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import RoutedModel
from .trace import Trace


@dataclass
class Answer:
    prompt: str
    text: str
    tokens: list[str]  # every position the trace covers (the padded prompt, then the answer), as text
    adapter_share: dict[str, float] = field(default_factory=dict)  # routing weight carried, by adapter

    def top_adapters(self, n: int = 3) -> list[tuple[str, float]]:
        return list(self.adapter_share.items())[:n]


def render_prompts(tok, prompts: list[str], chat_template: bool = True) -> list[str]:
    """The prompts as the model reads them: in the tokenizer's chat template with a generation
    prompt when ``chat_template`` and the tokenizer has one. Tokenize them with
    ``add_special_tokens=not chat_template``; training renders its prompts the same way."""
    if chat_template and getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True) for p in prompts]
    return list(prompts)


def encode_prompts(tok, prompts: list[str], chat_template: bool = True) -> dict:
    tok.padding_side = "left"
    return tok(render_prompts(tok, prompts, chat_template), return_tensors="pt", padding=True,
               add_special_tokens=not chat_template)


def token_texts(tok, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (``" the"``, not byte-level BPE's ``"Ġthe"``)."""
    return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


@torch.no_grad()
def answer(rm: RoutedModel, tok, prompts: list[str], *, routers=None, tasks: list[str | None] | None = None,
           max_new_tokens: int = 48, do_sample: bool = False, chat_template: bool = True, trace: bool = True,
           **gen_kwargs) -> tuple[list[Answer], Trace | None]:
    """Answer ``prompts`` in one left-padded batch; with ``trace`` also report adapter shares.

    Every router involved first gets the batch's prompts (and ``tasks``, one name per prompt,
    for routers that route by task) through ``Router.prepare``.
    """
    if tasks is not None and len(tasks) != len(prompts):
        raise ValueError(f"{len(tasks)} task names for {len(prompts)} prompts")
    involved = {id(r): r for r in ([rm.router] if routers is None else [r or rm.router for r in routers])}
    for r in involved.values():
        rm.bind(r)
        r.prepare(prompts=list(prompts), tasks=list(tasks) if tasks is not None else None)
    enc = encode_prompts(tok, prompts, chat_template)
    device = next(rm.model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id, **gen_kwargs)
    if trace:
        with rm.tracing() as tr:
            out = rm.generate(**enc, routers=routers, **kwargs)
    else:
        tr = None
        out = rm.generate(**enc, routers=routers, **kwargs)
    width = enc["input_ids"].shape[1]
    answers = []
    for i, p in enumerate(prompts):
        text = tok.decode(out[i, width:], skip_special_tokens=True).strip()
        tokens = token_texts(tok, out[i, : out.shape[1] - 1].tolist())
        answers.append(Answer(p, text, tokens, tr.adapter_share(i) if tr is not None else {}))
    return answers, tr
