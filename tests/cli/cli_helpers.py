"""Running `quiver` through its real entry point, and reading what it printed."""

from __future__ import annotations

import sys
from pathlib import Path

from quiver import cli


def run(*argv) -> tuple[int, str, str]:
    """``quiver ARGV`` through ``cli.main`` (the real entry point): (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["quiver", *map(str, argv)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The single error line (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes (SQLite's -wal/-shm companions aside: opening a library may write them)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def flat(text: str) -> str:
    """Help/usage text with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").replace("─", " ").split())
