#!/usr/bin/env bash
# The main job, on embedded defaults (SQLite, local disk, subprocess trainer):
# installs libtorch into a venv under ~/.cache/vtp, builds, starts the
# backend, exports the UCI handwritten digits that scikit-learn ships as an
# ImageFolder, uploads them, trains a small CNN with a progress bar, and
# prints the validation accuracy and where the checkpoint is.
#
#   scripts/demo.sh [--model small_cnn] [--epochs 10]
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="small_cnn"
EPOCHS=10
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        *) echo "usage: $0 [--model NAME] [--epochs N]" >&2; exit 2 ;;
    esac
done

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
cargo build --locked --features torch -p vtp-server --bins
bin="$CARGO_TARGET_DIR/debug"

step "exporting the UCI handwritten digits (scikit-learn's copy)"
mkdir -p .vtp/demo
python examples/digits/export_digits.py .vtp/demo

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
echo "backend at $url (logs in .vtp/demo/backend.log)"

step "uploading the dataset"
dataset="$("$bin/vtp" upload .vtp/demo/digits.zip --user demo --name digits)"
echo "$dataset"

step "training $MODEL for $EPOCHS epochs"
"$bin/vtp" train --dataset "$dataset" --model "$MODEL" --epochs "$EPOCHS" \
    --config '{"image_size": 16, "batch_size": 32, "lr": 0.05, "hflip": false}'

echo
echo "wall time: $(( $(date +%s) - started ))s"
