"""`quiver bench NAME` (bench/NAME.py with its own arguments) and `quiver demo`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import LibraryOpt


BENCHMARKS = ("library", "runtime", "kernels", "merging", "quality", "serve", "training", "ray")


def bench(ctx: typer.Context, name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")]):
    """Run a benchmark (bench/NAME.py); further arguments go to it (see `quiver bench NAME --help`)."""
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    importlib.import_module(f"quiver.bench.{name}").main(ctx.args)


def demo(library: LibraryOpt = None,
         prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeatable.")] = None):
    """The main job on the real SmolLM2-135M: builds a demo library on first use and uses it."""
    from quiver.demo import run_demo

    run_demo(library, prompt)
