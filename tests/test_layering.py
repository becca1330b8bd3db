"""Imports point one way: library <- routing/kernels <- runtime/merging <- training <- CLI/server.

Every module of the package is parsed (ast, nothing is imported) and each import of another
Quiver package is checked against the layer table below: a module may import its own package
and packages of lower layers, never a package of its own layer or a higher one. Dynamic imports
(``importlib.import_module``, ``__import__``) are refused below the top layer, where they would
hide an import from this check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of each top-level part of the package (a folder, or a module at the root).
LAYERS = {
    "tasks": 0,     # the generated task suite: imports nothing else from Quiver
    "library": 0,   # may import tasks (below it in ARCHITECTURE.md's drawing), nothing else
    "routing": 1,
    "kernels": 1,
    "runtime": 2,
    "merging": 2,
    "training": 3,
    "cli": 4, "serve": 4, "cluster": 4, "bench": 4, "config": 4, "demo": 4, "conf": 4, "__init__": 4,
}
# Pairs a layer-0 part may still import (the task suite is plain data under the library).
ALLOWED = {("library", "tasks")}
# The only parts allowed to import dynamically (the CLI runs benchmarks by name).
DYNAMIC_OK = {"cli"}
# Entry points: within the top layer, only the CLI imports these (nothing imports the CLI).
# cluster/ runs the server's engine on Ray replicas; the benchmarks drive both (and wait on the server).
ENTRY_POINTS = {"cli": set(), "serve": {"cli", "cluster", "bench"}, "bench": {"cli"}, "cluster": {"cli", "bench"}}


def _modules() -> list[Path]:
    skip = {"tests", "scripts", "docs", ".venv", ".git"}
    return sorted(p for p in ROOT.rglob("*.py")
                  if p.relative_to(ROOT).parts[0] not in skip and "adapters" not in p.relative_to(ROOT).parts)


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path, source: str | None = None) -> tuple[set[str], list[int]]:
    """The Quiver parts ``path`` imports, and the lines of dynamic imports."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    rel = path.relative_to(ROOT)
    package = list(rel.parts[:-1])  # the module's package, relative to the root
    parts, dynamic = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                if name[0] == "quiver" and len(name) > 1:
                    parts.add(name[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = (node.module or "").split(".")
                if name[0] == "quiver":
                    if len(name) > 1:
                        parts.add(name[1])
                    else:  # from quiver import library, routing
                        parts.update(a.name for a in node.names)
            else:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + ((node.module or "").split(".") if node.module else [])
                if target:
                    parts.add(target[0])
                else:  # from . import x at the root
                    parts.update(a.name for a in node.names)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                dynamic.append(node.lineno)
    return {p for p in parts if p in LAYERS}, dynamic


def test_every_part_has_a_layer():
    unknown = sorted({_part(p) for p in _modules()} - set(LAYERS))
    assert not unknown, f"give these parts a layer in LAYERS: {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    me = _part(path)
    parts, dynamic = _imported_parts(path)
    wrong = sorted(p for p in parts - {me}
                   if LAYERS[p] >= LAYERS[me] and (me, p) not in ALLOWED and LAYERS[me] < 4)
    assert not wrong, f"{path.relative_to(ROOT)} ({me}, layer {LAYERS[me]}) imports {wrong}"
    entry = sorted(p for p in parts - {me} if p in ENTRY_POINTS and me not in ENTRY_POINTS[p])
    assert not entry, f"{path.relative_to(ROOT)} ({me}) imports the entry point(s) {entry}"
    if me not in DYNAMIC_OK:
        assert not dynamic, f"{path.relative_to(ROOT)}: dynamic import on line(s) {dynamic}"


def test_the_check_sees_every_way_to_import():
    """The parser finds imports written every way: absolute, relative, from the package, dynamic."""
    src = ("from quiver.runtime import x\nfrom ..merging import y\nfrom quiver import training\n"
           "import quiver.serve.app\nfrom .arrow import Arrow\nimport importlib\n"
           "importlib.import_module('quiver.cli')\n")
    parts, dynamic = _imported_parts(ROOT / "routing" / "probe.py", src)
    assert parts == {"runtime", "merging", "training", "serve", "routing"}
    assert dynamic == [7]
