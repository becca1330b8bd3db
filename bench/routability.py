"""Routing diagnostics without generation: does a router send a task's prompts to its adapter?

    python -m quiver.bench.routability [--adapters DIR] [--tasks T ...] [--n N] [--top-k K] [--router arrow-vote]
                                       [--held-out]
    python -m quiver.bench.routability --study LABEL=DIR [LABEL=DIR ...] [--quality-n N] [--out DIR]

Each held-in test prompt is read once (one prefill, no generation) through the routed model
with the router's trace on. From every adapted module's per-token decisions it computes:

* ``own_share``    the fraction of the routing weight that went to the prompt's own adapter,
                   summed over the modules and over the prompt's **task tokens** (below);
* ``own_share_all`` the same over every token the model reads, chat template included;
* ``top1_hit``     how often the own adapter carried the most weight of all adapters;
* ``random``       ``1 / E``, the share a router that ignores its input gives on average;
* ``where``        per task (held-out tasks too, with ``--held-out``): the adapter carrying the
                   most routing mass over each prompt's task tokens (ArrowVote's top-1), counted
                   over the prompts, and the median ratio of the runner-up's mass to it.

**Task tokens** are the prompt's tokens from the user's text on: the chat template's leading
tokens (SmolLM2's default system prompt and ``<|im_start|>user``) are the same for every
prompt, so under a causal model their hidden states, and therefore every router's decisions
on them, cannot depend on the task. They are reported (``own_share_all``) but do not decide
whether a router found the right adapter. The answer's tokens are not included: they would need
generation, and the prompt's last tokens already attend to the whole prompt.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch


def template_prefix_len(tok, chat_template: bool = True) -> int:
    """Number of leading tokens the chat template puts before every user message."""
    from quiver.runtime.answer import template_head_ids

    return len(template_head_ids(tok, chat_template))


@torch.no_grad()
def routing_diagnostics(rm, tok, items: Sequence[dict], router, *, batch_size: int = 16,
                        chat_template: bool = True) -> dict:
    """Diagnostics of ``router`` over ``items`` (``{"prompt", "task"}``; tasks without an adapter
    in the router's view are skipped). Returns the means and the per-task figures."""
    from quiver.runtime.answer import encode_prompts, prepare_routers, task_token_mask, template_head_ids

    rm.bind(router)
    head = template_head_ids(tok, chat_template)
    device = next(rm.model.parameters()).device
    per_task: dict[str, dict[str, list[float]]] = {}
    where: dict[str, dict] = {}  # task -> the adapter on top of each prompt's mass, and the runner-up's ratio
    n_adapters = None
    for start in range(0, len(items), batch_size):
        chunk = list(items[start: start + batch_size])
        prompts = [it["prompt"] for it in chunk]
        enc = {k: v.to(device) for k, v in encode_prompts(tok, prompts, chat_template).items()}
        prepare_routers(rm, tok, prompts, [router] * len(chunk), None, enc)  # + votes (ArrowVote)
        mask = enc["attention_mask"].bool().cpu()
        T = mask.shape[1]
        task_tok = task_token_mask(head, enc["input_ids"], enc["attention_mask"])
        with rm.tracing() as tr:
            rm(**enc, routers=[router] * len(chunk))
        keys = None
        own = torch.zeros(len(chunk), 2)  # [task tokens, all tokens] own weight
        tot = torch.zeros(len(chunk), 2)
        by_adapter = None
        for rec in tr.records:
            if keys is None:
                keys = rec["keys"]
                n_adapters = sum(k is not None for k in keys)
                own_idx = torch.tensor([keys.index(it["task"]) if it["task"] in keys else -2 for it in chunk])
                by_adapter = torch.zeros(len(chunk), len(keys))
            if rec["keys"] != keys:
                raise ValueError("the router's adapters changed within one forward")
            idx, w = rec["indices"], rec["weights"]  # [B, T, k]
            if idx.shape[1] != T:
                continue  # not this forward's prompt positions
            valid = idx >= 0
            w = torch.where(valid, w, torch.zeros((), dtype=w.dtype))
            hit = (idx == own_idx[:, None, None]) & valid
            for j, m in enumerate((task_tok, mask)):
                own[:, j] += (w * hit * m[..., None]).sum((1, 2))
                tot[:, j] += (w * m[..., None]).sum((1, 2))
            by_adapter.scatter_add_(1, idx.clamp(min=0).flatten(1), (w * task_tok[..., None]).flatten(1))
        if keys is None:
            raise ValueError("the router made no decisions: is the model wrapped and the router bound?")
        mass, order = by_adapter.sort(dim=1, descending=True, stable=True)  # ties: the lower index, as argmax
        top = order[:, 0]
        for i, it in enumerate(chunk):  # where every prompt's mass goes, held-out tasks' too
            w = where.setdefault(it["task"], {"top": collections.Counter(), "second_to_top": []})
            w["top"][keys[int(top[i])]] += 1
            w["second_to_top"].append(float(mass[i, 1] / mass[i, 0].clamp(min=1e-12)) if mass.shape[1] > 1 else 0.0)
            if int(own_idx[i]) < 0:
                continue
            d = per_task.setdefault(it["task"], {"own_share": [], "own_share_all": [], "top1_hit": []})
            d["own_share"].append(float(own[i, 0] / tot[i, 0].clamp(min=1e-12)))
            d["own_share_all"].append(float(own[i, 1] / tot[i, 1].clamp(min=1e-12)))
            d["top1_hit"].append(float(top[i] == own_idx[i]))
    if not per_task:
        raise ValueError("no prompt's task has an adapter among the router's")
    report = {k: _mean([x for d in per_task.values() for x in d[k]]) for k in ("own_share", "own_share_all", "top1_hit")}
    report["random"] = 1.0 / n_adapters
    report["n_prompts"] = sum(len(d["top1_hit"]) for d in per_task.values())
    report["per_task"] = {t: {k: _mean(v) for k, v in d.items()} for t, d in per_task.items()}
    report["where"] = {t: {"top": dict(w["top"].most_common()),
                           "second_to_top": statistics.median(w["second_to_top"])} for t, w in where.items()}
    return report


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def study(budgets: dict[str, Path], n: int = 8, quality_n: int = 6, top_k: int = 2,
          log=print) -> list[dict]:
    """Routability against the training budget: for each ``label -> adapters dir`` (the task
    adapters after that many steps), the mean validation loss (from each ``training.json``),
    the routing diagnostics of Arrow top-``top_k`` on ``n`` held-in test prompts per task, and
    Arrow's and the oracle's exact match on ``quality_n`` prompts per task (held-in; held-out
    for Arrow)."""
    from quiver.bench.quality import Settings, evaluate, open_task_library
    from quiver.library import BaseModelSpec, load_base_model
    from quiver.library.base_model import default_cache_dir
    from quiver.routing import Arrow
    from quiver.runtime import RoutedModel
    from quiver.tasks import HELD_IN, HELD_OUT, get_task

    model, tok = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    items = [e.to_dict() for t in HELD_IN for e in get_task(t).examples("test", n)]
    rows = []
    for label, adapters in budgets.items():
        logs = [json.loads((Path(adapters) / t / "training.json").read_text()) for t in HELD_IN]
        lib = open_task_library(default_cache_dir() / f"routability-{label}", spec, Path(adapters))
        rm = RoutedModel(model, lib, router=Arrow(top_k=top_k, adapters=list(HELD_IN)), adapters=list(HELD_IN))
        try:
            diag = routing_diagnostics(rm, tok, items, rm.router)
        finally:
            rm.unwrap()
        settings = Settings(n_test=quality_n, methods=("oracle", "arrow"), arrow=((top_k, "merge-after"),))
        q = evaluate(model, tok, lib, HELD_IN, HELD_OUT, settings, log=lambda s: None)["results"]
        arrow = q[f"arrow-k{top_k}"]
        row = {"budget": label, "adapters": str(adapters), "steps": logs[0].get("step", logs[0]["recipe"]["train"]["steps"]),
               "valid_loss": _mean([lg["valid_loss"] for lg in logs]),
               "own_share": diag["own_share"], "own_share_all": diag["own_share_all"], "top1_hit": diag["top1_hit"],
               "random": diag["random"], "oracle_em": q["oracle"]["held_in"], "arrow_em": arrow["held_in"],
               "arrow_em_held_out": arrow["held_out"], "arrow_over_oracle": arrow["held_in"] / q["oracle"]["held_in"],
               "per_task": diag["per_task"]}
        rows.append(row)
        log(f"{label}: valid loss {row['valid_loss']:.3f}  own share {row['own_share']:.3f}  top-1 {row['top1_hit']:.0%}  "
            f"arrow/oracle {row['arrow_em']:.3f}/{row['oracle_em']:.3f}  held-out arrow {row['arrow_em_held_out']:.3f}")
    return rows


def study_table(rows: list[dict]) -> str:
    lines = ["| adapters | steps | valid loss | own share | own on top | Arrow EM | oracle EM | Arrow / oracle | Arrow held-out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['steps']} | {r['valid_loss']:.3f} | {r['own_share']:.3f} | {r['top1_hit']:.0%} | "
                     f"{r['arrow_em']:.3f} | {r['oracle_em']:.3f} | {r['arrow_over_oracle']:.2f} | {r['arrow_em_held_out']:.3f} |")
    return "\n".join(lines)


def _run_of(label: str) -> str:
    """The training run a study label belongs to: ``30-of-300`` and ``300`` are the snapshot and
    the end of one 300-step run; other labels are runs of their own."""
    m = re.fullmatch(r"\d+-of-(\d+)", label)
    return f"{m.group(1)}-step run" if m else (f"{label}-step run" if label.isdigit() else label)


def study_plot(rows: list[dict], path: Path) -> None:
    """Routing and quality against the optimiser steps each row's adapters had, one line per
    training run (its snapshots and its end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(_run_of(r["budget"]), []).append(r)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (run, rs) in enumerate(runs.items()):
        rs = sorted(rs, key=lambda r: r["steps"])
        xs, c = [r["steps"] for r in rs], f"C{i}"
        a1.plot(xs, [r["top1_hit"] for r in rs], "s-", c=c, label=f"own adapter on top ({run})")
        a1.plot(xs, [r["own_share"] for r in rs], "o:", c=c, label=f"own-adapter share ({run})")
        a2.plot(xs, [r["arrow_over_oracle"] for r in rs], "o-", c=c, label=f"Arrow / oracle EM ({run})")
        a2.plot(xs, [r["valid_loss"] for r in rs], "s:", c=c, label=f"mean validation loss ({run})")
    a1.axhline(rows[0]["random"], ls="--", c="gray", lw=0.8, label="random share (1/E)")
    steps = sorted({r["steps"] for r in rows})
    for ax, title in ((a1, "Arrow top-2 routing on held-in prompts"), (a2, "quality and loss")):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("optimiser steps")
        ax.set_title(title)
        ax.legend(fontsize=7)
    a1.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from quiver.bench.quality import open_task_library
    from quiver.library import BaseModelSpec, Library, load_base_model
    from quiver.library.base_model import default_cache_dir
    from quiver.routing import Arrow, ArrowVote
    from quiver.runtime import RoutedModel
    from quiver.tasks import HELD_IN, HELD_OUT, get_task
    from quiver.training.tasklib import SHIPPED, register_task_adapters

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, help="task adapter directories (default: the shipped ones)")
    ap.add_argument("--library", type=Path, help="library directory (default: a fresh one per adapters dir)")
    ap.add_argument("--tasks", nargs="+", help="route over these held-in tasks' adapters only, on their prompts "
                    "(a cheap screen of a setting trained for a few tasks; default: all held-in)")
    ap.add_argument("--n", type=int, default=8, help="test prompts per held-in task")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--router", choices=("arrow", "arrow-vote"), default="arrow",
                    help="per-token Arrow, or ArrowVote (one mixture per prompt from Arrow's mass over it)")
    ap.add_argument("--held-out", action="store_true",
                    help="also read the held-out tasks' test prompts (no adapter of their own) and print, per "
                         "task, which adapter carries most of each prompt's routing mass and how close the "
                         "runner-up comes (median of second / top)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--study", nargs="+", metavar="LABEL=DIR",
                    help="routability against the training budget over these adapter dirs (see study())")
    ap.add_argument("--quality-n", type=int, default=6, help="test prompts per task for the exact match (--study)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="where routability.json/.png go (--study)")
    args = ap.parse_args(argv)
    if args.study:
        budgets = {}
        for spec_ in args.study:
            label, sep, d = spec_.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not Path(d).is_dir():
                ap.error(f"--study wants LABEL=DIR (LABEL of letters, digits, '_.-'; DIR existing), got {spec_!r}")
            budgets[label] = Path(d)
        rows = study(budgets, n=args.n, quality_n=args.quality_n, top_k=args.top_k)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routability.json").write_text(json.dumps(rows, indent=1))
        study_plot(rows, args.out / "routability.png")
        print(study_table(rows))
        return
    tasks = list(args.tasks or HELD_IN)
    unknown = [t for t in tasks if t not in HELD_IN]
    if unknown:
        ap.error(f"--tasks: not held-in tasks (no adapter): {unknown}; held-in: {list(HELD_IN)}")
    model, tok = load_base_model("smollm2-135m")
    spec = BaseModelSpec.from_model(model)
    lib_dir = args.library or default_cache_dir() / ("routability-" + (args.adapters.resolve().as_posix().replace("/", "_") if args.adapters else "shipped"))
    if args.tasks:
        lib = Library.open(lib_dir, base_model=spec)
        register_task_adapters(lib, args.adapters or SHIPPED, tasks=tasks)
    else:
        lib = open_task_library(lib_dir, spec, args.adapters)
    shown = tasks + (list(HELD_OUT) if args.held_out else [])
    items = [e.to_dict() for t in shown for e in get_task(t).examples("test", args.n)]
    router = (Arrow if args.router == "arrow" else ArrowVote)(top_k=args.top_k, adapters=tasks)
    rm = RoutedModel(model, lib, router=router, adapters=tasks)
    rep = routing_diagnostics(rm, tok, items, rm.router)
    rm.unwrap()
    print(f"{type(router).__name__} top-{args.top_k} over {len(tasks)} adapters, {rep['n_prompts']} prompts: own share "
          f"{rep['own_share']:.3f} (all tokens {rep['own_share_all']:.3f}; random {rep['random']:.3f}), "
          f"own adapter on top {rep['top1_hit']:.1%}")
    for t, d in rep["per_task"].items():
        print(f"  {t:<16} share {d['own_share']:.3f}  top-1 {d['top1_hit']:.0%}")
    if args.held_out:
        print("\nwhere each prompt's routing mass goes (top adapter: prompts; median second / top):")
        for t in shown:
            w = rep["where"][t]
            tops = ", ".join(f"{a} {n}" for a, n in w["top"].items())
            print(f"  {t:<16} {'held-in ' if t in tasks else 'held-out'}  {tops:<36} {w['second_to_top']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
