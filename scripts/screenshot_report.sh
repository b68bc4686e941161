#!/usr/bin/env bash
# Render a run's report (RUN_DIR/report/index.html) in headless Chromium and save a screenshot.
#   scripts/screenshot_report.sh RUN_DIR OUT.png [WIDTH,HEIGHT]
# Needs Debian's `chromium` package (apt-get install chromium). The browser gets a throwaway
# profile and no network features, so the screenshot shows only what the self-contained page holds.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 RUN_DIR OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
run_dir=$1
out=$2
size=${3:-1200,2000}

page="$run_dir/report/index.html"
[[ -f "$page" ]] || page="$run_dir/index.html"  # a report folder itself is accepted too
if [[ ! -f "$page" ]]; then
  echo "no report at $run_dir/report/index.html; run \`dpnle leakage-report --run RUN\` first" >&2
  exit 1
fi

browser=""
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then browser=$(command -v "$name"); break; fi
done
if [[ -z "$browser" ]]; then
  echo "no chromium in PATH; install it with: apt-get install -y chromium" >&2
  exit 1
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
page_abs=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
out_dir=$(dirname "$out")
mkdir -p "$out_dir"
out_abs=$(cd "$out_dir" && pwd)/$(basename "$out")

"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --screenshot="$out_abs" --window-size="$size" \
  "file://$page_abs" >/dev/null 2>&1 || true

if [[ ! -s "$out_abs" ]]; then
  echo "chromium wrote no screenshot to $out_abs" >&2
  exit 1
fi
echo "$out_abs"
