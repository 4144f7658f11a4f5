#!/usr/bin/env bash
# `resources.start_ahead` measured on one GPU: the same train stage of several waves, run in one device call with
# trials admitted ahead of their turn and without (the order alternates with AB_ORDER), each a `bench.sweep_gpu`
# run in its own storage, training only. Compare `trials_span_s` (first trial's start -> last trial's end) and
# `gpu_busy_fraction_trials` between the two JSONs; prepare (the GGUF conversion) is outside that span.
#
#   source .devstageN/gpu_env.sh && OUT=$OUT bash bench/start_ahead_ab.sh
set -u
OUT=${OUT:-/tmp/ab_out}
LIMIT=${LIMIT:-560}                                    # seconds for both runs
PART=${PART:-base_model=gemma3-270m}
AB_SETS=${AB_SETS:-"seeds=[0,1] training.max_steps=100"}  # 10 trials of 5 designs: two waves of 5
AB_ORDER=${AB_ORDER:-"true false"}
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=300
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-/tmp/site/embed_data}
mkdir -p "$OUT"
sets=()
for s in $AB_SETS; do sets+=(--set "$s"); done
# the part's GGUF conversions first (once per machine, ~90 s for Gemma on a fresh H100), outside both timings
python - "$PART" "${sets[@]}" <<'PY'
import sys
from embed_core.backbone import resolve_source
from embed_core.config import EmbedConfig
from sweeps.config_parse import load_sweep_config
sets = [a for a in sys.argv[2:] if a != "--set"]
for m in sorted({c.base_model for c in load_sweep_config("study", sets).with_part(sys.argv[1]).cells()}):
    print("converted", resolve_source(EmbedConfig(base_model=m)).path)
PY
n=$(wc -w <<< "$AB_ORDER")
start=$(date +%s)
for ahead in $AB_ORDER; do
  left=$(( start + LIMIT - $(date +%s) ))
  per=$(( left / n )); n=$(( n - 1 ))
  echo "start_ahead=$ahead: $per s"
  python -m bench.sweep_gpu --config study --part "$PART" "${sets[@]}" --set "resources.start_ahead=$ahead" \
    --storage "/tmp/ab/ahead_$ahead" --out "$OUT/start_ahead_$ahead.json" --after-train none --skip-isolated \
    --time-limit "$per" | tail -14
done
