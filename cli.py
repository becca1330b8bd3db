"""The quiver command. Every subcommand composes conf/ with Hydra; trailing
key=value arguments override any config key (library.search.k=5)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import compose, compose_checked

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
library_app = typer.Typer(
    help="Register, inspect, embed and search LoRA adapters in a library directory. "
    "The library is --library DIR, else library.path (default ./quiver-library or $QUIVER_LIBRARY).",
    no_args_is_help=True,
)
app.add_typer(library_app, name="library")
console = Console()
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

LibraryOpt = Annotated[Optional[str], typer.Option(
    "--library", "-L", help="Library directory, or a postgresql://user@host:port/db URL "
    "(with library.blobs=s3://bucket/prefix).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
KOpt = Annotated[Optional[int], typer.Option("-k", min=1, help="How many adapters to return (default: library.search.k, 3).")]
err_console = Console(stderr=True)
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (see --ray-address).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    help="The Ray cluster to join (HOST:PORT, auto, ray://HOST:PORT); default $RAY_ADDRESS, else a local one.")]


def _cfg(ctx: typer.Context):
    bad = [a for a in ctx.args if "=" not in a or a.startswith("-")]
    if bad:
        raise typer.BadParameter(f"unexpected argument(s) {bad}; config overrides look like key=value")
    return compose_checked(ctx.args)


def _open(cfg, path: str | None, base_model=None):
    from hydra.utils import instantiate

    from .library import Library

    return Library.open(path or str(cfg.library.path), base_model=base_model,
                        blobs=cfg.library.get("blobs"),
                        embed_config=instantiate(cfg.library.embed),
                        index_config=instantiate(cfg.library.index))


def _existing(cfg, path: str | None):
    """Open a library that must already exist (reading commands never create one)."""
    from .library.catalog import is_postgres_url, open_catalog

    p = path or str(cfg.library.path)
    if is_postgres_url(p):
        catalog = open_catalog(p)
        exists, shown = catalog.has_schema(), catalog.location
        catalog.close()
    else:
        exists, shown = (Path(p) / "catalog.sqlite").is_file(), p
    if not exists:
        raise FileNotFoundError(f"no library at {shown} (create one with `quiver library init --library {shown}`)")
    return _open(cfg, p)


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    elif isinstance(obj, dict):
        console.print(_table(obj))
    else:
        console.print(obj)


def _cell(key: str, value) -> str:
    """A value as a person reads it: times as dates, lists comma-separated, floats rounded."""
    import datetime

    if key.endswith("_at") and isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if len(value) <= 12 else ", ".join(map(str, value[:12])) + f", … ({len(value)})"
    return str(value)


def _table(obj: dict, title: str | None = None) -> Table:
    table = Table("field", "value", title=title, show_header=False)
    for key, value in obj.items():
        table.add_row(key, _cell(key, value))
    return table


def _show_hits(hits: list[tuple[str, float]], title: str, as_json: bool) -> None:
    if as_json:
        return _print([{"name": n, "score": s} for n, s in hits], True)
    table = Table("adapter", "score", title=title)
    for name, score in hits:
        table.add_row(name, f"{score:.4f}")
    console.print(table)


@library_app.command("init", context_settings=EXTRA)
def library_init(ctx: typer.Context, library: LibraryOpt = None):
    """Create a library bound to the base model (model.name=..., default smollm2-135m)."""
    import torch

    from .library import BaseModelSpec, load_base_model

    cfg = _cfg(ctx)
    model, _ = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                               dtype=getattr(torch, cfg.model.dtype), tokenizer=False)
    lib = _open(cfg, library, base_model=BaseModelSpec.from_model(model))
    console.print(f"library {lib.path} for base model {lib.base.id} "
                  f"(fingerprint {lib.base.fingerprint[:12]}), {len(lib)} adapter(s)")


@library_app.command("add", context_settings=EXTRA)
def library_add(
    ctx: typer.Context,
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA directory.")],
    name: Annotated[str, typer.Option(help="Adapter name ([A-Za-z0-9._-]).")],
    description: Annotated[Optional[str], typer.Option(
        help="What the adapter does (used by search); with --replace, omitted keeps the old one.")] = None,
    example: Annotated[Optional[list[str]], typer.Option(help="An example prompt; repeatable.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="A tag; repeatable.")] = None,
    replace: Annotated[bool, typer.Option(
        help="Replace an adapter of the same name (its description, examples and tags are kept unless given).")] = False,
    library: LibraryOpt = None,
    as_json: JsonOpt = False,
):
    """Import a PEFT LoRA directory into the library (validated, atomic)."""
    lib = _existing(_cfg(ctx), library)
    rec = lib.add_peft(peft_dir, name=name, description=description, examples=example, tags=tag, replace=replace)
    _print(rec.to_dict() if as_json else f"added {rec.name} (rank {rec.rank}, {rec.n_modules} modules, "
           f"blob {rec.blob[:12]}, version {rec.version})", as_json)


@library_app.command("list", context_settings=EXTRA)
def library_list(ctx: typer.Context, tag: Annotated[Optional[str], typer.Option(help="Only this tag.")] = None,
                 library: LibraryOpt = None, as_json: JsonOpt = False):
    """List adapters."""
    records = _existing(_cfg(ctx), library).list(tag=tag)
    if as_json:
        return _print([r.to_dict() for r in records], True)
    table = Table("name", "rank", "modules", "params", "tags", "description")
    for r in records:
        table.add_row(r.name, str(r.rank), str(r.n_modules), f"{r.n_params:,}", ",".join(r.tags),
                      r.description[:60])
    console.print(table)


@library_app.command("show", context_settings=EXTRA)
def library_show(ctx: typer.Context, name: str, library: LibraryOpt = None, as_json: JsonOpt = False):
    """Show one adapter's record (a table; --json for scripts)."""
    rec = _existing(_cfg(ctx), library).info(name).to_dict()
    if as_json:
        return _print(rec, True)
    console.print(_table(rec, title=name))


@library_app.command("remove", context_settings=EXTRA)
def library_remove(ctx: typer.Context, name: str, library: LibraryOpt = None):
    """Remove an adapter (its blob goes when nothing else references it)."""
    _existing(_cfg(ctx), library).remove(name)
    console.print(f"removed {name}")


@library_app.command("rename", context_settings=EXTRA)
def library_rename(ctx: typer.Context, old: str, new: str, library: LibraryOpt = None):
    """Rename an adapter."""
    _existing(_cfg(ctx), library).rename(old, new)
    console.print(f"renamed {old} -> {new}")


@library_app.command("tag")
def library_tag(name: str, tags: list[str], remove: Annotated[bool, typer.Option(help="Remove these tags.")] = False,
                library: LibraryOpt = None):
    """Add (or --remove) tags."""
    lib = _existing(compose(), library)
    console.print(f"{name}: tags {lib.tag(name, *tags, remove=remove)}")


@library_app.command("export", context_settings=EXTRA)
def library_export(ctx: typer.Context, name: str, out_dir: Path,
                   overwrite: Annotated[bool, typer.Option(
                       help="Replace OUT_DIR if it holds a previous PEFT export (never anything else).")] = False,
                   library: LibraryOpt = None):
    """Write an adapter as a PEFT directory (loadable by peft.PeftModel.from_pretrained).

    OUT_DIR is never the current directory, the library, a folder containing it, or a file.
    """
    out = _existing(_cfg(ctx), library).export_peft(name, out_dir, overwrite=overwrite, hint="--overwrite")
    console.print(f"exported {name} to {out}")


@library_app.command("verify", context_settings=EXTRA)
def library_verify(ctx: typer.Context, fix: Annotated[bool, typer.Option(
                       help="Delete unreferenced blobs and abandoned tmp/*.part files (never while the "
                            "catalog looks empty or damaged).")] = False,
                   library: LibraryOpt = None, as_json: JsonOpt = False):
    """Check the catalog and re-hash every blob; exit 1 if anything is damaged or --fix refused."""
    report = _existing(_cfg(ctx), library).verify(fix_orphans=fix)
    if as_json:
        _print(report.to_dict(), True)
    else:
        removed = " removed" if fix and not report.refused else ""
        console.print(f"checked {report.checked} adapter(s): "
                      f"{'ok' if report.ok else f'{len(report.damaged)} damaged'}; "
                      f"{len(report.orphan_blobs)} unreferenced blob(s)"
                      + (f", {len(report.removed_orphans)} removed (younger ones are kept: an add may be "
                         "in flight)" if removed else ""))
        for name, problem in report.damaged:
            console.print(f"  [red]{name}[/red]: {problem}")
        if report.refused:
            err_console.print(f"[red]refused:[/red] {report.refused}", highlight=False)
    raise typer.Exit(0 if report.ok and not report.refused else 1)


@library_app.command("embed", context_settings=EXTRA)
def library_embed(ctx: typer.Context,
                  kind: Annotated[Optional[list[str]], typer.Option(help="arrow, svd or text; repeatable (default all).")] = None,
                  library: LibraryOpt = None, as_json: JsonOpt = False, ray: RayOpt = False,
                  ray_address: RayAddressOpt = None):
    """Compute missing embeddings (cached by content and config); prints how many were computed.

    With --ray the per-adapter work (arrow prototypes, text vectors) runs as Ray tasks."""
    cfg = _cfg(ctx)
    kinds = tuple(kind or ("arrow", "svd", "text"))
    lib = _existing(cfg, library)
    if ray:
        from .cluster.jobs import embed as embed_on_ray

        counts = embed_on_ray(cfg, lib, kinds, location=library or str(cfg.library.path), address=ray_address)
    elif ray_address is not None:
        raise ValueError("--ray-address needs --ray")
    else:
        counts = lib.embed(kinds=kinds)
    if as_json:
        return _print(counts, True)
    table = Table("embedding", "computed")
    for k, n in counts.items():
        table.add_row(k, str(n))
    console.print(table)


@library_app.command("search", context_settings=EXTRA)
def library_search(ctx: typer.Context, query: str, k: KOpt = None,
                   library: LibraryOpt = None, as_json: JsonOpt = False):
    """Adapters whose description and examples match QUERY (text embeddings + faiss).

    Each call loads the text encoder (all-MiniLM-L6-v2, a few seconds); a server keeps it loaded.
    """
    cfg = _cfg(ctx)
    if not query.strip():
        raise ValueError("empty search query: give words to match against the adapters' descriptions")
    lib = _existing(cfg, library)
    err_console.print("[dim]search: loading the text encoder (all-MiniLM-L6-v2, a few seconds per call) ...[/dim]",
                      highlight=False)
    hits = lib.search(query, k=k if k is not None else cfg.library.search.k)
    _show_hits(hits, query, as_json)


@library_app.command("similar", context_settings=EXTRA)
def library_similar(ctx: typer.Context, name: str, k: KOpt = None,
                    library: LibraryOpt = None, as_json: JsonOpt = False):
    """Adapters closest to NAME in weight space (svd embeddings)."""
    cfg = _cfg(ctx)
    _show_hits(_existing(cfg, library).similar(name, k=k if k is not None else cfg.library.search.k), name, as_json)


@library_app.command("cluster", context_settings=EXTRA)
def library_cluster(ctx: typer.Context, k: Annotated[Optional[int], typer.Option(
                        "-k", min=1, help="Number of clusters (default: library.cluster.k, 4).")] = None,
                    out: Annotated[Optional[Path], typer.Option(help="Write the clusters JSON here.")] = None,
                    library: LibraryOpt = None):
    """Group adapters by k-means over their svd similarity rows (MBC); prints JSON."""
    cfg = _cfg(ctx)
    c = cfg.library.cluster
    result = _existing(cfg, library).cluster(k=k if k is not None else c.k, seed=c.seed, niter=c.niter)
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


def _read_prompts(prompt: list[str] | None, file: Path | None) -> tuple[list[str], list[str | None]]:
    """Prompts from --prompt and --file, with each one's task name (a "task" field in the file)."""
    prompts = list(prompt or [])
    for i, text in enumerate(prompts, start=1):
        if not text.strip():
            raise ValueError(f"--prompt number {i} is empty")
    tasks: list[str | None] = [None] * len(prompts)
    if file is not None:
        from .tasks import iter_jsonl

        before = len(prompts)
        for n, item in iter_jsonl(file):
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"{file}, line {n}: expected a string or an object with a \"prompt\" string")
            task = item.get("task") if isinstance(item, dict) else None
            if task is not None and not isinstance(task, str):
                raise ValueError(f"{file}, line {n}: \"task\" must be a string")
            if not text.strip():
                raise ValueError(f"{file}, line {n}: the prompt is empty")
            prompts.append(text)
            tasks.append(task)
        if len(prompts) == before:
            raise ValueError(f"{file} holds no prompts (expected one JSON string or {{\"prompt\": ...}} per line)")
    if not prompts:
        raise ValueError("give at least one --prompt or a --file of prompts")
    return prompts, tasks


GENERATE_KEYS = """Settings (conf/generate/default.yaml), as generate.KEY=VALUE:
max_new_tokens (48), do_sample (false), temperature (1.0), top_p (1.0),
chat_template (true: wrap prompts in the model's chat template),
capacity (null: every adapter in memory; N: at most N, LRU), backend (auto, grouped, reference, gather, triton),
batch_size (16: prompts per batch for --file, with a progress bar)."""


def _shorten(text: str, limit: int = 200) -> str:
    """A prompt as echoed back: whole up to ``limit`` characters, else its start and length."""
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text):,} characters)"


def _trace_paths(trace: Path, n: int) -> list[Path]:
    if n == 1:
        return [trace]
    return [trace.with_name(f"{trace.stem}-{i}{trace.suffix or '.png'}") for i in range(n)]


def _min_capacity(cfg, n_adapters: int) -> int:
    """How many adapters one forward call may need at once under the configured router."""
    r = cfg.router
    if r.get("top_k") is not None:
        return min(int(r.top_k), n_adapters)
    target = str(r.get("_target_", ""))
    if target.endswith(("Uniform", "MHR", "Poly")):
        return len(r.adapters) if r.get("adapters") else n_adapters
    if target.endswith("Fixed"):
        return max(1, len(r.get("weights") or {}))
    return 1


@app.command("generate", context_settings=EXTRA)
def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeatable.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="JSONL: one string or {\"prompt\": ..., \"task\": ...} per line (task: for MHR/Poly).")] = None,
    trace: Annotated[Optional[Path], typer.Option(
        help="Write routing heatmap PNG(s) and JSON here (NAME-i.png per prompt when there are several).")] = None,
    task: Annotated[Optional[list[str]], typer.Option(
        help="Task name for routers that route by task (MHR/Poly): once for all prompts, or once per prompt.")] = None,
    library: LibraryOpt = None,
    as_json: JsonOpt = False,
):
    """Answer prompts with the base model + library, every token routed (router=arrow by default).

    Router overrides: router=arrow router.top_k=2 | router=single router.adapter=sql |
    router=uniform | router=fixed '+router.weights={a: 0.5, b: 0.5}' | router=retrieval |
    router=saved router.name=my-moe (a router trained with `quiver train`).
    """
    import torch
    from hydra.utils import instantiate

    from .library import load_base_model
    from .library.paths import check_output_file
    from .runtime import RoutedModel, answer

    cfg = _cfg(ctx)
    prompts, file_tasks = _read_prompts(prompt, file)
    lib = _existing(cfg, library)
    g = cfg.generate
    if task and len(task) not in (1, len(prompts)):
        raise ValueError(f"give one --task for all prompts or one per prompt ({len(prompts)}), not {len(task)}")
    pngs = _trace_paths(trace, len(prompts)) if trace is not None else []
    for png in pngs:  # before any work: answers are never lost to an unwritable trace path
        check_output_file(png, protect=[lib.path])
    if g.capacity is not None and g.capacity < _min_capacity(cfg, len(lib)):
        raise ValueError(f"generate.capacity={g.capacity} is below the {_min_capacity(cfg, len(lib))} adapters "
                         "one step of this router may need at once; raise it or use generate.capacity=null (all)")
    if task:
        tasks = task * len(prompts) if len(task) == 1 else list(task)
    else:
        tasks = file_tasks if any(t is not None for t in file_tasks) else None
    if cfg.router.get("kind") == "saved":
        if not cfg.router.name:
            raise ValueError("router=saved needs router.name=NAME (see `quiver library show` / Library.artifacts)")
        from quiver.routing import load_router

        router = load_router(lib, cfg.router.name)
    else:
        router = instantiate(cfg.router)
    model, tok = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                                 dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device)
    rm = RoutedModel(model, lib, router=router, capacity=g.capacity, backend=g.backend)
    sampling = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    from tqdm import tqdm

    answers = []
    size = g.batch_size
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=len(prompts) <= size,
              file=sys.stderr) as bar:
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            got, tr = answer(rm, tok, chunk, tasks=tasks[start:start + size] if tasks else None,
                             max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
                             chat_template=g.chat_template, **sampling)
            for i, a in enumerate(got):
                if pngs:
                    tr.heatmap(pngs[start + i], row=i, tokens=a.tokens)
                    tr.to_json(pngs[start + i].with_suffix(".json"), row=i)
            answers += got
            bar.update(len(chunk))
    if as_json:
        return _print([{"prompt": a.prompt, "answer": a.text, "adapters": a.adapter_share} for a in answers], True)
    for a in answers:
        tops = ", ".join(f"{n} {w:.0%}" for n, w in a.top_adapters())
        console.print(f"[bold]> {escape(_shorten(a.prompt))}[/bold]\n{escape(a.text)}\n[dim]adapters: {tops}[/dim]\n",
                      highlight=False)


generate.__doc__ += "\n" + textwrap.indent(GENERATE_KEYS, "    ")


def _merge_inputs(cfg) -> tuple[list[str], list[float] | None]:
    """The adapter names and weights of a merge, refused when the merge would be degenerate."""
    names = list(cfg.adapters or [])
    if len(names) < 2:
        raise ValueError("a merge needs at least two adapters: adapters=[a,b,...]"
                         + (f" (to copy {names[0]!r}, use `quiver library export`)" if names else ""))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"adapter(s) {dup} listed more than once; to weight one more, use weights=[...]")
    weights = [float(w) if isinstance(w, (int, float)) else w for w in cfg.weights] if cfg.weights is not None else None
    if weights is not None:
        if len(weights) != len(names):
            raise ValueError(f"weights has {len(weights)} value(s) for {len(names)} adapters")
        if not all(isinstance(w, float) for w in weights):
            raise ValueError(f"weights must be numbers, got {list(cfg.weights)}")
        if all(w == 0 for w in weights):
            raise ValueError("weights are all zero: the merge would change nothing")
    return names, weights


@app.command("merge", context_settings=EXTRA)
def merge_cmd(ctx: typer.Context, library: LibraryOpt = None, as_json: JsonOpt = False):
    """Merge library adapters into one LoRA (registered) or into the base weights (a checkpoint).

    quiver merge merge=ties merge.density=0.2 adapters=\\[a,b,c] output=lora output.name=abc
    quiver merge merge=linear adapters=\\[a,b] weights=\\[0.7,0.3] output=lora output.path=./peft-out
    quiver merge merge=pcb adapters=\\[a,b] output=checkpoint output.path=./merged-model

    Keys: adapters=[...] (two or more, each once); weights=[...] (one per adapter, default 1 each);
    merge=METHOD (conf/merge/*.yaml: linear, task_arithmetic, ties, dare_linear, dare_ties,
    breadcrumbs, pcb, magnitude_prune) and merge.KEY=VALUE; output=lora: output.name (registered
    name), output.rank, output.replace=true (replace an adapter of that name), output.path (also
    export a PEFT directory), output.overwrite=true (replace a previous export there);
    output=checkpoint: output.path (required), output.max_shard_size, output.overwrite=true
    (replace a previous checkpoint there). An output path is never the current directory, the
    library, a folder containing it or a file; everything is checked before the merge runs.
    """
    from omegaconf import OmegaConf

    from .library import base_model_dir, check_name
    from .library.paths import check_output_dir
    from .merging import merge, merge_to_checkpoint

    cfg = _cfg(ctx)
    names, weights = _merge_inputs(cfg)
    lib = _existing(cfg, library)
    out = cfg.output
    if out.kind not in ("lora", "checkpoint"):
        raise ValueError(f"unknown output {out.kind!r}; valid: lora, checkpoint")
    lib.require(names)
    if out.kind == "lora":  # every check before the merge work and before any write
        check_name(out.name)
        if out.name in lib and not out.replace:
            raise ValueError(f"an adapter named {out.name!r} already exists; "
                             "choose another output.name or pass output.replace=true")
        if out.path:
            check_output_dir(out.path, "peft", overwrite=out.overwrite, protect=[lib.path],
                             hint="output.overwrite=true")
    adapters = [lib.get(n) for n in names]
    params = OmegaConf.to_container(cfg.merge)
    method = params.pop("name")
    if out.kind == "checkpoint":
        path = merge_to_checkpoint(base_model_dir(cfg.model.name, cfg.model.cache_dir), adapters, out.path,
                                   method=method, weights=weights, max_shard_size=out.max_shard_size,
                                   overwrite=out.overwrite, progress=True, protect=[lib.path],
                                   overwrite_hint="output.overwrite=true", **params)
        result = {"method": method, "adapters": names, "checkpoint": str(path)}
    else:
        merged = merge(adapters, method=method, weights=weights, rank=out.rank, name=out.name,
                       progress=True, **params)
        peft_dir = None
        if out.path:  # written first: a failed export leaves the library unchanged
            from .library import write_peft_dir

            peft_dir = write_peft_dir(merged, out.path, overwrite=out.overwrite, protect=[lib.path],
                                      hint="output.overwrite=true")
        rec = lib.add(merged, out.name, description=f"{method} merge of {', '.join(names)}",
                      tags=["merged"], replace=out.replace)
        report = merged.metadata["merge"]
        result = {"method": method, "adapters": names, "registered": rec.name,
                  "rank": rec.rank, "min_retained_energy": report["min_retained_energy"],
                  "mean_sign_conflict": report["mean_sign_conflict"]}
        if peft_dir is not None:
            result["peft_dir"] = str(peft_dir)
    if as_json:
        return _print(result, True)
    console.print(_table(result, title=f"{method} merge"))


@app.command("train", context_settings=EXTRA)
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
    from .training.jobs import run_train_job

    cfg = _cfg(ctx)
    given = {a.split("=", 1)[0].lstrip("+~") for a in ctx.args}
    if ("router" in given) == ("adapter" in given):
        raise ValueError("say what to train: router=moe|mhr|poly or adapter=lora|mos|mhr|mhr_mu")
    lib = _existing(cfg, library)
    _print(run_train_job(cfg, lib, "adapter" if "adapter" in given else "router"), as_json)


@app.command("serve", context_settings=EXTRA)
def serve_cmd(
    ctx: typer.Context,
    library: LibraryOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_file: Annotated[Optional[Path], typer.Option(
        help="File of API keys, one per line (also $QUIVER_API_KEYS, comma-separated).")] = None,
    ray: RayOpt = False,
    replicas: Annotated[Optional[int], typer.Option(
        min=1, help="With --ray: this many replicas (default: autoscale within serve.ray's bounds).")] = None,
    ray_address: RayAddressOpt = None,
):
    """OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics)
    with continuous batching and per-request routing.

    quiver serve -L DIR router=arrow router.top_k=2 serve.max_queue=64 model.name=/path/to/hf-dir
    """
    cfg = _cfg(ctx)
    lib = _existing(cfg, library)
    if ray:  # replicas open the library themselves, from its location
        from .cluster.serve import run as run_on_ray

        lib.close()
        location = library or str(cfg.library.path)
        return run_on_ray(cfg, location, host=host, port=port, api_key_file=api_key_file,
                          replicas=replicas, address=ray_address)
    if replicas is not None or ray_address is not None:
        raise ValueError("--replicas and --ray-address need --ray")
    from .serve import run

    run(cfg, lib, host=host, port=port, api_key_file=api_key_file)


BENCHMARKS = ("library", "runtime", "kernels", "merging", "quality", "serve", "training", "ray")


@app.command("bench", context_settings=EXTRA)
def bench(ctx: typer.Context, name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")]):
    """Run a benchmark (bench/NAME.py); further arguments go to it (see `quiver bench NAME --help`)."""
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    importlib.import_module(f"quiver.bench.{name}").main(ctx.args)


@app.command("demo")
def demo(library: LibraryOpt = None,
         prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeatable.")] = None):
    """The main job on the real SmolLM2-135M: builds a demo library on first use and uses it."""
    from .demo import run_demo

    run_demo(library, prompt)


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, LookupError) and e.args else str(e)
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {_one_line(message) if isinstance(message, BaseException) else message}", file=sys.stderr)


def main() -> None:
    import sqlite3
    import warnings

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .library import QuiverError

    warnings.showwarning = _show_warning  # Quiver's warnings as one "warning: ..." line each
    try:
        app()
    except (QuiverError, ValueError, LookupError, OSError, ModuleNotFoundError, HydraException,
            OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except sqlite3.DatabaseError as e:
        print(f"error: the library catalog (catalog.sqlite) cannot be read ({e}); restore it from a backup",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
