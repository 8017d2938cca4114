#!/usr/bin/env bash
# Mixed precision on a GPU: trains the same model for three epochs in float32
# and with `amp` (float16 autocast and gradient scaling on CUDA), and prints
# each run's step time and the peak GPU memory its process held, with the
# ratios. One short prepared check for a machine with a CUDA GPU and the
# project's venv (scripts/libtorch.sh, torch==2.13.0 with CUDA).
#
#   scripts/gpu-check.sh [MODEL] [IMAGE_SIZE] [BATCH] [IMAGES]
#   (defaults: yolov8n 320 32 512; about two minutes on an H100 after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-yolov8n}" size="${2:-320}" batch="${3:-32}" images="${4:-512}"

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: this needs a CUDA GPU" >&2; exit 2; }
eval "$(scripts/libtorch.sh)"
cargo build --release --locked -p vtp-trainer --features torch,testing --example amp_check
bin="${CARGO_TARGET_DIR:-target}/release/examples/amp_check"

# Runs one precision; prints its JSON line with the peak memory added.
run() {
    local amp="$1" out peak=0 pid used
    out="$(mktemp)"
    "$bin" "$amp" "$model" "$size" "$batch" "$images" >"$out" &
    pid=$!
    # The process's memory as the driver sees it (the allocator's cache and
    # the CUDA context included), sampled every 100 ms.
    while kill -0 "$pid" 2>/dev/null; do
        used="$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
            awk -F', ' -v p="$pid" '$1 == p { print $2 }')"
        [[ -n "$used" && "$used" -gt "$peak" ]] && peak="$used"
        sleep 0.1
    done
    wait "$pid"
    python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read()); d["peak_mib"]=int(sys.argv[2]); print(json.dumps(d))' "$out" "$peak"
    rm -f "$out"
}

fp32="$(run 0)"
amp="$(run 1)"
echo "fp32: $fp32"
echo "amp:  $amp"
python3 - "$fp32" "$amp" <<'PY'
import json, sys
fp32, amp = (json.loads(a) for a in sys.argv[1:])
print(f"step time  fp32 {fp32['step_ms']:.1f} ms, amp {amp['step_ms']:.1f} ms: amp is {fp32['step_ms'] / amp['step_ms']:.2f}x as fast")
print(f"peak memory fp32 {fp32['peak_mib']} MiB, amp {amp['peak_mib']} MiB: amp holds {amp['peak_mib'] / max(fp32['peak_mib'], 1):.2f}x")
print(f"amp's scale {amp['amp_scale']}, skipped steps {amp['amp_skipped_steps']}")
if not (amp["loss"] == amp["loss"]) or amp["loss"] > 2 * fp32["loss"]:
    sys.exit(f"amp's loss {amp['loss']} is far from float32's {fp32['loss']}")
PY
