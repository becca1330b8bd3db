#!/usr/bin/env bash
# A team library on this machine, in one command: starts a throwaway PostgreSQL and S3 server
# (SeaweedFS) on 127.0.0.1, creates a library bound to SmolLM2-135M in them, registers the
# shipped task adapters (tasks/adapters/), lists and searches it, then keeps the servers up
# until Ctrl-C and prints the settings to use from another shell.
#   scripts/team-trial.sh            # stays up; Ctrl-C stops the servers and deletes their data
#   scripts/team-trial.sh --no-wait  # stops right after the demonstration
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
py="${QUIVER_VENV:-$root/.venv}/bin/python"
quiver="${QUIVER_VENV:-$root/.venv}/bin/quiver"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

work=$(mktemp -d /tmp/quiver-team-trial.XXXXXX)
chmod 755 "$work"
"$py" -m quiver.library.localservers --dir "$work" --bucket quiver --env-file "$work/env" > "$work/servers.log" 2>&1 &
servers=$!
trap 'kill -TERM $servers 2>/dev/null; wait $servers 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 120); do
  [ -s "$work/env" ] && break
  kill -0 $servers 2>/dev/null || { cat "$work/servers.log" >&2; exit 1; }
  sleep 1
done
[ -s "$work/env" ] || { echo "servers did not start" >&2; cat "$work/servers.log" >&2; exit 1; }
# shellcheck disable=SC1091
source "$work/env"   # AWS_* for S3, PGPASSWORD, QUIVER_LIBRARY (no password in it), QUIVER_BLOBS

echo "== catalog $QUIVER_LIBRARY, blobs $QUIVER_BLOBS"
"$quiver" library init -L "$QUIVER_LIBRARY" "library.blobs=$QUIVER_BLOBS"
"$py" - <<'PY'
import os
from quiver.library import Library
from quiver.training.tasklib import register_task_adapters

with Library.open(os.environ["QUIVER_LIBRARY"]) as lib:
    print("registered:", ", ".join(register_task_adapters(lib)))
    lib.embed(progress=False)
PY
"$quiver" library list -L "$QUIVER_LIBRARY"
"$quiver" library search "Rewrite 03/14/2024 as an ISO date" -L "$QUIVER_LIBRARY" -k 3
"$quiver" library verify -L "$QUIVER_LIBRARY"

if [ "${1:-}" != "--no-wait" ]; then
  echo
  echo "The servers stay up until Ctrl-C. From another shell:"
  echo "  source $work/env"
  echo "  $quiver library list -L \"\$QUIVER_LIBRARY\""
  wait $servers || true
fi
