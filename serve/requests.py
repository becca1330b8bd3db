"""A completion request as the engine holds it: what it asks (prompt, routing, sampling) and its
state while it runs; and how its next token is drawn."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .routing import RouteSpec
from .text import TextState


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Request:
    """One completion; ``emit`` delivers events to the HTTP side (from the engine thread):
    ``("text", delta)``, ``("done", result dict)`` or ``("error", ApiError)``."""

    spec: RouteSpec
    prompt_ids: list[int]
    route_text: str  # what retrieval embeds
    sampling: Sampling
    emit: Callable[[tuple], None]
    trace: bool = True  # report routing shares (costs a trace of every step)
    cancelled: bool = False
    # engine state
    router: object = None  # the Router serving it, or None when ``fixed`` weights do
    fixed: dict | None = None  # {adapter: weight}, served by the engine's RowWeights router
    text: TextState | None = None
    generated: int = 0
    n_ctx: int = 0  # positions in this request's cache = position of its next token
    last: int = 0
    kv: list | None = None  # its own cache after prefill, until it joins the batch
    shares: dict = field(default_factory=dict)  # adapter -> routing weight × tokens
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


def adapters_used(req: Request) -> list[str]:
    """The adapters a running request may route to."""
    if req.fixed is not None:
        return list(req.fixed)
    return list(getattr(req.router, "adapters", None) or [])


def sample_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:  # logits: [V]
    """Greedy (``temperature == 0``) or a draw from softmax(logits / T) cut to the top-p nucleus
    (the smallest set of most likely tokens whose probability reaches ``top_p``)."""
    logits = logits.float()
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        p, order = probs.sort(descending=True)
        keep = p.cumsum(0) - p < s.top_p  # a token stays if the mass before it is below top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
