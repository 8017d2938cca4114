#!/usr/bin/env bash
# The main job, on embedded defaults (SQLite, local disk, subprocess trainer):
# installs libtorch into a venv under ~/.cache/vtp, builds, starts the
# backend, exports the UCI handwritten digits that scikit-learn ships as an
# ImageFolder, uploads them, trains a small CNN with a progress bar, and
# prints the validation accuracy and where the checkpoint is.
#
# With --task detect it trains the seed's own job instead: `yolo11n` with
# framework `ultralytics`, on a YOLO dataset made of the same digits pasted
# onto canvases with tight boxes; it ends with mAP50-95 and draws the
# predictions on validation images into .vtp/demo/detect-predictions.png.
#
# While it trains, the backend's dashboard shows the job's curves growing
# (the URL is printed); with --serve the backend keeps running afterwards,
# until Ctrl-C, to browse the finished job.
#
#   scripts/demo.sh [--task classify|detect] [--model NAME] [--epochs N] [--serve]
set -euo pipefail
cd "$(dirname "$0")/.."

TASK="classify"
MODEL=""
EPOCHS=""
SERVE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --task) TASK="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        --serve) SERVE=1; shift ;;
        *) echo "usage: $0 [--task classify|detect] [--model NAME] [--epochs N] [--serve]" >&2; exit 2 ;;
    esac
done
case "$TASK" in
    classify) MODEL="${MODEL:-small_cnn}"; EPOCHS="${EPOCHS:-10}" ;;
    detect) MODEL="${MODEL:-yolo11n}"; EPOCHS="${EPOCHS:-30}" ;;
    *) echo "--task is classify or detect, not $TASK" >&2; exit 2 ;;
esac

export VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$VTP_CACHE/target}"
step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
    step "installing Rust"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

step "libtorch (torch wheel from PyPI, in $VTP_CACHE/venv)"
eval "$(scripts/libtorch.sh)"
python -c "import sklearn" 2>/dev/null || pip install -q --disable-pip-version-check scikit-learn

step "building vtp-backend, vtp-trainer-service and vtp"
# shellcheck source=scripts/demo-build.sh
. scripts/demo-build.sh
cargo build "${demo_build_args[@]}" --bins
bin="$CARGO_TARGET_DIR/debug"

mkdir -p .vtp/demo
if [ "$TASK" = classify ]; then
    step "exporting the UCI handwritten digits (scikit-learn's copy)"
    python examples/digits/export_digits.py .vtp/demo
    archive=.vtp/demo/digits.zip
else
    step "making a YOLO dataset: the UCI digits pasted onto canvases, with tight boxes"
    python examples/detect/make_digits_yolo.py .vtp/demo --train 800 --val 200 --size 96
    archive=.vtp/demo/digits-yolo.zip
fi

step "starting the backend on embedded defaults (./.vtp)"
"$bin/vtp-backend" >.vtp/demo/backend.out 2>.vtp/demo/backend.log &
backend=$!
trap 'kill $backend 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q "listening on" .vtp/demo/backend.out 2>/dev/null && break
    kill -0 $backend 2>/dev/null || { cat .vtp/demo/backend.log >&2; exit 1; }
    sleep 0.2
done
url="$(sed -n 's/^vtp-backend listening on //p' .vtp/demo/backend.out)"
export VTP_URL="$url"
echo "backend at $url (logs in .vtp/demo/backend.log); watch the job live at $url/"

step "uploading the dataset"
dataset="$("$bin/vtp" upload "$archive" --user demo --name "digits-$TASK")"
echo "$dataset"

if [ "$TASK" = classify ]; then
    step "training $MODEL for $EPOCHS epochs"
    "$bin/vtp" train --dataset "$dataset" --model "$MODEL" --epochs "$EPOCHS" \
        --config '{"image_size": 16, "batch_size": 32, "lr": 0.05, "hflip": false}'
else
    step "training $MODEL (framework ultralytics, the seed's job) for $EPOCHS epochs"
    # Digits must not be mirrored; 96 px canvases; gradients stepped every
    # batch (nbs = batch) so a small dataset gets enough optimizer steps.
    out="$("$bin/vtp" train --dataset "$dataset" --model "$MODEL" --framework ultralytics \
        --epochs "$EPOCHS" \
        --config '{"image_size": 96, "batch_size": 16, "nbs": 16, "fliplr": 0.0, "close_mosaic": 5}' \
        | tee /dev/stderr)"
    job="$(printf '%s\n' "$out" | sed -n 's/^job \([0-9a-f-]*\)$/\1/p' | head -1)"
    step "downloading the checkpoint and drawing predictions on validation images"
    "$bin/vtp" download "$job" -o .vtp/demo/model
    mapfile -t images < <(find .vtp/demo/digits-yolo/images/val -name '*.png' | sort | head -8)
    "$bin/vtp" predict .vtp/demo/model/best.safetensors "${images[@]}" \
        --draw .vtp/demo/detect-predictions.png | tail -1
fi

echo
echo "wall time: $(( $(date +%s) - started ))s"
if [ -n "$SERVE" ]; then
    echo "dashboard at $url/ (Ctrl-C stops the backend)"
    wait "$backend"
fi
