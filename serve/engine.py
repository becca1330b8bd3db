"""The engine loop: continuous (iteration-level) batching over a RoutedModel.

Index legend: B = running requests (batch rows), L = cached positions (left-padded), H = KV
heads, D = head dim, V = vocabulary.

One thread owns the model and the library. Each iteration:

1. refresh the catalog (every ``refresh_s``) and, when the library's adapter set changed,
   rebuild the RoutedModel (see *Hot adapters*);
2. drop cancelled requests (client gone) from the queue and from the batch;
3. admit queued requests in FIFO order while the step stays within ``max_batch_tokens``
   (one token per running request + each admitted prompt) and ``max_batch_size`` rows, and
   prefill each one alone (batch 1, its own router) — its first token comes from the prefill;
4. append the prefilled requests' caches to the batch's and run one decoding step for all
   running requests: ``input_ids [B, 1]``, the batch KV cache ``[B, H, L, D]`` left-padded with
   ``attention_mask [B, L + 1]`` (0 on padding) and ``position_ids [B, 1]`` = each request's
   own length, ``routers[i]`` = request i's router, so requests with different routings share
   one forward; finished rows leave (their cache rows are dropped and all-padding columns on
   the left trimmed).

Positions and masks are those ``generate`` gives a request decoded alone, so a greedy
completion equals ``RoutedModel.generate`` of the same prompt and router run alone (tested,
also with other routings in the batch). Sampling is per request (``temperature``, ``top_p``,
its own ``torch.Generator`` seeded by ``seed``), so a seeded request draws the same tokens
whichever requests share its steps.

**Why not transformers' ContinuousBatchingManager.** It packs every request's tokens into one
row (``[1, T]`` with a paged KV cache and a block-diagonal mask) and exposes no token -> request
map. The runtime's step plan takes one (``RoutedModel.forward(..., request_ids=...)``: packed
sequences route per request, tested), but the manager builds its packed batches internally and
calls the model with nothing a router could read, so its requests would all get one router.
Until the engine schedules packed batches itself, a batch of rows over a padded dynamic cache
(one row per request, ``routers[i]`` for row i) keeps every request's routing exact.

**Hot adapters.** The universe a RoutedModel routes over is fixed at construction. When the
library's adapter names change, the engine rebuilds it (``unwrap`` the old wrapping, wrap the
model again; the KV caches stay valid because the base weights are the same) between two steps:
immediately when adapters were only added (running requests keep their routers, which are
re-bound to the new model over the adapters they already had), and, when adapters were
removed, as soon as no running request routes over a removed one — new requests wait in the
queue meanwhile. So a removed adapter serves the requests already using it and is chosen by
no request admitted after.

The requests themselves (and how a token is drawn) are :mod:`quiver.serve.requests`.

**Shutdown.** ``stop()`` (after the HTTP side stopped accepting) lets the loop finish every
queued and running request, then the thread exits.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quiver.library import QuiverError
from quiver.runtime import RoutedModel
from quiver.runtime.answer import cast_votes, task_token_mask, template_head_ids

from .errors import ApiError, bad_request
from .metrics import Metrics
from .requests import Request, Sampling, adapters_used, sample_token  # noqa: F401 -- Request, Sampling: public here too
from .text import TextState
from .routing import Catalog, RouterCache, RowWeights

log = logging.getLogger("quiver.serve")


class Engine:
    def __init__(self, model, tokenizer, library, *, default_router: Callable[[], object],
                 max_batch_tokens: int, max_batch_size: int, max_queue: int, refresh_s: float = 1.0,
                 capacity: int | None = None, backend: str = "auto", metrics: Metrics | None = None,
                 context: int | None = None):
        self.model, self.tok, self.library = model, tokenizer, library
        self.max_batch_tokens, self.max_batch_size, self.max_queue = max_batch_tokens, max_batch_size, max_queue
        self.refresh_s, self.capacity, self.backend = refresh_s, capacity, backend
        self.metrics = metrics or Metrics()
        self.context = context or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.x); accept either
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._default_factory = default_router
        # the model routes over exactly ``universe``: an adapter another machine adds while this
        # engine starts shows up in the first catalog refresh below and triggers a rebuild
        self.universe = sorted(library.names())
        if not self.universe:
            raise ValueError(f"library {library.path} has no adapters; add some before serving it")
        self.rm = RoutedModel(model, library, adapters=self.universe, router=default_router(), capacity=capacity,
                              backend=backend)
        self.row_weights = self.rm.bind(RowWeights())
        self._warm_up()
        self.routers = RouterCache(library, lambda: self.rm.router)
        self._gen, self._arts = None, None
        self.catalog = Catalog(frozenset(), frozenset())
        self._pending_rebuild = False  # before the refresh, which may set it
        self._refresh(force=True)
        self._last_refresh = time.monotonic()
        self._head: list[int] | None = None  # the chat template's leading tokens (ArrowVote)
        self.rebuilds = 0
        # queue and batch
        self._cv = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [B, H, L, D]
        self._mask: torch.Tensor | None = None  # int64 [B, L]
        self._stopping = False
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="quiver-engine", daemon=True)

    # -- the HTTP side's interface (any thread) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request; 503 while shutting down, 429 when the queue is full."""
        with self._cv:
            if self.draining or self._stopping:
                self.metrics.rejected.labels("shutting_down").inc()
                raise ApiError(503, "The server is shutting down; retry on another instance", "server_shutting_down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, f"The server's queue is full ({self.max_queue} requests waiting); "
                               f"retry later", "queue_full", headers={"Retry-After": str(self._retry_after())})
            self.waiting.append(req)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cv.notify()

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one request's typical latency, >= 1."""
        h = self.metrics.latency
        total = sum(s.value for s in h.collect()[0].samples if s.name.endswith("_sum"))
        count = sum(s.value for s in h.collect()[0].samples if s.name.endswith("_count"))
        return max(1, int(total / count + 0.999)) if count else 1

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and running request, then end the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check_prompt(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens; the request "
                              f"needs {n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to "
                              f"generate). Shorten the prompt or lower max_tokens.",
                              "context_length_exceeded", param="prompt")
        if n_prompt + 1 > self.max_batch_tokens:
            raise bad_request(f"The prompt has {n_prompt} tokens; this server prefills at most "
                              f"{self.max_batch_tokens - 1} (serve.max_batch_tokens).",
                              "context_length_exceeded", param="prompt")

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        # no_grad, not inference_mode: the step plan fuses sibling modules (q/k/v, gate/up: one
        # routing and mixing call per group) only for inputs whose version counter proves them
        # unmodified between the siblings, and inference tensors have none (runtime/plan.py)
        with torch.no_grad():
            while True:
                with self._cv:
                    if self._stopping and not self.waiting and not self.running:
                        break
                    if not self.waiting and not self.running:
                        self._cv.wait(timeout=self.refresh_s)
                try:
                    self._iteration()
                except Exception as e:  # a bug in one step must not hang every client
                    log.exception("engine step failed")
                    self._fail_all(ApiError(500, f"internal error in the engine: {type(e).__name__}", "internal_error"))

    def _iteration(self) -> None:
        if time.monotonic() - self._last_refresh >= self.refresh_s:
            self._last_refresh = time.monotonic()
            self._refresh()
        self._maybe_rebuild()
        self._reap()
        joined = self._admit()
        if joined:
            self._join(joined)
        if self.running:
            self._decode()
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))

    def _fail_all(self, err: ApiError) -> None:
        with self._cv:
            reqs = list(self.waiting) + self.running
            self.waiting.clear()
        self.running, self._kv, self._mask = [], None, None
        for r in reqs:
            r.emit(("error", err))

    # -- catalog and hot adapters ----------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        gen = self.library.generation
        arts = tuple((a["name"], a["version"]) for a in self.library.artifacts("router"))
        if not force and gen == self._gen and arts == self._arts:
            return
        names = sorted(self.library.names())
        if self._arts is not None and arts != self._arts:
            self.routers.clear()  # a saved router may have a new version
        self._gen, self._arts = gen, arts
        self.catalog = Catalog(frozenset(names), frozenset(n for n, _ in arts))
        if names != self.universe:
            if names:
                self._pending_rebuild = True
            else:
                log.warning("the library has no adapters left; keeping the current model")

    def _maybe_rebuild(self) -> None:
        too_many = self.routers.built > 4 * self.routers.max_entries and not self.running
        if not (self._pending_rebuild or too_many):
            return
        live = self.catalog.adapters
        if any(set(adapters_used(r)) - live for r in self.running):
            return  # a running request routes over a removed adapter: wait for it to finish
        if live - set(self.library.names()):
            self._refresh(force=True)  # removed since the last refresh: rebuild over the new catalog next time
            return
        self.rm.unwrap()
        self.rm = RoutedModel(self.model, self.library, adapters=sorted(live), router=self._default_factory(),
                              capacity=self.capacity, backend=self.backend, check_fingerprint=False)
        self.row_weights = self.rm.bind(RowWeights())
        self._warm_up()
        self.routers.clear()
        self.universe = sorted(live)
        self._pending_rebuild = False
        self.rebuilds += 1
        log.info("routing over %d adapters", len(self.universe))

    def _warm_up(self) -> None:
        """One token through the default router (through its scorer, for a router that decides from
        a scoring pass): fills the adapter bank, so that a batch routed to no adapter at all (model
        ``base``) finds the bank's modules in place."""
        r = self.rm.router
        routers = [self.rm.bind(r.scorer)] if getattr(r, "prompt_pass", False) else None
        with torch.no_grad():
            self.rm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False,
                    routers=routers)

    # -- queue -> batch ----------------------------------------------------------------------------
    def _reap(self) -> None:
        with self._cv:
            if any(r.cancelled for r in self.waiting):
                self.metrics.cancelled.inc(sum(r.cancelled for r in self.waiting))
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        gone = [i for i, r in enumerate(self.running) if r.cancelled]
        if gone:
            self.metrics.cancelled.inc(len(gone))
            self._drop(gone)

    def _admit(self) -> list[Request]:
        if self._pending_rebuild:
            return []  # hold new requests until the model routes over the current library
        budget = self.max_batch_tokens - len(self.running)
        admitted = []
        while True:
            with self._cv:
                if not self.waiting or len(self.running) + len(admitted) >= self.max_batch_size:
                    break
                req = self.waiting[0]
                if len(req.prompt_ids) > budget:
                    break
                self.waiting.popleft()
            budget -= len(req.prompt_ids)
            try:
                if self._prefill(req):
                    admitted.append(req)
            except Exception as e:
                log.exception("prefill failed")
                req.emit(("error", ApiError(500, f"internal error in the engine: {type(e).__name__}",
                                            "internal_error")))
        return admitted

    def _prefill(self, req: Request) -> bool:
        """Route and prefill one request alone; emit its first token. False if it is done."""
        try:
            served = self.routers.resolve(req.spec, req.route_text, self.rm.bind, lambda r: self._vote(r, req))
            if isinstance(served, dict):
                gone = sorted(set(served) - set(self.universe))
                if gone:
                    raise bad_request(f"unknown adapter(s) {gone}", "unknown_adapter", param="routing")
                req.fixed = served
            else:
                req.router = served
        except ApiError as e:
            req.emit(("error", e))
            return False
        except (QuiverError, ValueError, LookupError) as e:  # e.g. an adapter removed meanwhile
            req.emit(("error", bad_request(f"routing: {e}", "unknown_adapter", param="routing")))
            return False
        from transformers import DynamicCache

        n = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        out = self._forward(ids, torch.ones(1, n, dtype=torch.long, device=self.device),
                            torch.arange(n, device=self.device)[None], DynamicCache(), [req], n)
        req.kv = _layers(out)
        req.n_ctx = n
        req.text = TextState(self.tok, req.sampling.stops)
        if req.sampling.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(req.sampling.seed)
        self.metrics.prompt_tokens.inc(n)
        return self._accept(req, out.logits[0, -1])

    def _vote(self, router, req: Request) -> dict[str, float]:
        """ArrowVote's scoring pass over ``req``'s prompt alone -> the mixture that serves it."""
        if self._head is None:
            self._head = template_head_ids(self.tok)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        att = torch.ones_like(ids)
        router.prepare()
        cast_votes(self.rm, router, ids, att, task_token_mask(self._head, ids, att))
        return router.mixture(0)

    def _forward(self, ids, mask, pos, cache, reqs: list[Request], n_tokens: int):
        self.metrics.step_tokens.observe(ids.numel())
        if any(r.fixed is not None for r in reqs):
            self.row_weights.set_rows([r.fixed for r in reqs])
        routers = [self.row_weights if r.fixed is not None else r.router for r in reqs]
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self._cache_kw: cache,
                  "use_cache": True, "routers": routers, "logits_to_keep": 1}
        if not any(r.trace for r in reqs):
            return self.rm(**kwargs)
        with self.rm.tracing() as tr:
            out = self.rm(**kwargs)
        for i, r in enumerate(reqs):
            if r.trace:
                for a, share in tr.adapter_share(i).items():
                    r.shares[a] = r.shares.get(a, 0.0) + share * n_tokens
        return out

    def _accept(self, req: Request, logits: torch.Tensor) -> bool:
        """Sample the next token of ``req``; emit text; False when the request finished."""
        token = sample_token(logits, req.sampling, req.generator)
        req.generated += 1
        req.last = token
        if req.t_first is None:
            req.t_first = time.perf_counter()
            self.metrics.ttft.observe(req.t_first - req.t_submit)
        eos = token in self.eos and not req.sampling.ignore_eos
        length = req.generated >= req.sampling.max_tokens
        delta = req.text.push(token, final=eos or length) if not eos else req.text.rest()
        if delta:
            req.emit(("text", delta))
        if eos or length or req.text.stopped:
            self._finish(req, "length" if length and not (eos or req.text.stopped) else "stop")
            return False
        return True

    def _finish(self, req: Request, reason: str) -> None:
        now = time.perf_counter()
        self.metrics.latency.observe(now - req.t_submit)
        self.metrics.completion_tokens.inc(req.generated)
        total = sum(req.shares.values())
        for a, w in req.shares.items():
            self.metrics.adapter_use.labels(a).inc(w)
        n_prompt = len(req.prompt_ids)
        req.emit(("done", {
            "text": req.text.text, "finish_reason": reason,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": req.generated,
                      "total_tokens": n_prompt + req.generated},
            "routing": {"adapters": {a: w / total for a, w in sorted(req.shares.items(), key=lambda kv: -kv[1])}}
            if total else {"adapters": {}},
        }))

    # -- the batch cache --------------------------------------------------------------------------
    def _join(self, reqs: list[Request]) -> None:
        """Append prefilled requests to the batch: left-pad every cache to one length."""
        for req in reqs:
            n = req.n_ctx
            if not self.running:
                self._kv, self._mask = req.kv, torch.ones(1, n, dtype=torch.long, device=self.device)
            else:
                L = self._mask.shape[1]
                M = max(L, n)
                self._kv = [(torch.cat([_lpad(k, M - L), _lpad(rk, M - n)]), torch.cat([_lpad(v, M - L), _lpad(rv, M - n)]))
                            for (k, v), (rk, rv) in zip(self._kv, req.kv)]
                row = torch.cat([torch.zeros(M - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(self.device)
                self._mask = torch.cat([F.pad(self._mask, (M - L, 0)), row[None]])
            req.kv = None
            self.running.append(req)

    def _drop(self, rows: list[int]) -> None:
        drop = set(rows)
        keep = [i for i in range(len(self.running)) if i not in drop]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._kv, self._mask = None, None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row
        self._mask = mask[:, first:]
        self._kv = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self._kv]

    def _decode(self) -> None:
        from transformers import DynamicCache

        B = len(self.running)
        self.metrics.batch_size.observe(B)
        ids = torch.tensor([[r.last] for r in self.running], device=self.device)  # [B, 1]
        mask = F.pad(self._mask, (0, 1), value=1)  # [B, L + 1]
        pos = torch.tensor([[r.n_ctx] for r in self.running], device=self.device)  # [B, 1]
        out = self._forward(ids, mask, pos, DynamicCache(ddp_cache_data=self._kv), self.running, 1)
        self._kv, self._mask = _layers(out), mask
        done = []
        for i, r in enumerate(self.running):
            r.n_ctx += 1
            if r.cancelled:
                self.metrics.cancelled.inc()
                done.append(i)
            elif not self._accept(r, out.logits[i, -1]):
                done.append(i)
        if done:
            self._drop(done)


def _layers(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def _lpad(t: torch.Tensor, n: int) -> torch.Tensor:  # t: [b, H, L, D] -> [b, H, n + L, D]
    return F.pad(t, (0, 0, n, 0)) if n else t
