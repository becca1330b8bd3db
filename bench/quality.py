"""Benchmark: does routing or merging a task library help on real tasks?

    python -m quiver.bench.quality [--quick | --full] [--n N] [--out DIR] [--library DIR]
    quiver bench quality --quick
    quiver bench quality --quick --ray [--ray-address HOST:PORT]   # the methods as Ray tasks

The library holds one LoRA per held-in task of :mod:`quiver.tasks`, trained on SmolLM2-135M
by this repository (``tasks/adapters/``, rebuilt by ``python -m quiver.training.tasklib``).
Every method answers the test prompts of every task (greedy, chat template) and is scored by
the task's exact-match metric:

* ``base``            the base model alone
* ``oracle``          each held-in prompt routed to its own task's adapter (held-out: none)
* ``arrow-kK[-mb]``   Arrow, top-K per token and module, merge-after (``-mb``: merge-before)
* ``arrow-vote-kK``   ArrowVote: the top-K adapters of per-token Arrow's mass over the prompt,
                      one mixture for the whole request (routing/vote.py)
* ``uniform``         the average of all adapters (``linear`` merge, one LoRA)
* ``ties`` / ``pcb``  TIES / PCB merges of all adapters (configs of ``conf/merge``)
* ``retrieval``       each prompt routed to its top-2 adapters by description similarity
* ``moe`` / ``mhr-z`` a MoE gate / MHR-z logits trained on ``--shots`` training examples per
                      task (held-in and held-out tasks; never test examples)

Held-in and held-out scores are the mean over those tasks. The table, the per-task scores, the
routing diagnostics of each router (:mod:`quiver.bench.routability`: the own adapter's share of
the routing weight on a held-in prompt's task tokens, and how often it is on top), the merges of
related tasks and, with ``--cluster-adapters``, Arrow over the MBC cluster library
(:mod:`quiver.bench.groups`) and the settings are written to ``OUT/quality.json`` and a bar plot
to ``OUT/quality.png``. ``--quick`` (the default) uses 6 test prompts per task and short router
training (≈ 7 minutes on 2 cores); ``--full`` 40 prompts per task, 8 shots and 80 router
steps (≈ 30 minutes).

``--ray``: each method (and each Arrow variant) is one Ray task, and PCB's coefficient
candidates are scored by Ray tasks (:mod:`quiver.bench.onray`); the results equal a local run
with one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from quiver.bench.groups import _fmt, evaluate_cluster_library, evaluate_merges, merges_table, read_groups
from quiver.bench.methods import (FULL, MERGES, QUICK, Settings, _answer_all, _prompts, _ray_run_method, _score,
                                  plan_runs, run_method)
from quiver.bench.onray import OnRay
from quiver.cluster.connect import absolute_location
from quiver.library import BaseModelSpec, Library, load_base_model
from quiver.library.base_model import default_cache_dir
from quiver.tasks import HELD_IN, HELD_OUT

GROUPS = Path(__file__).resolve().parents[1] / "docs" / "mbc-clusters.json"


def _log_run(log, out: dict) -> None:
    r = out["result"]
    log(f"  {out['name']:<16} held-in {_fmt(r['held_in'])}  held-out {_fmt(r['held_out'])}  ({r['seconds']} s)")


def evaluate(model, tok, lib: Library, held_in: Sequence[str], held_out: Sequence[str], settings: Settings,
             log: Callable[[str], None] = print, ray: OnRay | None = None) -> dict:
    """Score every method of ``settings.methods`` on the test prompts; returns the report.

    The merges are made first, into ``lib`` (removed at the end); then each run of
    :func:`plan_runs` is :func:`run_method`, here one after another, or with ``ray`` as Ray
    tasks in parallel (each loads ``ray.model`` and opens ``ray.location``)."""
    from quiver.merging import merge

    runs = plan_runs(settings)  # an unknown method fails before any work
    merged: dict[str, str] = {}  # method -> adapter name
    try:
        for method in settings.methods:
            if method in MERGES:
                t0 = time.perf_counter()
                name = f"merge-{method}"
                ad = merge([lib.get(n) for n in held_in], method=MERGES[method], name=name)
                lib.add(ad, name, description=f"{MERGES[method]} merge of the task adapters", tags=["merged"],
                        replace=True)
                merged[method] = name
                log(f"  merged {method} in {time.perf_counter() - t0:.1f} s")
        if ray is None:
            outs = []
            for spec in runs:
                outs.append(run_method(model, tok, lib, spec, held_in, held_out, settings, merged))
                _log_run(log, outs[-1])
        else:
            calls = [(spec, list(held_in), list(held_out), asdict(settings), merged) for spec in runs]
            outs = ray.run(_ray_run_method, calls, desc="methods on Ray", unit="method")
            for out in outs:
                _log_run(log, out)
    finally:
        for name in merged.values():
            if name in lib:
                lib.remove(name)
    results = {o["name"]: o["result"] for o in outs}
    diagnostics = {o["name"]: o["diagnostics"] for o in outs if o["diagnostics"] is not None}
    return {"held_in": list(held_in), "held_out": list(held_out), "n_test": settings.n_test,
            "shots": settings.shots, "router_steps": settings.router_steps, "results": results,
            "diagnostics": diagnostics, "targets": targets(results)}


def targets(results: dict) -> dict:
    """The issue's targets, checked on this run's numbers (None where a method did not run)."""
    r = {k: v for k, v in results.items()}
    out = {}
    for name, key in (("arrow-k2", "arrow"), ("arrow-vote-k2", "arrow_vote")):
        if "oracle" in r and name in r:
            ratio = r[name]["held_in"] / r["oracle"]["held_in"] if r["oracle"]["held_in"] else None
            out[f"{key}_k2_over_oracle_held_in"] = ratio
            out[f"{key}_within_85pct_of_oracle"] = ratio is not None and ratio >= 0.85
        if "uniform" in r and name in r and r["uniform"]["held_out"] is not None:
            out[f"{key}_above_uniform_held_out"] = r[name]["held_out"] > r["uniform"]["held_out"]
    if all(m in r for m in ("pcb", "ties", "uniform")):
        out["pcb_ge_ties_ge_linear"] = r["pcb"]["held_in"] >= r["ties"]["held_in"] >= r["uniform"]["held_in"]
    return out


def table(report: dict) -> str:
    lines = ["| method | held-in | held-out | time (s) |", "|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {_fmt(r['held_in'])} | {_fmt(r['held_out'])} | {r['seconds']} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    hi = [report["results"][n]["held_in"] or 0 for n in names]
    ho = [report["results"][n]["held_out"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.7), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], hi, width=0.4, label="held-in")
    ax.bar([x + 0.2 for x in xs], ho, width=0.4, label="held-out")
    ax.set_xticks(list(xs), names, rotation=40, ha="right")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"SmolLM2-135M + {len(report['held_in'])} task adapters, {report['n_test']} test prompts/task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_groups(model, tok, spec, lib, report: dict, settings: Settings, args, ray: OnRay | None = None) -> None:
    """The related-task merges and the MBC library (:mod:`quiver.bench.groups`) into ``report``."""
    from quiver.routing import Single
    from quiver.runtime import RoutedModel

    groups = read_groups(args.groups)

    def answer_all(rm, items, router_for):
        return _answer_all(rm, tok, items, settings, router_for)

    if not args.no_merges:
        rm = RoutedModel(model, lib, adapters=list(HELD_IN))
        try:
            related = [t for g in groups.values() if len(g) > 1 for t in g]
            items = _prompts(related, settings.n_test)
            own = _score(items, answer_all(rm, items, lambda it: Single(it["task"])))
        finally:
            rm.unwrap()
        print("merges of related tasks (normalised by each task's own adapter):")
        report["related_merges"] = evaluate_merges(model, tok, lib, groups, answer_all, _score, own, settings.n_test,
                                                   ray=ray)
    if args.cluster_adapters is not None:
        print(f"MBC library ({len(groups)} cluster adapters from {args.cluster_adapters}):")
        mbc = evaluate_cluster_library(model, tok, spec, args.work_dir / "mbc-library", args.cluster_adapters,
                                       groups, HELD_IN, HELD_OUT, answer_all, _score, settings.n_test)
        report["mbc"] = mbc
        for name, r in mbc["results"].items():
            report["results"][name] = {k: r[k] for k in ("per_task", "held_in", "held_out")} | {"seconds": None}
            if "diagnostics" in r:
                report["diagnostics"][name] = r["diagnostics"]


def diagnostics_table(report: dict) -> str:
    lines = ["| router | own-adapter share | own adapter on top | random share |", "|---|---|---|---|"]
    for name, d in report["diagnostics"].items():
        lines.append(f"| {name} | {_fmt(d.get('own_share'))} | {_fmt(d.get('top1_hit'))} | {_fmt(d.get('random'))} |")
    return "\n".join(lines)


def open_task_library(path: Path | str, spec: BaseModelSpec, adapters_dir: Path | None = None) -> Library:
    from quiver.training.tasklib import SHIPPED, register_task_adapters

    lib = Library.open(path, base_model=spec)
    register_task_adapters(lib, adapters_dir or SHIPPED)
    lib.embed(progress=False)
    return lib


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="6 test prompts per task (default)")
    mode.add_argument("--full", action="store_true", help="40 test prompts per task")
    ap.add_argument("--n", type=int, help="test prompts per task (overrides the mode)")
    ap.add_argument("--methods", nargs="*", help=f"subset of {', '.join(QUICK.methods)}")
    ap.add_argument("--library", help="task library: a directory (default: in the model cache) or a team "
                                      "library's postgresql:// URL")
    ap.add_argument("--model", default="smollm2-135m",
                    help="base model: a registered name or a Hugging Face directory (default: %(default)s)")
    ap.add_argument("--ray", action="store_true",
                    help="run the methods and PCB's coefficient candidates as Ray tasks (each worker loads the "
                         "model and opens the library: on several machines, give a team library)")
    ap.add_argument("--ray-address", help="the Ray cluster (default: $RAY_ADDRESS, else a local one)")
    ap.add_argument("--adapters", type=Path, help="task adapter directories (default: the shipped ones)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="where quality.json/.png go")
    ap.add_argument("--groups", type=Path, default=GROUPS,
                    help="clusters file of related tasks (default: docs/mbc-clusters.json)")
    ap.add_argument("--no-merges", action="store_true", help="skip the merges of related tasks")
    ap.add_argument("--cluster-adapters", type=Path,
                    help="also evaluate Arrow over these cluster adapters (OUT of tasklib --clusters)")
    args = ap.parse_args(argv)
    groups = read_groups(args.groups)  # a bad file fails here, not after an hour of evaluation
    if args.cluster_adapters is not None:
        missing = [g for g in groups if not (args.cluster_adapters / g).is_dir()]
        if missing:
            ap.error(f"--cluster-adapters {args.cluster_adapters} has no adapter for {', '.join(missing)} "
                     f"(train them: python -m quiver.training.tasklib --clusters {args.groups} --out DIR)")
    settings = FULL if args.full else QUICK
    if args.n:
        settings.n_test = args.n
    if args.methods:
        settings.methods = tuple(args.methods)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_base_model(args.model)
    spec = BaseModelSpec.from_model(model)
    location = args.library or str(default_cache_dir() / "task-library")
    args.work_dir = Path(location).parent if "://" not in location else default_cache_dir()
    lib = open_task_library(location, spec, args.adapters)
    ray = OnRay(absolute_location(args.model), absolute_location(location), args.ray_address) if args.ray or args.ray_address else None
    print(f"{len(HELD_IN)} held-in + {len(HELD_OUT)} held-out tasks, {settings.n_test} test prompts each; "
          + ("on Ray" if ray else f"{torch.get_num_threads()} threads"))
    report = evaluate(model, tok, lib, HELD_IN, HELD_OUT, settings, ray=ray)
    run_groups(model, tok, spec, lib, report, settings, args, ray)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "quality.png")
    print(table(report))
    print(diagnostics_table(report))
    if "related_merges" in report:
        print(merges_table(report["related_merges"]))
    print("targets:", json.dumps(report["targets"]))
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.png'} ({report['total_seconds']} s)")


if __name__ == "__main__":
    main()
