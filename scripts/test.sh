#!/usr/bin/env bash
# README command 2: the whole test suite (sets up .venv on first use). Extra arguments go to
# pytest, e.g. `scripts/test.sh -m "not real_model"` or `scripts/test.sh tests/library`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# `python -m` would put this directory first on sys.path, making the package's folders importable
# under their own names (kernels/ hands that name over, see kernels/__init__.py): keep it off, so
# the tests import only the installed package.
export PYTHONSAFEPATH=1
# pytest's own exit status is the result: 0 all passed, 1 failures, 5 nothing collected
# (also a failure here: the suite is never empty).
exec "${QUIVER_VENV:-$root/.venv}/bin/python" -m pytest "$@"
