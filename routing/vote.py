"""Arrow's vote: one mixture per request, chosen by per-token Arrow over the request's prompt.

Index legend: R = requests (batch rows), E = adapters, k = adapters per request.

Per-token Arrow (arrow.py) decides at every token and module. Measured on the shipped task
library (docs/routability.md), a single-task prompt's own adapter wins the *sum* of those
decisions over the prompt (on top for every held-in prompt), while each single decision mostly
goes elsewhere (its share of the weight is about 0.2). ArrowVote takes the sum as the decision.
A **scoring pass** runs the prompt once through the model with per-token Arrow (:attr:`scorer`,
top ``scorer_k``); with w_{m,t,e} its weights at module m and token t::

    votes_e = Σ_{t ∈ task tokens} Σ_m w_{m,t,e}           (mass of adapter e over the prompt)
    S = top-k_e(votes),     w_e = votes_e / Σ_{e' ∈ S} votes_{e'}      (e ∈ S)

and every token of the request, prompt and answer alike, then goes through the mixture S with
weights w (``per_token = False``: one row per request, as retrieval). With ``top_k = 1`` that is
the single adapter Arrow's routing mass points to: the oracle's answer whenever the vote is
right. **Task tokens** are the prompt's tokens after the chat template's leading tokens (the
same in every prompt, so no router can tell tasks apart on them; a prompt with no other token
votes with all of its tokens); the runtime marks them (quiver.runtime.answer.task_token_mask).

Cost: one extra prefill of the prompt, with per-token Arrow. What it gives up: a prompt that
mixes tasks gets one mixture for all of its tokens, where per-token Arrow could switch.

The runtime runs the scoring pass (``prompt_pass = True``, see base.py) and hands the votes to
:meth:`set_votes`; quiver.runtime.answer does it for ``answer`` / ``quiver generate`` and the
server for ``{"router": "arrow-vote"}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .arrow import Arrow
from .base import AdapterSource, Router, RoutingDecision, RoutingSite


class ArrowVote(Router):
    per_token = False
    prompt_pass = True

    def __init__(self, top_k: int = 1, temperature: float = 1.0, scorer_k: int = 2,
                 adapters: list[str] | None = None, general: list[str] | None = None):
        super().__init__(adapters)
        if top_k < 1:
            raise ValueError(f"ArrowVote: top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        # the per-token Arrow of the scoring pass (it validates temperature and scorer_k)
        self.scorer = Arrow(top_k=scorer_k, temperature=temperature, adapters=adapters, general=general)
        self.votes: Tensor | None = None  # float [R, E]: the last scoring pass's mass per adapter
        self._rows: tuple[Tensor, Tensor] | None = None  # indices int64 [R, k], weights float [R, k]
        self._on_device: dict[tuple, tuple[Tensor, Tensor]] = {}

    def config(self) -> dict:
        return {"top_k": self.top_k, "temperature": self.scorer.temperature, "scorer_k": self.scorer.top_k,
                "general": self.scorer.general}

    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        """Route over the scorer's sources, position for position (GenKnowSub's, if ``general``)."""
        self.sources = self.scorer.bind(library, universe)
        self.adapters = list(self.scorer.adapters)
        return self.sources

    def prepare(self, *, prompts: list[str] | None = None, tasks: list[str | None] | None = None) -> None:
        """A new batch: the votes of the previous one no longer apply."""
        self.votes, self._rows = None, None
        self._on_device.clear()

    def set_votes(self, votes: Tensor) -> None:
        """``votes: [R, E]`` (E = len(self.sources), in their order) -> each request's mixture.
        A request with no vote at all gets no adapter (empty slots)."""
        if votes.dim() != 2 or votes.shape[1] != len(self.sources):
            raise ValueError(f"ArrowVote: votes must be [requests, {len(self.sources)}], got {tuple(votes.shape)}")
        votes = votes.detach().float().cpu()
        k = min(self.top_k, votes.shape[1])
        top, idx = votes.sort(dim=1, descending=True, stable=True)  # ties -> the lower index
        top, idx = top[:, :k], idx[:, :k]  # [R, k]
        total = top.sum(1, keepdim=True)
        w = torch.where(total > 0, top / total.clamp(min=1e-30), torch.zeros(()))
        idx = idx.masked_fill(top <= 0, -1)
        self.votes, self._rows = votes, (idx, w)
        self._on_device.clear()

    def mixture(self, row: int = 0) -> dict[str, float]:
        """Request ``row``'s mixture as ``{adapter name: weight}`` (empty when it got none)."""
        if self._rows is None:
            raise RuntimeError("ArrowVote: no votes yet; run the scoring pass first")
        idx, w = self._rows
        return {self.adapters[int(i)]: float(x) for i, x in zip(idx[row], w[row]) if int(i) >= 0}

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        if self._rows is None:
            raise RuntimeError("ArrowVote: no votes for this batch; run the scoring pass first "
                               "(quiver.runtime.answer.cast_votes, or answer(), which runs it)")
        return self.table_decision(self._rows, self._on_device, x, site, "vote")
