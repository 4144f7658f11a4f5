#!/usr/bin/env bash
# Render a report.html to PNG with headless Chromium, to look at it (not part of CI).
#   bash scripts/screenshot_report.sh REPORT_HTML [OUT_PNG] [WIDTH] [HEIGHT]
# Needs chromium (Debian: apt-get install -y chromium). Long pages: raise HEIGHT (pixels).
set -euo pipefail
html=$(realpath "$1")
out=${2:-${html%.html}.png}
width=${3:-1400}
height=${4:-6000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no chromium found (apt-get install -y chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "file://$html" 2>/dev/null
echo "$out"
