#!/usr/bin/env bash
# The `study` preset on a one-GPU machine that is lent in calls of at most 10 minutes (bench/NOTES.md): every call
# runs this same command and it goes on where the last call stopped, so calls can be sent back to back without a
# decision in between.
#
#   source .devstageN/gpu_env.sh && bash bench/study_on_device.sh      # repeat until it prints "study: all parts done"
#
# Steps, each skipped once its mark is in $STATE:
#   1. the parts, one base model x seed(s) each, in PARTS order, each a `bench.sweep_gpu` run in its own storage
#      (`--resume` inside it continues an interrupted part). A part starts with the Inductor / Triton caches of
#      the parts before (one shared folder) and with the reference's results already computed (the evaluation
#      skips finished checkpoint x task pairs); a part ends with its evaluation (AFTER_TRAIN), the report is
#      built from the merged parts (`python -m sweeps merge` then `python -m sweeps report`).
# What comes back under $OUT each call: every part's bench JSON + log and, once the part is done, its archive
# (`python -m sweeps merge` takes the extracted folders).
set -u
STATE=${STATE:-/tmp/study_state}
LIMIT=${LIMIT:-570}                      # seconds this call may use (the device's per-call limit is 600)
PARTS=${PARTS:-"seed=0 seed=1 seed=2"}   # both models a part: 10 trials, ~11 minutes of an H100 with the evaluation
AFTER_TRAIN=${AFTER_TRAIN:-evaluate}     # the report is built after merging, on any machine
ISOLATED=${ISOLATED:-1}                  # 0: skip the Trainer-alone baseline of the first part's first model
LR_CHECK=${LR_CHECK:-1}                  # 1: after the parts, the learning-rate check (the lr_check preset)
KILL_AFTER=${KILL_AFTER:-120}            # seconds into the lr check's train stage of its SIGKILL
EXTRA=()                                 # STUDY_SETS: more --set values, one a line (a CPU rehearsal's small models)
VALUES=()
while IFS= read -r s; do [ -n "$s" ] && EXTRA+=(--set "$s") && VALUES+=("$s"); done <<< "${STUDY_SETS:-}"
NAME=$(python -c 'import sys; from sweeps.config_parse import load_sweep_config
print(load_sweep_config("study", sys.argv[1:]).name)' "${VALUES[@]}")   # the sweep's folder in each part's storage
REUSE_REFERENCE=${REUSE_REFERENCE:-0}    # 1: STUDY_SETS change what is trained, not the evaluation: reuse the
                                         # committed reference's results
START=$(date +%s)
left() { echo $(( START + LIMIT - $(date +%s) )); }
mkdir -p "$STATE" /tmp/sweeps/.compile_cache "${OUT:=/tmp/study_out}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=300
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-/tmp/site/embed_data}
export TORCHINDUCTOR_CACHE_DIR=/tmp/sweeps/.compile_cache/inductor TRITON_CACHE_DIR=/tmp/sweeps/.compile_cache/triton
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null | tee -a "$STATE/device.txt"

SETS=("${EXTRA[@]}")

i=0
for part in $PARTS; do
  i=$((i + 1))
  [ -f "$STATE/done_$i" ] && continue
  [ "$(left)" -lt 90 ] && { echo "study: $(left) s left in this call; part $i ($part) next call"; exit 0; }
  storage=/tmp/sweeps/p$i
  mkdir -p "$storage"
  ln -sfn /tmp/sweeps/.compile_cache "$storage/.compile_cache"
  mkdir -p "$storage/$NAME/results"
  refs=(/tmp/sweeps/p*/"$NAME"/results/reference__*)     # the reference is the same model in every part, and in
  { [ ${#EXTRA[@]} = 0 ] || [ "$REUSE_REFERENCE" = 1 ]; } && refs+=(studies/*/study/results/reference__*)  # the
  for ref in "${refs[@]}"; do                                               # committed study (same evaluation)
    [ -d "$ref" ] && [ ! -e "$storage/$NAME/results/$(basename "$ref")" ] && cp -r "$ref" "$storage/$NAME/results/"
  done
  n=$(ls "$STATE"/bench_p${i}_*.json 2>/dev/null | wc -l)
  iso=(--skip-isolated)
  [ "$ISOLATED" = 1 ] && [ "$n" = 0 ] && [ "$i" = 1 ] && iso=(--isolated-steps 20 --warmup 4)   # the Trainer alone, once
  echo "study: part $i ($part), call $((n + 1)) for it, $(left) s left"
  python -m bench.sweep_gpu --config study --part "$part" "${SETS[@]}" --storage "$storage" \
    --out "$STATE/bench_p${i}_$n.json" --archive "$STATE/part_p$i.tar.gz" --time-limit $(( $(left) - 25 )) --after-train "$AFTER_TRAIN" "${iso[@]}" \
    | tail -12
  cp "$STATE/bench_p${i}_$n.json" "$STATE/bench_p${i}_$n.log" "$STATE/part_p$i.tar.gz" "$OUT/" 2>/dev/null
  if python -m bench.sweep_gpu --finished --out "$STATE/bench_p${i}_$n.json"
  then
    touch "$STATE/done_$i"
    echo "study: part $i done"
  else
    echo "study: part $i not finished in this call (resumes next call)"
    exit 0
  fi
done
echo "study: all parts done"

# The learning-rate check (README: Findings): five learning rates x both base models on the design with the most
# freshly initialised parameters, seed 0, the study's budget, training only (val_acc curves); its train stage is
# SIGKILLed once KILL_AFTER s in and resumed, which measures what a kill costs each trial (`kill_loss_s`).
[ "$LR_CHECK" = 1 ] || exit 0
[ -f "$STATE/done_lr" ] && { echo "study: lr check done"; exit 0; }
[ "$(left)" -lt 90 ] && { echo "study: $(left) s left in this call; the lr check next call"; exit 0; }
n=$(ls "$STATE"/bench_lr_*.json 2>/dev/null | wc -l)
echo "study: lr check, call $((n + 1)) for it, $(left) s left"
python -m bench.sweep_gpu --config lr_check "${SETS[@]}" --storage /tmp/sweeps/lr \
  --out "$STATE/bench_lr_$n.json" --archive "$STATE/lr_check.tar.gz" --time-limit $(( $(left) - 25 )) \
  --after-train none --skip-isolated --kill-after "$KILL_AFTER" | tail -12
cp "$STATE/bench_lr_$n.json" "$STATE/bench_lr_$n.log" "$STATE/lr_check.tar.gz" "$OUT/" 2>/dev/null
python -m bench.sweep_gpu --finished --out "$STATE/bench_lr_$n.json" && touch "$STATE/done_lr" && echo "study: lr check done"
