#!/usr/bin/env bash
# The main job: installs what it needs (./.venv, pinned), then runs the demo sweep on the local embedded Ray
# (CPU; a GPU when there is one): the paper's 5 designs on SmolLM2-135M, trained with Ray Tune + Ray Train +
# DeepSpeed, evaluated on the local MTEB tasks as Ray tasks, ending with the significance report's table.
# Re-running continues / re-uses what is done (--resume). Extra arguments go to `python -m sweeps run`, e.g.
#   bash scripts/demo.sh --set training.max_steps=20 --storage /tmp/sweeps
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-$root/../shared/data}
exec .venv/bin/python -m sweeps run demo --resume "$@"
