#!/usr/bin/env bash
# README command 1: the main job on the real model (sets up .venv on first use).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${QUIVER_VENV:-$root/.venv}/bin/quiver" demo "$@"
