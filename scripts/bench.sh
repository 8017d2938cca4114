#!/usr/bin/env bash
# The side-by-side benchmarks: VTP against PyTorch eager, DataLoader,
# FastAPI + SQLAlchemy, boto3 and the Ultralytics package, interleaved in one run, 2 threads a side.
# Installs the Python peers, starts Postgres and Garage, and prints the
# table that BENCHMARKS.md records.
#
#   scripts/bench.sh [step|pipeline|epoch|detect_step|detect_epoch|callbacks|flood|s3]...   (all by default)
#   VTP_BENCH_ROUNDS=5 scripts/bench.sh step
set -euo pipefail
cd "$(dirname "$0")/.."
export VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$VTP_CACHE/target}"
eval "$(scripts/libtorch.sh)"
pip install -q --disable-pip-version-check -r benches/peers/requirements.txt
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop' EXIT
cargo bench --locked -p vtp-server --features torch --bench side_by_side -- "$@"
