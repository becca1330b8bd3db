"""The repository root on sys.path (`python -m` from the root, Ray workers) must not shadow the
environment's `kernels` package, which transformers imports, with quiver.kernels' folder."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_kernels_from_the_root_gets_the_environments_package():
    code = ("import kernels, quiver.kernels as q; from quiver.kernels import mixture_lora; "
            "print(kernels.__file__); print(q.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # nothing to hand over to: a clear error
        assert done.returncode != 0 and "no package 'kernels' is installed" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    theirs, ours = done.stdout.split()
    assert Path(theirs).resolve() != ROOT / "kernels" / "__init__.py" and "site-packages" in theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"  # quiver.kernels unaffected
