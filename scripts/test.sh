#!/usr/bin/env bash
# The test command: installs what it needs (./.venv, pinned), then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k attention
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0 PYTHONUNBUFFERED=1
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-$root/../shared/data}
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
