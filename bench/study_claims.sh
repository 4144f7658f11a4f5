#!/usr/bin/env bash
# The claims' re-tests of the study (README: Findings): the paper's claims 1 and 3 compare designs against
# last-layer trainable pooling on STS and retrieval, so the report is built again on those five tasks only with
# that design as the baseline, once per attention. Writes studies/h100/claims/report_vs_last_layer_{causal,
# bidirectional}.md from the committed study (its results are copied to a scratch folder; nothing else changes).
#
#   bash bench/study_claims.sh [STUDY_DIR] [OUT_DIR]        # defaults: studies/h100/study studies/h100/claims
set -euo pipefail
cd "$(dirname "$0")/.."
study=${1:-studies/h100/study}
out=${2:-studies/h100/claims}
tasks="STSBenchmark SICK-R STS17 BIOSSES SciFact"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/results" "$out"
cp "$study/trials.json" "$study/sweep.json" "$study/checkpoints.json" "$scratch/"
for d in "$study"/results/*/*/; do
  rel=${d#"$study"/results/}
  mkdir -p "$scratch/results/$rel/instances"
  cp "$d/model_meta.json" "$d/run_labels.json" "$scratch/results/$rel/"
  for t in $tasks; do
    cp "$d/$t.json" "$scratch/results/$rel/"
    cp "$d/instances/$t.json" "$d"/instances/"${t}"__*.json "$scratch/results/$rel/instances/" 2>/dev/null || true
  done
done
for b in last_layer_trainable+causal last_layer_trainable+bidirectional; do
  name=$(echo "$b" | sed 's/_trainable//; s/+/_/')
  HF_HUB_OFFLINE=1 .venv/bin/python -m sweeps report "$scratch/results" --trials "$scratch/trials.json" \
    --baseline "$b" --out "$scratch/out_$name" --no-plots --quiet
  cp "$scratch/out_$name/report.md" "$out/report_vs_$name.md"
done
