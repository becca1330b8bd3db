"""Benchmark: does routing or merging a task library help on real tasks?

    python -m quiver.bench.quality [--quick | --full] [--n N] [--out DIR] [--library DIR]
    quiver bench quality --quick

The library holds one LoRA per held-in task of :mod:`quiver.tasks`, trained on SmolLM2-135M
by this repository (``tasks/adapters/``, rebuilt by ``python -m quiver.training.tasklib``).
Every method answers the test prompts of every task (greedy, chat template) and is scored by
the task's exact-match metric:

* ``base``            the base model alone
* ``oracle``          each held-in prompt routed to its own task's adapter (held-out: none)
* ``arrow-kK[-mb]``   Arrow, top-K per token and module, merge-after (``-mb``: merge-before)
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
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quiver.bench.groups import _fmt, _mean, evaluate_cluster_library, evaluate_merges, merges_table, read_groups
from quiver.library import BaseModelSpec, Library, load_base_model
from quiver.library.base_model import default_cache_dir
from quiver.tasks import HELD_IN, HELD_OUT, get_task

GROUPS = Path(__file__).resolve().parents[1] / "docs" / "mbc-clusters.json"
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
    methods: tuple = ("base", "oracle", "arrow", "uniform", "ties", "pcb", "retrieval", "moe", "mhr-z")


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


def evaluate(model, tok, lib: Library, held_in: Sequence[str], held_out: Sequence[str], settings: Settings,
             log: Callable[[str], None] = print) -> dict:
    """Score every method of ``settings.methods`` on the test prompts; returns the report."""
    from quiver.merging import merge
    from quiver.routing import MHR, Arrow, MoEGate, Retrieval, Single
    from quiver.runtime import RoutedModel
    from quiver.training import TrainConfig, train_router

    tasks = list(held_in) + list(held_out)
    items = _prompts(tasks, settings.n_test)
    results: dict[str, dict] = {}
    diagnostics: dict[str, dict] = {}
    merged: dict[str, str] = {}  # method -> adapter name; merged once, up front
    for method in settings.methods:
        if method in MERGES:
            t0 = time.perf_counter()
            name = f"merge-{method}"
            ad = merge([lib.get(n) for n in held_in], method=MERGES[method], name=name)
            lib.add(ad, name, description=f"{MERGES[method]} merge of the task adapters", tags=["merged"], replace=True)
            merged[method] = name
            log(f"  merged {method} in {time.perf_counter() - t0:.1f} s")
    rm = RoutedModel(model, lib, router=Arrow(adapters=list(held_in)), adapters=list(held_in) + list(merged.values()))

    def record(name: str, answers, t0: float) -> None:
        per_task = _score(items, answers)
        results[name] = {"per_task": per_task, "seconds": round(time.perf_counter() - t0, 1),
                         "held_in": _mean([per_task[t] for t in held_in]),
                         "held_out": _mean([per_task[t] for t in held_out if t in per_task])}
        r = results[name]
        log(f"  {name:<16} held-in {r['held_in']:.3f}  held-out {_fmt(r['held_out'])}  ({r['seconds']} s)")

    def train_cfg(lr: float) -> TrainConfig:
        return TrainConfig(steps=settings.router_steps, batch_size=8, lr=lr, warmup_steps=3, progress=False)

    shots = _few_shot(tasks, settings.shots)
    for method in settings.methods:
        t0 = time.perf_counter()
        if method == "base":
            record("base", _base_answers(rm, tok, items, settings), t0)
        elif method == "oracle":
            own = {t: Single(t) for t in held_in}
            rows = [it for it in items if it["task"] in own]
            answers = _answer_all(rm, tok, rows, settings, lambda it: own[it["task"]])
            per_task = _score(rows, answers)
            results["oracle"] = {"per_task": per_task, "held_in": _mean(list(per_task.values())),
                                 "held_out": None, "seconds": round(time.perf_counter() - t0, 1)}
            log(f"  {'oracle':<16} held-in {results['oracle']['held_in']:.3f}  held-out -")
        elif method == "arrow":
            for k, mode in settings.arrow:
                t0 = time.perf_counter()
                name = f"arrow-k{k}" + ("-mb" if mode == "merge-before" else "")
                router = Arrow(top_k=k, mode=mode, adapters=list(held_in))
                answers = _answer_all(rm, tok, items, settings, lambda it, r=router: r)
                record(name, answers, t0)
                diagnostics[name] = _routing_stats(rm, tok, items, router, held_in)
        elif method in MERGES:
            router = Single(merged[method])
            record(method, _answer_all(rm, tok, items, settings, lambda it: router), t0)
        elif method == "retrieval":
            router = Retrieval(top_k=2, adapters=list(held_in))
            answers = _answer_all(rm, tok, items, settings, lambda it: router)
            record("retrieval", answers, t0)
            diagnostics["retrieval"] = _routing_stats(rm, tok, items, router, held_in)
        elif method == "moe":
            gate = MoEGate(top_k=2, adapters=list(held_in), init="arrow")
            train_router(rm, gate, tok, shots, config=train_cfg(settings.moe_lr))
            gate.eval()
            answers = _answer_all(rm, tok, items, settings, lambda it: gate)
            record("moe", answers, t0)
            diagnostics["moe"] = _routing_stats(rm, tok, items, gate, held_in)
        elif method == "mhr-z":
            mhr = MHR(tasks=tasks, adapters=list(held_in))
            train_router(rm, mhr, tok, shots, config=train_cfg(settings.mhr_lr))
            mhr.eval()
            record("mhr-z", _answer_all(rm, tok, items, settings, lambda it: mhr, prepare_tasks=True), t0)
        else:
            raise ValueError(f"unknown method {method!r}")
    rm.unwrap()
    for name in merged.values():
        lib.remove(name)
    return {"held_in": list(held_in), "held_out": list(held_out), "n_test": settings.n_test,
            "shots": settings.shots, "router_steps": settings.router_steps, "results": results,
            "diagnostics": diagnostics, "targets": targets(results)}


def targets(results: dict) -> dict:
    """The issue's targets, checked on this run's numbers (None where a method did not run)."""
    r = {k: v for k, v in results.items()}
    out = {}
    if "oracle" in r and "arrow-k2" in r:
        ratio = r["arrow-k2"]["held_in"] / r["oracle"]["held_in"] if r["oracle"]["held_in"] else None
        out["arrow_k2_over_oracle_held_in"] = ratio
        out["arrow_within_90pct_of_oracle"] = ratio is not None and ratio >= 0.9
    if "uniform" in r and "arrow-k2" in r and r["uniform"]["held_out"] is not None:
        out["arrow_above_uniform_held_out"] = r["arrow-k2"]["held_out"] > r["uniform"]["held_out"]
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


def run_groups(model, tok, spec, lib, report: dict, settings: Settings, args) -> None:
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
        report["related_merges"] = evaluate_merges(model, tok, lib, groups, answer_all, _score, own, settings.n_test)
    if args.cluster_adapters is not None:
        print(f"MBC library ({len(groups)} cluster adapters from {args.cluster_adapters}):")
        mbc = evaluate_cluster_library(model, tok, spec, args.library_dir.parent / "mbc-library", args.cluster_adapters,
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


def open_task_library(path: Path, spec: BaseModelSpec, adapters_dir: Path | None = None) -> Library:
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
    ap.add_argument("--library", type=Path, help="task library directory (default: in the model cache)")
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
    model, tok = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    args.library_dir = args.library or default_cache_dir() / "task-library"
    lib = open_task_library(args.library_dir, spec, args.adapters)
    print(f"{len(HELD_IN)} held-in + {len(HELD_OUT)} held-out tasks, {settings.n_test} test prompts each; "
          f"{torch.get_num_threads()} threads")
    report = evaluate(model, tok, lib, HELD_IN, HELD_OUT, settings)
    run_groups(model, tok, spec, lib, report, settings, args)
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
