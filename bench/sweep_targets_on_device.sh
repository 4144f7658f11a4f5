#!/usr/bin/env bash
# The sweep-on-one-GPU targets (README: Performance) on a machine lent in calls of at most 10 minutes: every call runs
# this same command and it goes on with the first step not done yet, so calls can be sent back to back.
#
#   source .devstageN/gpu_env.sh && OUT=$OUT bash bench/sweep_targets_on_device.sh   # until "targets: all done"
#
# Steps, in order of what they measure (each skipped once its mark is in $STATE; each needs the seconds in SECONDS_*
# left in the call, else it waits for the next call):
#   five:  the five-design sweep end to end, as a user runs it (`total_s`: prepare, train, evaluate, report), the
#          `study` part seed=0 x smollm2-135m with the committed reference's results reused;
#   warm:  the same five trials again as a new sweep in the same storage (its Inductor / Triton caches and the
#          converted model are warm), training only, a few steps: `time_to_first_step_s` on a second run;
#   ab:    `resources.start_ahead` on and off over two waves (bench/start_ahead_ab.sh);
#   ray:   Ray's own share of a trial's start-up: TorchTrainers whose loop only imports what the Trainer imports,
#          alone and as five Tune trials at once (bench/worker_start.py), ~2 minutes.
# What comes back under $OUT each call: each step's bench JSON and log.
# A call the device takes back returns nothing: with `LIMIT=300 SECONDS_FIVE=250` the five-design step spans two
# calls (train stage, then evaluation and report, each call's numbers coming back), at the cost of a second Ray start.
set -u
STATE=${STATE:-/tmp/targets_state}
LIMIT=${LIMIT:-570}                   # seconds this call may use (the device's per-call limit is 600)
STEPS=${STEPS:-"five warm ab ray"}
CONFIG=${CONFIG:-study}
PART=${PART:-seed=0,base_model=smollm2-135m}
AB_PART=${AB_PART:-base_model=smollm2-135m}
WARM_SETS=${WARM_SETS:-"training.max_steps=30"}
EXTRA=()                              # TARGET_SETS: more --set values, one a line (a CPU rehearsal's small models)
while IFS= read -r s; do [ -n "$s" ] && EXTRA+=(--set "$s"); done <<< "${TARGET_SETS:-}"
declare -A NEED=([five]=${SECONDS_FIVE:-500} [warm]=${SECONDS_WARM:-150} [ab]=${SECONDS_AB:-400} [ray]=150)
START=$(date +%s)
left() { echo $(( START + LIMIT - $(date +%s) )); }
mkdir -p "$STATE" "${OUT:=/tmp/targets_out}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=300
export EMBED_DATA_DIR=${EMBED_DATA_DIR:-/tmp/site/embed_data}
NAME=$(python -c 'import sys; from sweeps.config_parse import load_sweep_config
print(load_sweep_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]).name)' "$CONFIG" "${EXTRA[@]}")
STORAGE=/tmp/sweeps/targets
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$STATE/device.txt"

for step in $STEPS; do
  [ -f "$STATE/done_$step" ] && continue
  if [ "$(left)" -lt "${NEED[$step]}" ]; then echo "targets: $(left) s left in this call; $step next call"; exit 0; fi
  n=$(ls "$STATE"/"$step"_*.json 2>/dev/null | wc -l)
  json="$STATE/${step}_$n.json"
  echo "targets: $step, call $((n + 1)) for it, $(left) s left"
  ok=0                                # each step's own rule for "done" (a sweep: every stage it was given ran)
  case $step in
    five)
      mkdir -p "$STORAGE/$NAME/results"
      for ref in studies/*/study/results/reference__*; do   # the reference model's results: the same evaluation
        [ "$CONFIG" = study ] && [ -d "$ref" ] && [ ! -e "$STORAGE/$NAME/results/$(basename "$ref")" ] && cp -r "$ref" "$STORAGE/$NAME/results/"
      done
      python -m bench.sweep_gpu --config "$CONFIG" --part "$PART" "${EXTRA[@]}" --storage "$STORAGE" --out "$json" \
        --skip-isolated --time-limit $(( $(left) - 25 )) > "${json%.json}.log" 2>&1
      python -m bench.sweep_gpu --finished --out "$json" && ok=1 ;;
    warm)
      sets=(--set "name=${NAME}_warm")
      for s in $WARM_SETS; do sets+=(--set "$s"); done
      python -m bench.sweep_gpu --config "$CONFIG" --part "$PART" "${EXTRA[@]}" "${sets[@]}" --storage "$STORAGE" \
        --out "$json" --skip-isolated --after-train none --time-limit $(( $(left) - 25 )) > "${json%.json}.log" 2>&1
      python -m bench.sweep_gpu --finished --out "$json" && ok=1 ;;
    ab)
      (( ${#EXTRA[@]} )) && echo "targets: TARGET_SETS do not reach the A/B (bench/start_ahead_ab.sh takes AB_SETS)"
      PART="$AB_PART" LIMIT=$(( $(left) - 20 )) OUT="$STATE/ab_$n" bash bench/start_ahead_ab.sh > "${json%.json}.log" 2>&1
      python - "$STATE/ab_$n" "$json" <<'EOF' && ok=1   # both variants' bench JSONs in one; done when both trained
import json, sys
from pathlib import Path
runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("start_ahead_*.json"))}
Path(sys.argv[2]).write_text(json.dumps({"runs": runs}, indent=1))
sys.exit(0 if len(runs) == 2 and all(d.get("train_rc") == 0 and not d.get("train_interrupted") for d in runs.values())
         else 1)
EOF
      ;;
    ray)
      gpu=(); nvidia-smi -L > /dev/null 2>&1 && gpu=(--gpu)   # a CPU rehearsal measures CPU workers
      timeout $(( $(left) - 10 )) python -m bench.worker_start --trials "${RAY_TRIALS:-5}" "${gpu[@]}" --imports \
        --out "$json" > "${json%.json}.log" 2>&1 && ok=1 ;;
  esac
  tail -14 "${json%.json}.log"
  cp "$json" "${json%.json}.log" "$OUT/" 2>/dev/null
  if [ "$ok" = 1 ]; then touch "$STATE/done_$step"; echo "targets: $step done"; else
    echo "targets: $step not finished in this call"; exit 0; fi
done
echo "targets: all done"
