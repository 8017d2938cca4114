#!/usr/bin/env bash
# Line coverage of the Rust tests the test command runs, per crate
# (cargo-llvm-cov over `cargo test --workspace --all-features`, against the
# same Postgres and Garage, services required). Library and binary code
# only: tests, benches and examples are not counted. Prints a Markdown
# table (the README's) and leaves the per-file summary in
# $VTP_CACHE/coverage.json.
#
# Run scripts/test.sh once first: it installs what the tests need (Garage,
# the venv and the vtp package the Rust tests' user scripts import).
# Instrumented builds share nothing with plain ones, so they get their own
# target directory: the first run builds the workspace again.
set -euo pipefail
cd "$(dirname "$0")/.."

export VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
export CARGO_TARGET_DIR="${VTP_COVERAGE_TARGET:-$VTP_CACHE/target-coverage}"
export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
LLVM_COV_VERSION="0.9.1"
step() { printf '\n==> %s\n' "$*" >&2; }

if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
    step "rustup component add llvm-tools-preview"
    rustup component add llvm-tools-preview >&2
fi
if ! cargo llvm-cov --version 2>/dev/null | grep -q "$LLVM_COV_VERSION"; then
    step "installing cargo-llvm-cov $LLVM_COV_VERSION (once)"
    CARGO_TARGET_DIR="$VTP_CACHE/llvm-cov-build" cargo install cargo-llvm-cov \
        --version "$LLVM_COV_VERSION" --locked >&2
    rm -rf "$VTP_CACHE/llvm-cov-build"
fi

eval "$(scripts/libtorch.sh)"
export YOLO_OFFLINE=1 VTP_REQUIRE_SERVICES=1
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop' EXIT

step "cargo llvm-cov: the workspace's tests, instrumented"
summary="$VTP_CACHE/coverage.json"
cargo llvm-cov --workspace --all-features --locked --no-fail-fast \
    --ignore-filename-regex '(^|/)(tests|benches|examples)/' \
    --json --summary-only --output-path "$summary" >&2

python3 - "$summary" "$PWD" <<'PY'
import json, sys
from collections import defaultdict
summary, root = sys.argv[1], sys.argv[2].rstrip("/") + "/"
lines = defaultdict(lambda: [0, 0])
for file in json.load(open(summary))["data"][0]["files"]:
    path = file["filename"].removeprefix(root)
    parts = path.split("/")
    if parts[0] != "crates" or len(parts) < 3:
        continue
    counted = file["summary"]["lines"]
    lines[parts[1]][0] += counted["covered"]
    lines[parts[1]][1] += counted["count"]
print("| crate | lines | covered | line coverage |")
print("|---|---:|---:|---:|")
for crate in sorted(lines):
    covered, count = lines[crate]
    print(f"| `{crate}` | {count:,} | {covered:,} | {100 * covered / max(count, 1):.1f}% |")
covered = sum(c for c, _ in lines.values())
count = sum(n for _, n in lines.values())
print(f"| all | {count:,} | {covered:,} | {100 * covered / max(count, 1):.1f}% |")
PY
