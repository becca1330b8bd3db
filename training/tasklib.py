"""The task library: one LoRA per held-in task of :mod:`quiver.tasks`, trained with the shared
loop on the base model, written as PEFT directories, and registered into a library with the
task's description and example prompts.

The recipe (:data:`RECIPE`) is what the shipped adapters in ``tasks/adapters/`` were built with
(``python -m quiver.training.tasklib --out tasks/adapters``, about 1-2 minutes per adapter on 2
CPU cores): rank 4 on ``q_proj``/``v_proj`` of all 30 layers, alpha 8, 30 AdamW steps of 8
examples (lr 3e-3, 3 warm-up steps, linear decay), 240 training examples, factors stored in
bfloat16 (≈ 0.46 MB per adapter), and ``init="b-random"``: A starts at 0 and B random (the
reverse of PEFT's default), so that A — and with it Arrow's prototypes, which live in A's row
space — is learnt from the task's inputs instead of staying near a random start. Measured on
the 12 tasks (``docs/routability.md``): the own adapter on top for 100% of held-in prompts
instead of 77%, Arrow top-2 at 0.67 of the oracle's exact match instead of 0.61, the oracle
itself one prompt in 72 lower. The budget is part of the recipe: 100 steps instead of 30 lowered
the validation loss and raised the oracle, but two tasks' prompts stopped routing to their own
adapters (``docs/routability.md``, "The budget under the shipped recipe"). Each task trains
with its own seed (``crc32(task name)``), which sets the random factor and the data order: with
one seed for all, every adapter would start alike and after a short training share one row
space, so Arrow's prototypes could not tell the adapters apart. Each directory also holds
``training.json``: the recipe, the loss curve, the validation loss and the wall time.

Options beyond the recipe (``--init``, ``--lr-a-ratio``; their routing is measured in
``docs/routability.md``): ``init="a-random"`` is PEFT's initialisation (A random, B = 0), the
default of :func:`~quiver.training.train_lora`; ``lr_a_ratio`` lets A learn at that multiple
of the learning rate (it lowered the loss and routed worse).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from quiver.library import BaseModelRef, Library, LoraAdapter, LoraModule, read_peft_dir, write_peft_dir
from quiver.tasks import HELD_IN, get_task

from .adapter import train_lora
from .lora import FACTOR_INITS
from .loop import TrainConfig

SHIPPED = Path(__file__).resolve().parents[1] / "tasks" / "adapters"
RECIPE = dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), n_train=240, n_valid=32, init="b-random", lr_a_ratio=1.0,
              train=TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=3))


def _bf16(adapter: LoraAdapter) -> LoraAdapter:
    modules = {p: LoraModule(A=m.A.to(torch.bfloat16), B=m.B.to(torch.bfloat16), alpha=m.alpha)
               for p, m in adapter.modules.items()}
    return LoraAdapter(name=adapter.name, base_model=adapter.base_model, modules=modules,
                       rank=adapter.rank, alpha=adapter.alpha)


def task_seed(name: str) -> int:
    """The training seed of a task's adapter: stable across processes and task orders."""
    return zlib.crc32(name.encode())


def build_task_adapters(model, tok, out_dir: str | Path, tasks: Sequence[str] = HELD_IN,
                        recipe: dict | None = None, progress: bool = True,
                        snapshots: Sequence[int] = ()) -> list[Path]:
    """Train the missing task adapters into ``out_dir/<task>/`` (existing ones are kept).

    ``snapshots``: also write each adapter as it is after these steps of the same run into
    ``out_dir/step-<N>/<task>/`` (with its own ``training.json``): the budgets of a
    routability-vs-training curve without one run per budget."""
    return build_group_adapters(model, tok, out_dir, {t: [t] for t in tasks}, recipe, progress, snapshots)


def build_group_adapters(model, tok, out_dir: str | Path, groups: dict[str, Sequence[str]],
                         recipe: dict | None = None, progress: bool = True,
                         snapshots: Sequence[int] = ()) -> list[Path]:
    """One adapter per group, trained on the union of its tasks' training examples (the MBC
    library of the Arrow paper: cluster the task adapters, then train one per cluster), into
    ``out_dir/<group>/``. A group of one task is that task's adapter. Each task contributes
    ``n_train`` training and ``n_valid`` validation examples; the seed is ``crc32(group)``. The
    recipe's ``steps`` are per task: a group of n tasks trains n × steps, so every task's
    examples get the budget they get in their own adapter."""
    r = {**RECIPE, **(recipe or {})}
    out, done = Path(out_dir), []
    for i, (name, members) in enumerate(groups.items()):
        cfg = dataclasses.replace(r["train"], seed=task_seed(name), progress=progress,
                                  steps=r["train"].steps * len(members))
        target = out / name
        if (target / "adapter_model.safetensors").is_file():
            done.append(target)
            continue
        train = [e.to_dict() for t in members for e in get_task(t).examples("train", r["n_train"])]
        valid = [e.to_dict() for t in members for e in get_task(t).examples("validation", r["n_valid"])]
        print(f"[{i + 1}/{len(groups)}] training {name} ({cfg.steps} steps, tasks: {', '.join(members)})", flush=True)
        t0 = time.perf_counter()
        recipe_log = {k: (asdict(v) if isinstance(v, TrainConfig) else v) for k, v in {**r, "train": cfg}.items()}

        def keep(step: int, adapter: LoraAdapter, valid_loss: float | None, name=name, t0=t0,
                 members=members, recipe_log=recipe_log) -> None:
            d = out / f"step-{step}" / name
            write_peft_dir(_bf16(adapter), d)
            (d / "training.json").write_text(json.dumps(
                {"task": name, "tasks": list(members), "step": step, "seconds": round(time.perf_counter() - t0, 1),
                 "valid_loss": valid_loss, "recipe": recipe_log}, indent=1))

        adapter, result = train_lora(model, tok, train, name, targets=r["targets"], rank=r["rank"],
                                     alpha=r["alpha"], config=cfg, valid=valid, snapshot_steps=snapshots,
                                     on_snapshot=keep, factor_init=r["init"],
                                     lr_a_ratio=r["lr_a_ratio"])
        seconds = time.perf_counter() - t0
        write_peft_dir(_bf16(adapter), target)
        log = {"task": name, "tasks": list(members), "step": cfg.steps, "seconds": round(seconds, 1),
               "valid_loss": result.evals[-1]["valid_loss"],
               "loss": [round(h["loss"], 4) for h in result.history], "recipe": recipe_log}
        (target / "training.json").write_text(json.dumps(log, indent=1))
        print(f"    {name}: loss {result.history[0]['loss']:.3f} -> {result.final_loss:.3f}, "
              f"valid {log['valid_loss']:.3f}, {seconds:.0f} s", flush=True)
        done.append(target)
    return done


def register_task_adapters(lib: Library, adapters_dir: str | Path = SHIPPED,
                           tasks: Sequence[str] = HELD_IN, n_examples: int = 3) -> list[str]:
    """Add the task adapters found in ``adapters_dir`` to ``lib`` with the task's description
    and a few training prompts as examples; an adapter the library holds in another version
    (e.g. after a rebuild) is replaced. Returns the names added or replaced."""
    entries = {}
    for name in tasks:
        task = get_task(name)
        entries[name] = dict(description=task.description, tags=["task"],
                             examples=[e.prompt for e in task.examples("train", n_examples)])
    return _register_dirs(lib, adapters_dir, entries, "for task ", f"python -m quiver.training.tasklib --out {adapters_dir}")


def register_group_adapters(lib: Library, adapters_dir: str | Path, groups: dict[str, Sequence[str]]) -> list[str]:
    """Add the group (cluster) adapters ``adapters_dir/<group>/`` that :func:`build_group_adapters`
    wrote, each described by its tasks' descriptions; returns the names added or replaced."""
    entries = {name: dict(description="; ".join(get_task(t).description for t in members), tags=["cluster"])
               for name, members in groups.items()}
    return _register_dirs(lib, adapters_dir, entries, "",
                          f"python -m quiver.training.tasklib --clusters FILE --out {adapters_dir}")


def _register_dirs(lib: Library, adapters_dir: str | Path, entries: dict[str, dict], what: str,
                   build_hint: str) -> list[str]:
    """``lib.add(adapter_dir/<name>, **entries[name])`` for each name whose content is new."""
    spec = lib.base
    changed = []
    for name, fields in entries.items():
        d = Path(adapters_dir) / name
        if not d.is_dir():
            raise FileNotFoundError(f"no adapter {what}{name!r} in {adapters_dir} (build them with {build_hint})")
        adapter = read_peft_dir(d, name, BaseModelRef(spec.id, spec.fingerprint))
        if name in lib and lib.info(name).blob == adapter.content_hash():
            continue
        lib.add(adapter, name, replace=True, **fields)
        changed.append(name)
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    from quiver.library import load_base_model

    ap = argparse.ArgumentParser(description="Train one LoRA per held-in task (see the module doc).")
    ap.add_argument("--out", type=Path, default=SHIPPED, help="Directory of PEFT adapter dirs.")
    ap.add_argument("--tasks", nargs="*", default=list(HELD_IN), help="Tasks to train (default: all held-in).")
    ap.add_argument("--clusters", type=Path, help="Train one adapter per cluster instead, on the union of its "
                    "tasks: a JSON file as `quiver library cluster --out` writes it ({\"clusters\": {id: [tasks]}}).")
    ap.add_argument("--steps", type=int, default=RECIPE["train"].steps,
                    help="Optimiser steps per task (default: %(default)s); a cluster of n tasks trains n × steps.")
    ap.add_argument("--lr", type=float, default=RECIPE["train"].lr, help="Peak learning rate (default: %(default)s).")
    ap.add_argument("--rank", type=int, default=RECIPE["rank"], help="LoRA rank (default: %(default)s).")
    ap.add_argument("--targets", nargs="+", default=list(RECIPE["targets"]),
                    help="Projections to adapt (default: %(default)s).")
    ap.add_argument("--init", choices=sorted(FACTOR_INITS), default=RECIPE["init"],
                    help="How the LoRA factors start (default: %(default)s): 'a-random' is PEFT's (A random, "
                    "B = 0); 'b-random' swaps them (A = 0, B random), so that A's rows, where Arrow's "
                    "prototypes live, are learnt from the task's inputs (see docs/routability.md).")
    ap.add_argument("--lr-a-ratio", type=float, default=RECIPE["lr_a_ratio"],
                    help="A learns at this multiple of --lr, B at --lr (default: %(default)s).")
    ap.add_argument("--snapshots", nargs="*", type=int, default=[],
                    help="Also keep each adapter after these steps of the run, in OUT/step-N/<task>.")
    args = ap.parse_args(argv)
    if any(s <= 0 or s >= args.steps for s in args.snapshots):
        ap.error(f"--snapshots must lie strictly between 0 and --steps ({args.steps})")
    model, tok = load_base_model("smollm2-135m")
    recipe = {"train": TrainConfig(**{**asdict(RECIPE["train"]), "steps": args.steps, "lr": args.lr}),
              "rank": args.rank, "alpha": 2.0 * args.rank, "targets": tuple(args.targets), "init": args.init,
              "lr_a_ratio": args.lr_a_ratio}
    if args.clusters is not None:
        groups = read_clusters(args.clusters)
        build_group_adapters(model, tok, args.out, groups, recipe, snapshots=args.snapshots)
    else:
        build_task_adapters(model, tok, args.out, args.tasks, recipe, snapshots=args.snapshots)


def read_clusters(path: str | Path) -> dict[str, list[str]]:
    """``{"cluster-<id>": [tasks]}`` from a ``quiver library cluster --out`` file (checked)."""
    try:
        data = json.loads(Path(path).read_text())
        clusters = data["clusters"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a clusters file ({{\"clusters\": {{id: [task, ...]}}}}): {e}") from None
    groups = {}
    for cid, members in clusters.items():
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ValueError(f"{path}: cluster {cid!r} must be a non-empty list of task names")
        for m in members:
            get_task(m)  # unknown task -> a clear error
        groups[f"cluster-{cid}"] = members
    return groups


if __name__ == "__main__":
    main()
