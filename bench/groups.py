"""Groups of related tasks: merges evaluated where merging is used, and the MBC cluster library.

Merging twelve unrelated output formats into one adapter is a setting where every method
fails; merging is used on a few related tasks. The groups are the MBC clusters of the task
library (``quiver library cluster``, k-means over the adapters' svd similarity rows, the
Arrow paper's recipe), saved in a clusters file (``docs/mbc-clusters.json``).

* :func:`evaluate_merges`: for each group of ≥ 2 tasks and each method, merge the group's task
  adapters into one LoRA and score it on the group's test prompts. A merge's score on a task is
  **normalised** by the task's own adapter on the same prompts (1.0 = no loss from merging);
  a group's figure is the mean over its tasks, tasks whose own adapter scores 0 left out.
  ``pcb-search`` is PCB with its per-adapter coefficients ``λᵢ`` searched on validation
  prompts (never test prompts): the score maximised is minus the mean answer loss of the
  merged weights on ``n_valid`` validation examples per task (a forward pass, no generation),
  nevergrad over ``[0.8, 1.3]ⁿ`` with ``search_budget`` evaluations, ``search_batch`` candidates
  at a time (TwoPointsDE; see :func:`quiver.merging.search_coefficients`).
* :func:`evaluate_cluster_library`: Arrow over one adapter per cluster (trained on the union of
  the cluster's tasks, ``python -m quiver.training.tasklib --clusters FILE``) beside the
  per-task library; the oracle there routes each prompt to its cluster's adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from quiver.tasks import get_task

RELATED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "pcb", "pcb-search")


def read_groups(path: str | Path) -> dict[str, list[str]]:
    """``{"cluster-<id>": [tasks]}`` from a clusters file (see ``training.tasklib.read_clusters``)."""
    from quiver.training.tasklib import read_clusters

    return read_clusters(path)


def _valid_loss_fn(model, tok, examples: list[dict]) -> Callable[[], float]:
    from quiver.training.data import make_lm_loss, mean_loss

    loss_fn = make_lm_loss(model, tok, True, 256, next(model.parameters()).device)
    return lambda: mean_loss(loss_fn, examples)


class PcbScorer:
    """The score of a PCB candidate ``λ``: minus the mean answer loss of ``θ₀ + τ_m(λ)`` on
    ``n_valid`` validation examples of each task of ``group``. The model's weights are written
    for each candidate and restored after it (also on error)."""

    def __init__(self, model, tok, adapters, group: Sequence[str], n_valid: int):
        from quiver.merging import PcbParts, task_vectors

        valid = [e.to_dict() for t in group for e in get_task(t).examples("validation", n_valid)]
        self.loss = _valid_loss_fn(model, tok, valid)
        self.parts = PcbParts(task_vectors(adapters))
        self.weights = {path: model.get_submodule(path).weight for path in self.parts.parts}

    @torch.no_grad()
    def scores(self, candidates: list[list[float]]) -> list[float]:
        originals = {path: w.detach().clone() for path, w in self.weights.items()}
        out = []
        try:
            for lambdas in candidates:
                merged = self.parts.merged(lambdas)
                for path, w in self.weights.items():
                    w.copy_(originals[path] + merged[path].to(w.dtype))
                out.append(-self.loss())
        finally:
            for path, w in self.weights.items():
                w.copy_(originals[path])
        return out


_SCORERS: dict[tuple, PcbScorer] = {}  # per Ray worker process: (model, library, adapters, ...) -> scorer


def _ray_pcb_scores(model_name: str, location: str, names: list[str], group: list[str], n_valid: int,
                    candidates: list[list[float]]) -> list[float]:
    """:meth:`PcbScorer.scores` in a Ray worker (its parts computed once per worker)."""
    from quiver.bench.onray import worker_library, worker_model

    model, tok = worker_model(model_name)
    key = (model_name, location, tuple(names), tuple(group), n_valid)
    if key not in _SCORERS:
        lib = worker_library(location)
        try:
            _SCORERS[key] = PcbScorer(model, tok, [lib.get(n) for n in names], group, n_valid)
        finally:
            lib.close()
    return _SCORERS[key].scores(candidates)


def _search_pcb(model, tok, adapters, group: Sequence[str], n_valid: int, budget: int, batch: int = 4,
                ray=None) -> list[float]:
    """PCB's λ searched on validation loss: one λ per adapter. The optimiser proposes ``batch``
    candidates at a time; with ``ray`` (:class:`~quiver.bench.onray.OnRay`) each is scored by a
    Ray task (the same λ as here: the search depends only on the scores)."""
    from quiver.merging import search_coefficients

    if ray is None:
        score_batch = PcbScorer(model, tok, adapters, group, n_valid).scores
    else:
        names = [a.name for a in adapters]

        def score_batch(candidates):
            calls = [(names, list(group), n_valid, [c]) for c in candidates]
            return [s for scores in ray.run(_ray_pcb_scores, calls, "PCB candidates", progress=False) for s in scores]

    return search_coefficients(len(adapters), score_batch, budget=budget, batch=batch).lambdas


def evaluate_merges(model, tok, lib, groups: dict[str, list[str]], answer_all, score, own_scores: dict[str, float],
                    n_test: int, methods: Sequence[str] = RELATED_METHODS, n_valid: int = 8,
                    search_budget: int = 12, search_batch: int = 4, log: Callable[[str], None] = print,
                    ray=None) -> dict:
    """Normalised scores of each merge method on each group (see the module docstring).

    ``answer_all(rm, items, router_for)`` answers prompts; ``score(items, answers)`` gives
    ``{task: exact match}``; ``own_scores``: each task's own adapter's score on the same prompts.
    """
    from quiver.merging import merge
    from quiver.routing import Single
    from quiver.runtime import RoutedModel

    table: dict[str, dict[str, float | None]] = {m: {} for m in methods}
    raw: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for gname, group in groups.items():
        if len(group) < 2:
            continue
        adapters = [lib.get(t) for t in group]
        items = [e.to_dict() for t in group for e in get_task(t).examples("test", n_test)]
        names = []
        for method in methods:
            name = f"related-{gname}-{method}"
            if method == "pcb-search":
                lambdas = _search_pcb(model, tok, adapters, group, n_valid, search_budget, search_batch, ray)
                merged = merge(adapters, method="pcb", weights=lambdas, name=name)
                log(f"  {gname}: pcb λ = {[round(x, 3) for x in lambdas]}")
            else:
                merged = merge(adapters, method=method, name=name)
            lib.add(merged, name, description=f"{method} merge of {', '.join(group)}", tags=["merged"], replace=True)
            names.append(name)
        rm = RoutedModel(model, lib, adapters=names)
        try:
            for method, name in zip(methods, names):
                router = Single(name)
                per_task = score(items, answer_all(rm, items, lambda it, r=router: r))
                raw[method][gname] = per_task
                ratios = [per_task[t] / own_scores[t] for t in group if own_scores.get(t)]
                table[method][gname] = sum(ratios) / len(ratios) if ratios else None
                log(f"  {gname} {method:<16} normalised {_fmt(table[method][gname])}  "
                    + " ".join(f"{t}={per_task[t]:.2f}" for t in group))
        finally:
            rm.unwrap()
            for name in names:
                lib.remove(name)
    for method in methods:
        vals = [v for v in table[method].values() if v is not None]
        table[method]["mean"] = sum(vals) / len(vals) if vals else None
    return {"groups": {g: m for g, m in groups.items() if len(m) >= 2}, "normalised": table, "per_task": raw,
            "own": own_scores, "n_test": n_test, "search": {"n_valid": n_valid, "budget": search_budget,
                                                                   "batch": search_batch}}


def evaluate_cluster_library(model, tok, spec, lib_dir: Path, adapters_dir: Path, groups: dict[str, list[str]],
                             held_in: Sequence[str], held_out: Sequence[str], answer_all, score, n_test: int,
                             log: Callable[[str], None] = print) -> dict:
    """Arrow (top-1, top-2) and the cluster oracle over the cluster library (module docstring)."""
    from quiver.bench.routability import routing_diagnostics
    from quiver.routing import Arrow, Single
    from quiver.runtime import RoutedModel

    lib = open_adapter_library(lib_dir, spec, adapters_dir, groups)
    owner = {t: g for g, members in groups.items() for t in members}
    items = [e.to_dict() for t in list(held_in) + list(held_out) for e in get_task(t).examples("test", n_test)]
    names = list(groups)
    rm = RoutedModel(model, lib, adapters=names)
    out: dict[str, dict] = {}
    try:
        rows = [it for it in items if it["task"] in owner]
        oracle = {g: Single(g) for g in names}
        per_task = score(rows, answer_all(rm, rows, lambda it: oracle[owner[it["task"]]]))
        out["cluster-oracle"] = {"per_task": per_task, "held_in": _mean([per_task[t] for t in held_in if t in per_task]),
                                 "held_out": None}
        for k in (1, 2):
            router = Arrow(top_k=k, adapters=names)
            per_task = score(items, answer_all(rm, items, lambda it, r=router: r))
            diag = routing_diagnostics(rm, tok, [dict(it, task=owner[it["task"]]) for it in rows], router)
            out[f"mbc-arrow-k{k}"] = {"per_task": per_task, "held_in": _mean([per_task[t] for t in held_in]),
                                      "held_out": _mean([per_task[t] for t in held_out]),
                                      "diagnostics": {key: diag[key] for key in ("own_share", "top1_hit", "random")}}
        for name, r in out.items():
            log(f"  {name:<16} held-in {_fmt(r['held_in'])}  held-out {_fmt(r['held_out'])}")
    finally:
        rm.unwrap()
    return {"groups": groups, "results": out}


def open_adapter_library(path: Path, spec, adapters_dir: Path, groups: dict[str, list[str]]):
    """A library of the adapters ``adapters_dir/<group>/`` (PEFT dirs), described by their tasks."""
    from quiver.library import Library
    from quiver.training.tasklib import register_group_adapters

    lib = Library.open(path, base_model=spec, create=True)
    register_group_adapters(lib, adapters_dir, groups)
    lib.embed(progress=False)
    return lib


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def merges_table(report: dict) -> str:
    groups = list(report["groups"])
    head = "| method | " + " | ".join(f"{g} ({len(report['groups'][g])})" for g in groups) + " | mean |"
    lines = [head, "|---" * (len(groups) + 2) + "|"]
    for method, row in report["normalised"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(g)) for g in groups) + f" | {_fmt(row.get('mean'))} |")
    return "\n".join(lines)


def dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1))
