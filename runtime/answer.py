"""Batched prompt answering with a RoutedModel: what `quiver generate` and the demo call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

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


def template_head_ids(tok, chat_template: bool = True) -> list[int]:
    """The token ids the chat template puts before every user message (SmolLM2: its default
    system prompt and ``<|im_start|>user``); empty without a template."""
    if not (chat_template and getattr(tok, "chat_template", None)):
        return []
    marker = "\u2063MARK"
    head = render_prompts(tok, [marker], chat_template)[0].split(marker)[0]
    return tok(head, add_special_tokens=False)["input_ids"]


def task_token_mask(head: list[int], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """bool ``[B, T]``: the real tokens of each left-padded row after its leading tokens equal to
    ``head`` (:func:`template_head_ids`; the longest common prefix, so a prompt with its own
    system message keeps its tokens). A row with nothing after the head keeps all its tokens."""
    mask = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    T = ids.shape[1]
    first = T - mask.sum(1)  # left padding: the first real token of each row
    skip = torch.zeros_like(first)
    h = torch.tensor(head, dtype=ids.dtype)
    for i in range(ids.shape[0]):
        row = ids[i, int(first[i]): int(first[i]) + len(head)]
        same = (row == h[: row.numel()]).long()
        skip[i] = int(same.cumprod(0).sum())
    out = mask & (torch.arange(T)[None, :] >= (first + skip)[:, None])
    empty = ~out.any(1)
    out[empty] = mask[empty]
    return out


@torch.no_grad()
def cast_votes(rm: RoutedModel, router, input_ids: Tensor, attention_mask: Tensor, task_mask: Tensor) -> Tensor:
    """The scoring pass of a ``prompt_pass`` router (routing/vote.py): one forward of the
    left-padded prompts with ``router.scorer``; each adapter's routing weight summed over the
    modules and the ``task_mask`` tokens (``[B, E]``, E = the router's sources), handed to
    ``router.set_votes``. Positions follow the mask, as in ``generate``, so that a row's
    votes do not depend on the padding its batch gives it."""
    rm.bind(router)
    rm.bind(router.scorer)
    B = input_ids.shape[0]
    position = {s.key: i for i, s in enumerate(router.sources)}
    pos_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with rm.tracing() as tr:
        rm(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos_ids, use_cache=False,
           routers=[router.scorer] * B)
    votes = torch.zeros(B, len(router.sources))
    take = task_mask.cpu()[..., None]  # [B, T, 1]
    for rec in tr.records:
        idx, w = rec["indices"], rec["weights"]  # [B, T, k], bank slots
        lut = torch.tensor([position.get(k, -1) if k is not None else -1 for k in rec["keys"]] + [-1])
        e = lut[torch.where(idx >= 0, idx, lut.numel() - 1)]  # source positions, -1 = none
        keep = (e >= 0) & take
        votes.scatter_add_(1, e.clamp(min=0).flatten(1), torch.where(keep, w, torch.zeros(())).flatten(1))
    router.set_votes(votes)
    return votes


def prepare_routers(rm: RoutedModel, tok, prompts: list[str], routers, tasks, enc: dict) -> None:
    """Bind every router of a batch, give it the prompts (``Router.prepare``) and run the
    scoring pass of those that decide from one (``prompt_pass``), over their own rows."""
    rows = [rm.router] * len(prompts) if routers is None else [r or rm.router for r in routers]
    involved = {id(r): r for r in rows}
    for r in involved.values():
        rm.bind(r)
        r.prepare(prompts=list(prompts), tasks=list(tasks) if tasks is not None else None)
    voting = [r for r in involved.values() if getattr(r, "prompt_pass", False)]
    if not voting:
        return
    # the template's head whether or not these prompts were rendered in it: the longest common
    # prefix finds it where it is, and the server's completions do the same
    mask = task_token_mask(template_head_ids(tok), enc["input_ids"], enc["attention_mask"])
    for r in voting:
        mine = torch.tensor([i for i, x in enumerate(rows) if x is r])
        votes = torch.zeros(len(prompts), len(r.sources))
        ids, att = enc["input_ids"], enc["attention_mask"]
        votes[mine] = cast_votes(rm, r, ids[mine.to(ids.device)], att[mine.to(att.device)], mask[mine])
        r.set_votes(votes)


@torch.no_grad()
def answer(rm: RoutedModel, tok, prompts: list[str], *, routers=None, tasks: list[str | None] | None = None,
           max_new_tokens: int = 48, do_sample: bool = False, chat_template: bool = True, trace: bool = True,
           **gen_kwargs) -> tuple[list[Answer], Trace | None]:
    """Answer ``prompts`` in one left-padded batch; with ``trace`` also report adapter shares.

    Every router involved first gets the batch's prompts (and ``tasks``, one name per prompt,
    for routers that route by task) through ``Router.prepare``; a router that decides from a
    scoring pass (ArrowVote) then gets its votes (:func:`prepare_routers`).
    """
    if tasks is not None and len(tasks) != len(prompts):
        raise ValueError(f"{len(tasks)} task names for {len(prompts)} prompts")
    enc = encode_prompts(tok, prompts, chat_template)
    device = next(rm.model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    prepare_routers(rm, tok, prompts, routers, tasks, enc)
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
