#!/usr/bin/env bash
# Fuzzes one target with libFuzzer, on stable Rust (no cargo-fuzz, which
# needs nightly): the fuzz crate is built with the coverage instrumentation
# libFuzzer reads, and libfuzzer-sys compiles libFuzzer itself.
#
#   scripts/fuzz.sh archive 300        # fuzz `archive` for 300 s
#   scripts/fuzz.sh callback 60 -jobs=2
#
# New inputs that reach new code go to fuzz/corpus/<target>/ (keep them:
# the test command replays them); a crash is written to
# fuzz/artifacts/<target>/, and belongs, once fixed, in
# fuzz/regressions/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh <archive|yolo_labels|callback> [seconds] [libFuzzer flags]}"
seconds="${2:-60}"
shift $(( $# < 2 ? $# : 2 ))
eval "$(scripts/libtorch.sh)"
export CARGO_TARGET_DIR="${VTP_CACHE:-$HOME/.cache/vtp}/fuzz-target"
export CARGO_INCREMENTAL=0
triple="$(rustc -vV | sed -n 's/^host: //p')"
# Applied to the target only (not build scripts), since --target is given.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
(cd fuzz && cargo build --release --target "$triple" --bin "$target")
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" "fuzz/seeds/$target"
exec "$CARGO_TARGET_DIR/$triple/release/$target" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="fuzz/artifacts/$target/" "$@" \
    "fuzz/corpus/$target" "fuzz/seeds/$target"
