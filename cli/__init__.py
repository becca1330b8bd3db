"""The quiver command. Every subcommand composes its own config (conf/<command>.yaml) with
Hydra; trailing key=value arguments override any of its keys (library.search.k=5).

One module per command group; the commands are registered here, explicitly."""

from __future__ import annotations

import sys

import typer

from . import bench as _bench
from . import generate as _generate
from . import library as _library
from . import merge as _merge
from . import serve as _serve
from . import train as _train
from .common import EXTRA

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(_library.app, name="library")
app.command("generate", context_settings=EXTRA)(_generate.generate)
app.command("merge", context_settings=EXTRA)(_merge.merge_cmd)
app.command("train", context_settings=EXTRA)(_train.train_cmd)
app.command("serve", context_settings=EXTRA)(_serve.serve_cmd)
app.command("bench", context_settings=EXTRA)(_bench.bench)
app.command("demo")(_bench.demo)
BENCHMARKS = _bench.BENCHMARKS


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

    from quiver.library import QuiverError

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

