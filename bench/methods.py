"""The quality benchmark's methods: its settings, the test prompts, and one runner per method
(a registry), each run self-contained by :func:`run_method` so that it gives the same answers in
this process or in a Ray worker (:func:`_ray_run_method`).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quiver.bench.groups import _mean
from quiver.library import Library
from quiver.tasks import get_task

MERGES = {"uniform": "linear", "ties": "ties", "pcb": "pcb"}  # defaults of conf/merge
ARROW = [(1, "merge-after"), (2, "merge-after"), (4, "merge-after"), (1, "merge-before"),
         (2, "merge-before"), (4, "merge-before")]


@dataclass
class Settings:
    n_test: int = 6
    shots: int = 4  # training examples per task for the MoE gate and MHR-z
    router_steps: int = 30
    moe_lr: float = 5e-2
    mhr_lr: float = 0.2  # MHR-z logits start at 0 (uniform) and must move by units to concentrate
    batch_size: int = 32
    max_new_tokens: int = 16
    arrow: tuple = tuple(ARROW)
    vote: tuple = (1, 2)  # ArrowVote's top-k
    methods: tuple = ("base", "oracle", "arrow", "arrow-vote", "uniform", "ties", "pcb", "retrieval", "moe", "mhr-z")


QUICK = Settings()
FULL = Settings(n_test=40, shots=8, router_steps=80)


def _prompts(tasks: Sequence[str], n: int) -> list[dict]:
    return [e.to_dict() for t in tasks for e in get_task(t).examples("test", n)]


def _answer_all(rm, tok, items: list[dict], settings: Settings, router_for: Callable[[dict], object],
                trace: bool = False, prepare_tasks: bool = False):
    """Answers for ``items`` in batches; ``router_for(item)`` gives each prompt's router."""
    from quiver.runtime import answer

    out = []
    for i in range(0, len(items), settings.batch_size):
        chunk = items[i: i + settings.batch_size]
        answers, _ = answer(rm, tok, [it["prompt"] for it in chunk], routers=[router_for(it) for it in chunk],
                            tasks=[it["task"] for it in chunk] if prepare_tasks else None,
                            max_new_tokens=settings.max_new_tokens, trace=trace)
        out.extend(answers)
    return out


def _base_answers(rm, tok, items, settings):
    from quiver.runtime.answer import Answer, encode_prompts

    out = []
    with rm.bare() as model, torch.no_grad():
        for i in range(0, len(items), settings.batch_size):
            chunk = items[i: i + settings.batch_size]
            enc = encode_prompts(tok, [it["prompt"] for it in chunk])
            gen = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            width = enc["input_ids"].shape[1]
            out.extend(Answer(it["prompt"], tok.decode(g[width:], skip_special_tokens=True).strip(), [])
                       for it, g in zip(chunk, gen))
    return out


def _score(items: list[dict], answers) -> dict[str, float]:
    per_task: dict[str, list[float]] = {}
    for it, a in zip(items, answers):
        per_task.setdefault(it["task"], []).append(get_task(it["task"]).score(a.text, it["answer"]))
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def _routing_stats(rm, tok, items, router, held_in: Sequence[str]) -> dict:
    """Routing diagnostics on the held-in prompts (see :mod:`quiver.bench.routability`)."""
    from quiver.bench.routability import routing_diagnostics

    rep = routing_diagnostics(rm, tok, [it for it in items if it["task"] in held_in], router)
    return {k: rep[k] for k in ("own_share", "own_share_all", "top1_hit", "random")}


def _few_shot(tasks: Sequence[str], shots: int) -> list[dict]:
    return [e.to_dict() for t in tasks for e in get_task(t).examples("train", shots)]


def arrow_name(k: int, mode: str) -> str:
    return f"arrow-k{k}" + ("-mb" if mode == "merge-before" else "")


def plan_runs(settings: Settings) -> list[dict]:
    """The evaluations of ``settings.methods`` in order: one per method, one per Arrow variant
    (plain data: a run may be shipped to a Ray worker)."""
    runs = []
    for method in settings.methods:
        if method not in RUNNERS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(RUNNERS)}")
        if method == "arrow":
            runs += [{"name": arrow_name(k, mode), "method": "arrow", "k": k, "mode": mode} for k, mode in settings.arrow]
        elif method == "arrow-vote":
            runs += [{"name": f"arrow-vote-k{k}", "method": method, "k": k} for k in settings.vote]
        else:
            runs.append({"name": method, "method": method})
    return runs


@dataclass
class _Run:
    """What one evaluation sees."""

    rm: object  # RoutedModel over the held-in adapters and the merges
    tok: object
    items: list[dict]  # the test prompts of every task
    held_in: list[str]
    held_out: list[str]
    settings: Settings
    merged: dict[str, str]  # merge method -> adapter name


def _train_cfg(run: _Run, lr: float):
    from quiver.training import TrainConfig

    return TrainConfig(steps=run.settings.router_steps, batch_size=8, lr=lr, warmup_steps=3, progress=False)


# Each runner answers prompts with one method: (the prompts it answered, the answers, the router
# whose routing diagnostics to report or None).
def _run_base(r: _Run, spec: dict):
    return r.items, _base_answers(r.rm, r.tok, r.items, r.settings), None


def _run_oracle(r: _Run, spec: dict):
    from quiver.routing import Single

    own = {t: Single(t) for t in r.held_in}
    rows = [it for it in r.items if it["task"] in own]
    return rows, _answer_all(r.rm, r.tok, rows, r.settings, lambda it: own[it["task"]]), None


def _run_arrow(r: _Run, spec: dict):
    from quiver.routing import Arrow

    router = Arrow(top_k=spec["k"], mode=spec["mode"], adapters=list(r.held_in))
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: router), router


def _run_vote(r: _Run, spec: dict):
    from quiver.routing import ArrowVote

    router = ArrowVote(top_k=spec["k"], adapters=list(r.held_in))
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: router), router


def _run_merge(r: _Run, spec: dict):
    from quiver.routing import Single

    router = Single(r.merged[spec["method"]])
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: router), None


def _run_retrieval(r: _Run, spec: dict):
    from quiver.routing import Retrieval

    router = Retrieval(top_k=2, adapters=list(r.held_in))
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: router), router


def _run_moe(r: _Run, spec: dict):
    from quiver.routing import MoEGate
    from quiver.training import train_router

    gate = MoEGate(top_k=2, adapters=list(r.held_in), init="arrow")
    train_router(r.rm, gate, r.tok, _few_shot(r.held_in + r.held_out, r.settings.shots),
                 config=_train_cfg(r, r.settings.moe_lr))
    gate.eval()
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: gate), gate


def _run_mhr(r: _Run, spec: dict):
    from quiver.routing import MHR
    from quiver.training import train_router

    tasks = r.held_in + r.held_out
    mhr = MHR(tasks=tasks, adapters=list(r.held_in))
    train_router(r.rm, mhr, r.tok, _few_shot(tasks, r.settings.shots), config=_train_cfg(r, r.settings.mhr_lr))
    mhr.eval()
    return r.items, _answer_all(r.rm, r.tok, r.items, r.settings, lambda it: mhr, prepare_tasks=True), None


RUNNERS: dict[str, Callable] = {"base": _run_base, "oracle": _run_oracle, "arrow": _run_arrow, "arrow-vote": _run_vote,
                                **{m: _run_merge for m in MERGES}, "retrieval": _run_retrieval,
                                "moe": _run_moe, "mhr-z": _run_mhr}


def run_method(model, tok, lib: Library, spec: dict, held_in: Sequence[str], held_out: Sequence[str],
               settings: Settings, merged: dict[str, str]) -> dict:
    """One evaluation of :func:`plan_runs`: ``{"name", "result", "diagnostics"}``.

    Self-contained, so that it gives the same answers wherever it runs: its own RoutedModel
    (over the held-in adapters and the merges ``merged``, already in ``lib``), and torch's
    random state seeded from the run's name (the MoE gate and MHR train with it)."""
    from quiver.runtime import RoutedModel

    t0 = time.perf_counter()
    torch.manual_seed(zlib.crc32(spec["name"].encode()))
    held_in, held_out = list(held_in), list(held_out)
    rm = RoutedModel(model, lib, adapters=held_in + list(merged.values()))
    try:
        run = _Run(rm, tok, _prompts(held_in + held_out, settings.n_test), held_in, held_out, settings, merged)
        rows, answers, router = RUNNERS[spec["method"]](run, spec)
        per_task = _score(rows, answers)
        diagnostics = _routing_stats(rm, tok, run.items, router, held_in) if router is not None else None
    finally:
        rm.unwrap()
    texts = "\x00".join(a.text for a in answers)
    result = {"per_task": per_task, "seconds": round(time.perf_counter() - t0, 1),
              "held_in": _mean([per_task[t] for t in held_in if t in per_task]),
              "held_out": _mean([per_task[t] for t in held_out if t in per_task]),
              "answers_sha256": hashlib.sha256(texts.encode()).hexdigest()}  # equal runs, equal digests
    return {"name": spec["name"], "result": result, "diagnostics": diagnostics}


def _ray_run_method(model_name: str, location: str, spec: dict, held_in, held_out, settings: dict, merged) -> dict:
    """:func:`run_method` in a Ray worker (see :mod:`quiver.bench.onray`)."""
    from quiver.bench.onray import worker_library, worker_model

    model, tok = worker_model(model_name)
    lib = worker_library(location)
    try:
        return run_method(model, tok, lib, spec, held_in, held_out, Settings(**settings), merged)
    finally:
        lib.close()
