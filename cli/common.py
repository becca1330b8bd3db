"""What every command shares: its composed config, opening the library, printing results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from quiver.config import compose_checked

console = Console()
err_console = Console(stderr=True)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}  # trailing key=value overrides

LibraryOpt = Annotated[Optional[str], typer.Option(
    "--library", "-L", help="Library directory, or a postgresql://user@host:port/db URL "
    "(with library.blobs=s3://bucket/prefix).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
KOpt = Annotated[Optional[int], typer.Option("-k", min=1, help="How many adapters to return (default: library.search.k, 3).")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (see --ray-address).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    help="The Ray cluster to join (HOST:PORT, auto, ray://HOST:PORT); default $RAY_ADDRESS, else a local one.")]


def command_config(ctx: typer.Context, command: str):
    """``conf/<command>.yaml`` composed with the command's trailing ``key=value`` overrides."""
    bad = [a for a in ctx.args if "=" not in a or a.startswith("-")]
    if bad:
        raise typer.BadParameter(f"unexpected argument(s) {bad}; config overrides look like key=value")
    return compose_checked(ctx.args, command)


def open_library(cfg, path: str | None, base_model=None):
    from hydra.utils import instantiate

    from quiver.library import Library

    return Library.open(path or str(cfg.library.path), base_model=base_model,
                        blobs=cfg.library.get("blobs"),
                        embed_config=instantiate(cfg.library.embed),
                        index_config=instantiate(cfg.library.index))


def existing_library(cfg, path: str | None):
    """Open a library that must already exist (reading commands never create one)."""
    from quiver.library.catalog import is_postgres_url, open_catalog

    p = path or str(cfg.library.path)
    if is_postgres_url(p):
        catalog = open_catalog(p)
        exists, shown = catalog.has_schema(), catalog.location
        catalog.close()
    else:
        exists, shown = (Path(p) / "catalog.sqlite").is_file(), p
    if not exists:
        raise FileNotFoundError(f"no library at {shown} (create one with `quiver library init --library {shown}`)")
    return open_library(cfg, p)


def emit(obj, as_json: bool) -> None:
    """Print a result: JSON for scripts, else a field/value table (dicts) or the text."""
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    elif isinstance(obj, dict):
        console.print(table(obj))
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


def table(obj: dict, title: str | None = None) -> Table:
    t = Table("field", "value", title=title, show_header=False)
    for key, value in obj.items():
        t.add_row(key, _cell(key, value))
    return t


def show_hits(hits: list[tuple[str, float]], title: str, as_json: bool) -> None:
    if as_json:
        return emit([{"name": n, "score": s} for n, s in hits], True)
    t = Table("adapter", "score", title=title)
    for name, score in hits:
        t.add_row(name, f"{score:.4f}")
    console.print(t)
