#!/usr/bin/env bash
# The main job: installs what it needs (./.venv, pinned), then runs a sweep on the local embedded Ray, ending with
# the significance report's table. Re-running continues / re-uses what is done (--resume).
# - On a machine with a CUDA GPU: one seed of the `study` preset, the paper's 5 designs on SmolLM2-135M and
#   Gemma-3-270M, every layer, 200 steps, full evaluation on the 12 local MTEB tasks (README: Findings).
# - On CPU: the `demo` preset, the same 5 designs on a depth-truncated SmolLM2-135M for a few steps (pipeline only).
# Extra arguments go to `python -m sweeps run`, e.g.
#   bash scripts/demo.sh --set training.max_steps=20 --storage /tmp/sweeps
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-$root/../shared/data}
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  exec .venv/bin/python -m sweeps run study --set 'seeds=[0]' --set name=study_seed0 --resume "$@"
fi
exec .venv/bin/python -m sweeps run demo --resume "$@"
