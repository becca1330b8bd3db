"""`quiver library ...`: register, inspect, embed and search adapters (conf/library.yaml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (
    EXTRA,
    JsonOpt,
    KOpt,
    LibraryOpt,
    RayAddressOpt,
    RayOpt,
    command_config,
    console,
    emit,
    err_console,
    existing_library,
    open_library,
    show_hits,
    table,
)

app = typer.Typer(
    help="Register, inspect, embed and search LoRA adapters in a library directory. "
    "The library is --library DIR, else library.path (default ./quiver-library or $QUIVER_LIBRARY).",
    no_args_is_help=True,
)


def _split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Tags and ``key=value`` config overrides from one argument list (a tag has no ``=``)."""
    return [a for a in args if "=" not in a], [a for a in args if "=" in a]


@app.command("init", context_settings=EXTRA)
def library_init(ctx: typer.Context, library: LibraryOpt = None):
    """Create a library bound to the base model (model.name=..., default smollm2-135m)."""
    import torch

    from quiver.library import BaseModelSpec, load_base_model

    cfg = command_config(ctx, "library")
    model, _ = load_base_model(cfg.model.name, cache_dir=cfg.model.cache_dir,
                               dtype=getattr(torch, cfg.model.dtype), tokenizer=False)
    lib = open_library(cfg, library, base_model=BaseModelSpec.from_model(model))
    console.print(f"library {lib.path} for base model {lib.base.id} "
                  f"(fingerprint {lib.base.fingerprint[:12]}), {len(lib)} adapter(s)")


@app.command("add", context_settings=EXTRA)
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
    lib = existing_library(command_config(ctx, "library"), library)
    rec = lib.add_peft(peft_dir, name=name, description=description, examples=example, tags=tag, replace=replace)
    emit(rec.to_dict() if as_json else f"added {rec.name} (rank {rec.rank}, {rec.n_modules} modules, "
           f"blob {rec.blob[:12]}, version {rec.version})", as_json)


@app.command("list", context_settings=EXTRA)
def library_list(ctx: typer.Context, tag: Annotated[Optional[str], typer.Option(help="Only this tag.")] = None,
                 library: LibraryOpt = None, as_json: JsonOpt = False):
    """List adapters."""
    records = existing_library(command_config(ctx, "library"), library).list(tag=tag)
    if as_json:
        return emit([r.to_dict() for r in records], True)
    t = Table("name", "rank", "modules", "params", "tags", "description")
    for r in records:
        t.add_row(r.name, str(r.rank), str(r.n_modules), f"{r.n_params:,}", ",".join(r.tags),
                      r.description[:60])
    console.print(t)


@app.command("show", context_settings=EXTRA)
def library_show(ctx: typer.Context, name: str, library: LibraryOpt = None, as_json: JsonOpt = False):
    """Show one adapter's record (a table; --json for scripts)."""
    rec = existing_library(command_config(ctx, "library"), library).info(name).to_dict()
    if as_json:
        return emit(rec, True)
    console.print(table(rec, title=name))


@app.command("remove", context_settings=EXTRA)
def library_remove(ctx: typer.Context, name: str, library: LibraryOpt = None):
    """Remove an adapter (its blob goes when nothing else references it)."""
    existing_library(command_config(ctx, "library"), library).remove(name)
    console.print(f"removed {name}")


@app.command("rename", context_settings=EXTRA)
def library_rename(ctx: typer.Context, old: str, new: str, library: LibraryOpt = None):
    """Rename an adapter."""
    existing_library(command_config(ctx, "library"), library).rename(old, new)
    console.print(f"renamed {old} -> {new}")


@app.command("tag", context_settings=EXTRA)
def library_tag(ctx: typer.Context, name: str,
                tags: Annotated[list[str], typer.Argument(help="Tags to add (or remove); key=value arguments are config overrides.")],
                remove: Annotated[bool, typer.Option(help="Remove these tags.")] = False,
                library: LibraryOpt = None):
    """Add (or --remove) tags; like every command, trailing key=value arguments are config
    overrides (a tag therefore holds no "=")."""
    tags, overrides = _split_overrides(tags + list(ctx.args))
    if not tags:
        raise ValueError("give at least one tag (key=value arguments are config overrides)")
    ctx.args = overrides
    lib = existing_library(command_config(ctx, "library"), library)
    console.print(f"{name}: tags {lib.tag(name, *tags, remove=remove)}")


@app.command("export", context_settings=EXTRA)
def library_export(ctx: typer.Context, name: str, out_dir: Path,
                   overwrite: Annotated[bool, typer.Option(
                       help="Replace OUT_DIR if it holds a previous PEFT export (never anything else).")] = False,
                   library: LibraryOpt = None):
    """Write an adapter as a PEFT directory (loadable by peft.PeftModel.from_pretrained).

    OUT_DIR is never the current directory, the library, a folder containing it, or a file.
    """
    out = existing_library(command_config(ctx, "library"), library).export_peft(name, out_dir, overwrite=overwrite, hint="--overwrite")
    console.print(f"exported {name} to {out}")


@app.command("verify", context_settings=EXTRA)
def library_verify(ctx: typer.Context, fix: Annotated[bool, typer.Option(
                       help="Delete unreferenced blobs and abandoned tmp/*.part files (never while the "
                            "catalog looks empty or damaged).")] = False,
                   library: LibraryOpt = None, as_json: JsonOpt = False):
    """Check the catalog and re-hash every blob; exit 1 if anything is damaged or --fix refused."""
    report = existing_library(command_config(ctx, "library"), library).verify(fix_orphans=fix)
    if as_json:
        emit(report.to_dict(), True)
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


@app.command("embed", context_settings=EXTRA)
def library_embed(ctx: typer.Context,
                  kind: Annotated[Optional[list[str]], typer.Option(help="arrow, svd or text; repeatable (default all).")] = None,
                  library: LibraryOpt = None, as_json: JsonOpt = False, ray: RayOpt = False,
                  ray_address: RayAddressOpt = None):
    """Compute missing embeddings (cached by content and config); prints how many were computed.

    With --ray the per-adapter work (arrow prototypes, text vectors) runs as Ray tasks."""
    cfg = command_config(ctx, "library")
    kinds = tuple(kind or ("arrow", "svd", "text"))
    if ray_address is not None and not ray:
        raise ValueError("--ray-address needs --ray")
    lib = existing_library(cfg, library)
    if ray:
        from quiver.cluster.jobs import embed as embed_on_ray

        counts = embed_on_ray(cfg, lib, kinds, location=library or str(cfg.library.path), address=ray_address)
    else:
        counts = lib.embed(kinds=kinds)
    if as_json:
        return emit(counts, True)
    t = Table("embedding", "computed")
    for k, n in counts.items():
        t.add_row(k, str(n))
    console.print(t)


@app.command("search", context_settings=EXTRA)
def library_search(ctx: typer.Context, query: str, k: KOpt = None,
                   library: LibraryOpt = None, as_json: JsonOpt = False):
    """Adapters whose description and examples match QUERY (text embeddings + faiss).

    Each call loads the text encoder (all-MiniLM-L6-v2, a few seconds); a server keeps it loaded.
    """
    cfg = command_config(ctx, "library")
    if not query.strip():
        raise ValueError("empty search query: give words to match against the adapters' descriptions")
    lib = existing_library(cfg, library)
    err_console.print("[dim]search: loading the text encoder (all-MiniLM-L6-v2, a few seconds per call) ...[/dim]",
                      highlight=False)
    hits = lib.search(query, k=k if k is not None else cfg.library.search.k)
    show_hits(hits, query, as_json)


@app.command("similar", context_settings=EXTRA)
def library_similar(ctx: typer.Context, name: str, k: KOpt = None,
                    library: LibraryOpt = None, as_json: JsonOpt = False):
    """Adapters closest to NAME in weight space (svd embeddings)."""
    cfg = command_config(ctx, "library")
    show_hits(existing_library(cfg, library).similar(name, k=k if k is not None else cfg.library.search.k), name, as_json)


@app.command("cluster", context_settings=EXTRA)
def library_cluster(ctx: typer.Context, k: Annotated[Optional[int], typer.Option(
                        "-k", min=1, help="Number of clusters (default: library.cluster.k, 4).")] = None,
                    out: Annotated[Optional[Path], typer.Option(help="Write the clusters JSON here.")] = None,
                    library: LibraryOpt = None):
    """Group adapters by k-means over their svd similarity rows (MBC); prints JSON."""
    cfg = command_config(ctx, "library")
    c = cfg.library.cluster
    result = existing_library(cfg, library).cluster(k=k if k is not None else c.k, seed=c.seed, niter=c.niter)
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)
