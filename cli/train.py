"""`quiver train`: a router or an adapter trained on JSON-lines examples (conf/train.yaml;
the jobs are :mod:`quiver.training.jobs`)."""

from __future__ import annotations

import typer

from .common import JsonOpt, LibraryOpt, command_config, emit, existing_library


def train_cmd(ctx: typer.Context, library: LibraryOpt = None, as_json: JsonOpt = False):
    """Train a router or an adapter on JSON-lines examples {"prompt", "answer", "task"}
    with the shared loop (seeded AdamW, warm-up, progress bar, checkpoints: train.*).

    quiver train router=moe data=train.jsonl name=my-moe adapters=\\[a,b,c] router.top_k=2
    quiver train router=mhr data=few.jsonl name=my-mhr   (MHR-z: the logits only)
    quiver train adapter=lora data=train.jsonl name=dates description="ISO dates"
    quiver train adapter=mos data=train.jsonl name=dates-mos
    quiver train adapter=mhr data=multi.jsonl name=skills adapter.skills=4
    quiver train adapter=mhr_mu data=few.jsonl name=new adapters=\\[skills-0,skills-1]

    Routers are saved in the library as router artefacts (quiver.routing.load_router);
    adapters are registered (MoS adapters as "mos" artefacts). A rerun with the
    same train.checkpoint_dir resumes from its last checkpoint.
    """
    from quiver.training.jobs import run_train_job

    from quiver.training.jobs import build_job

    cfg = command_config(ctx, "train")
    build_job(cfg)  # exactly one of router= / adapter= (conf/train.yaml defaults both to null)
    lib = existing_library(cfg, library)
    emit(run_train_job(cfg, lib), as_json)
