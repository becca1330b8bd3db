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
         prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeatable.")] = None,
         router: Annotated[str, typer.Option(
             help="arrow: Arrow per token (top-k adapters at every token and module); arrow-vote: one "
                  "mixture per prompt, the top-k adapters of Arrow's routing mass over it (docs/routability.md).")]
         = "arrow",
         top_k: Annotated[Optional[int], typer.Option(
             "--top-k", help="Adapters per token (arrow, default 2) or per prompt (arrow-vote, default 1).")] = None):
    """The main job on the real SmolLM2-135M: builds a demo library on first use and uses it."""
    from quiver.demo import run_demo

    run_demo(library, prompt, router=router, top_k=top_k)  # it checks router and top-k before loading
