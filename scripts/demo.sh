#!/usr/bin/env bash
# The main job: installs what it needs (./.venv, pinned), then runs the demo on the local embedded Ray (CPU).
# Extra arguments go to the demo, e.g.  bash scripts/demo.sh --steps 10
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-$root/../shared/data}
exec .venv/bin/python -m ray_jobs.demo "$@"
