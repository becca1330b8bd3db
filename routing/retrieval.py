"""Retrieval: route each request to the adapters whose descriptions best match its prompt.

Index legend: R = requests (batch rows), k = adapters per request, T = tokens.

The recipe of LoraRetriever (Zhao et al., Findings of ACL 2024): embed the prompt, retrieve the
top-k adapters by cosine similarity with their text embeddings (here all-MiniLM-L6-v2 over each
adapter's description and example prompts, searched in the library's faiss index), and apply a
mixture of the retrieved LoRAs to every token of the request:

    s_j = cos(embed(prompt), embed(adapter_j)),  j ∈ top-k,     w_j = softmax_j(s_j / temperature)

LoraRetriever's released code mixes the retrieved LoRAs with equal weights 1/k; that is the
``temperature → ∞`` limit here. The default ``temperature = 0.1`` keeps the mixture soft while
letting the match decide: MiniLM cosines of a relevant and an unrelated adapter typically
differ by 0.2-0.6, i.e. weight ratios of e² to e⁶.

Usage: ``router.prepare(prompts=[...])`` (request i of the next steps = prompt i; one prompt
applies to every request), then forward or ``generate``. The
decision depends on neither module nor x (``per_token = False``): one row per request,
repeated over its tokens. Nothing is learned; ``config()`` saves the arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AdapterSource, Router, RoutingDecision, RoutingSite


class Retrieval(Router):
    per_token = False

    def __init__(self, top_k: int = 2, temperature: float = 0.1, adapters: list[str] | None = None):
        super().__init__(adapters)
        if top_k < 1:
            raise ValueError(f"Retrieval: top_k must be >= 1, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"Retrieval: temperature must be > 0, got {temperature}")
        self.top_k, self.temperature = top_k, float(temperature)
        self.hits: list[list[tuple[str, float]]] | None = None  # per request: [(adapter, cosine)]
        self._library = None
        self._rows: tuple[Tensor, Tensor] | None = None  # indices int64 [R, k], weights float [R, k]
        self._on_device: dict[tuple, tuple[Tensor, Tensor]] = {}

    def bind(self, library, universe: list[str]) -> list[AdapterSource]:
        self._library = library
        return super().bind(library, universe)

    def prepare(self, *, prompts: list[str] | None = None, tasks: list[str | None] | None = None) -> None:
        """Embed all ``prompts`` in one batch and retrieve each one's top-k adapters."""
        if prompts is None:
            raise ValueError("Retrieval routes by prompt: call prepare(prompts=[...])")
        if self._library is None:
            raise RuntimeError("Retrieval: bind the router (build the RoutedModel) before prepare()")
        k = min(self.top_k, len(self.adapters))
        self.hits = self._library.search_many(list(prompts), k, among=self.adapters)
        position = {n: i for i, n in enumerate(self.adapters)}
        idx = torch.full((len(prompts), k), -1, dtype=torch.int64)
        w = torch.zeros(len(prompts), k)
        for r, hits in enumerate(self.hits):
            if hits:
                sims = torch.tensor([s for _, s in hits])
                idx[r, : len(hits)] = torch.tensor([position[n] for n, _ in hits])
                w[r, : len(hits)] = torch.softmax(sims / self.temperature, dim=0)
        self._rows = (idx, w)
        self._on_device.clear()

    def route(self, x: Tensor, site: RoutingSite) -> RoutingDecision:  # x: [T, d_in]
        if self._rows is None:
            raise RuntimeError("Retrieval: call router.prepare(prompts=[...]) before forward/generate")
        return self.table_decision(self._rows, self._on_device, x, site, "prompt")

    def config(self) -> dict:
        return {"top_k": self.top_k, "temperature": self.temperature}
