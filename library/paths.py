"""Where Quiver may write outside a library: one rule, checked before any work or write.

An output path (an exported PEFT directory, a merged checkpoint, a routing trace) is never

- the current directory, or a directory that contains it;
- a library (a directory with ``catalog.sqlite``), a path inside one, or a directory that
  contains the library in use or any input of the command;
- an existing non-directory (for directory outputs) or an existing directory (for file outputs).

An existing non-empty output directory is replaced only when overwriting was asked for, and only
when it holds a previous output of the same kind (a PEFT directory has ``adapter_config.json``;
a checkpoint has ``config.json`` and safetensors weights). The replacement is written in a
staging directory beside the output and swapped in by two renames (old -> retired, new -> out);
the old output is deleted only after the new one is in place, so an interrupted overwrite
leaves the old output or the new one, never a mixture or nothing.

Directories made here get the permissions the user's umask gives (``tempfile.mkdtemp`` would
make them 0700).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import QuiverError

CATALOG_NAME = "catalog.sqlite"


class OutputPathError(QuiverError, ValueError):
    """An output path breaks the rule above; nothing was written."""


def _is_peft(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


# Output kind -> (what it is called, how a previous output of that kind is recognised).
OUTPUT_KINDS = {
    "peft": ("a PEFT adapter directory", _is_peft),
    "checkpoint": ("a model checkpoint", _is_checkpoint),
}


def is_library(path: Path) -> bool:
    return (path / CATALOG_NAME).is_file()


def _library_around(path: Path) -> Path | None:
    """The library ``path`` is (or lies inside), if any."""
    for p in (path, *path.parents):
        if is_library(p):
            return p
    return None


def _check_common(out: Path, protect: Iterable[str | os.PathLike]) -> Path:
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        raise OutputPathError(f"output path {str(out)!r} is the current directory or contains it; "
                              "name a new directory")
    lib = _library_around(resolved)
    if lib is not None:
        raise OutputPathError(f"output path {str(out)!r} is inside the library {lib}; name a path outside it")
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or p.is_relative_to(resolved):
            raise OutputPathError(f"output path {str(out)!r} would replace {str(p)!r}, "
                                  "which this command reads; name another path")
    return resolved


def check_output_dir(out: str | os.PathLike, kind: str, *, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = (), hint: str = "overwrite=True") -> Path:
    """Check that directory ``out`` may receive an output of ``kind`` (see the module rule).

    ``protect``: paths the command reads (the library, the base model, input checkpoints);
    ``hint``: how the caller asks for an overwrite (``--overwrite`` on the command line).
    Returns ``out`` as a :class:`Path`; raises :class:`OutputPathError` otherwise.
    """
    what, looks_like = OUTPUT_KINDS[kind]
    out = Path(out)
    _check_common(out, protect)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path {str(out)!r} exists and is not a directory; "
                              "it is never replaced, name a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not looks_like(out):
            raise OutputPathError(f"output directory {str(out)!r} is not empty and is not {what}; "
                                  "only a previous output of the same kind is ever replaced")
        if not overwrite:
            raise OutputPathError(f"output directory {str(out)!r} is not empty ({what}); "
                                  f"{hint} replaces it")
    return out


def check_output_file(out: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Check that file ``out`` can be written: its folder exists and is writable, it is no
    directory, and it lies outside any library. Replacing an existing file is allowed."""
    out = Path(out)
    _check_common(out, protect)
    if out.is_dir():
        raise OutputPathError(f"output file {str(out)!r} is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {str(out)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {str(out)!r}: the folder {str(parent)!r} is not writable")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` (same filesystem, so the final rename is atomic),
    with the permissions the umask gives a new directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish(staging: Path, out: Path) -> None:
    """Swap the finished ``staging`` directory into ``out`` (replacing a checked previous
    output): the old one is renamed aside first and deleted only once the new one is in place."""
    mask = _umask()
    for p in staging.rglob("*"):  # some writers (safetensors) create files 0600
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, retired / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired / out.name, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
