#!/usr/bin/env bash
# dpnle's GPU check in one command: activation capture and steered generation at Llama-3-8B
# scale (random-init, bf16), one JSON and one log. See benchmarks/README.md.
#
#   benchmarks/gpu_check.sh                       # on a CUDA machine: the 8B check (< 8 minutes)
#   SIZE=tiny DEVICE=cpu benchmarks/gpu_check.sh  # CPU smoke test with a toy Llama
#
# Environment (all optional):
#   GPU_CHECK_JSON    the JSON file (default benchmarks/gpu_check.json)
#   GPU_CHECK_LOG     the log (default: the JSON's path with .log)
#   TIMEOUT_S         wall-clock limit of the Python driver (default 440; its steps get 15 s less)
#   SIZE, DEVICE      8b | tiny, cuda | cpu (default: 8b on CUDA, tiny on the CPU)
#   PYTHON            the interpreter (default python3)
#   GPU_CHECK_WHEELS  auto | 1 | 0: install the wheels carried in .whl/ into GPU_CHECK_SITE
#                     (default /tmp/site); auto installs them when this Python lacks
#                     transformers >= 5.18 or platformdirs (the device's image does)
# Further arguments go to benchmarks/gpu_check.py (e.g. --num-pairs 200 --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
JSON=${GPU_CHECK_JSON:-benchmarks/gpu_check.json}
LOG=${GPU_CHECK_LOG:-${JSON%.json}.log}
TIMEOUT_S=${TIMEOUT_S:-440}
WHEELS=${GPU_CHECK_WHEELS:-auto}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

mkdir -p "$(dirname "$JSON")" "$(dirname "$LOG")"
: >"$LOG"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }
SECONDS=0

say "== dpnle gpu_check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $REPO"

# 1. The carried wheels (the device's image has transformers 5.17, below dpnle's 5.18, and no
#    platformdirs; nothing can be downloaded there).
if compgen -G '.whl/*.whl' >/dev/null; then
    install=0
    case "$WHEELS" in
        1 | yes) install=1 ;;
        0 | no) install=0 ;;
        *)
            "$PYTHON" -c '
import platformdirs, transformers
from packaging.version import Version
assert Version(transformers.__version__) >= Version("5.18")' >/dev/null 2>&1 || install=1
            ;;
    esac
    if [ "$install" = 1 ]; then
        say "== installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        else
            say "!! the wheel install failed (the log has pip's output); going on with the image's packages"
        fi
    else
        say "== .whl/ present, not installed (this Python has what dpnle needs; GPU_CHECK_WHEELS=1 forces it)"
    fi
fi
# dpnle from this checkout: the device has it installed nowhere.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO"

# 2. Versions and the GPU.
say "== versions"
"$PYTHON" benchmarks/gpu_check.py --versions ${DEVICE:+--device "$DEVICE"} 2>&1 | tee -a "$LOG" ||
    say "!! could not import the packages (the env step will record why)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 |
        tee -a "$LOG" || true
fi
say "== setup took ${SECONDS} s"

# 3. The driver, under a time limit; its JSON is rewritten after every step.
rc=0
timeout --signal=TERM --kill-after=15 "$TIMEOUT_S" \
    "$PYTHON" benchmarks/gpu_check.py --out "$JSON" --log "$LOG" --log-append \
    --budget-s "$((TIMEOUT_S - 15))" ${SIZE:+--size "$SIZE"} ${DEVICE:+--device "$DEVICE"} "$@" || rc=$?

if [ "$rc" -ne 0 ]; then
    # Whatever stopped the driver, the JSON says so (and exists).
    "$PYTHON" - "$JSON" "$rc" "$LOG" <<'EOF' || true
import json, sys
path, rc, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    payload = json.load(open(path))
except (OSError, ValueError):
    payload = {"schema": "dpnle-gpu-check/1", "status": "failed", "log": log, "steps": {}}
if payload.get("status") in (None, "running", "ok"):
    payload["status"] = "timed_out" if rc in (124, 137) else "failed"
payload["wrapper_returncode"] = rc
json.dump(payload, open(path, "w"), indent=2)
EOF
    say "!! gpu_check: exit status $rc after ${SECONDS} s (JSON $JSON, log $LOG)"
    exit "$rc"
fi
say "== gpu_check done in ${SECONDS} s: JSON $JSON, log $LOG"
