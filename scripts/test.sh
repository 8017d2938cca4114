#!/usr/bin/env bash
# The whole VTP test suite, on a fresh Debian machine or a warm one.
#
# Installs and starts what the tests need on loopback (Postgres, Garage; see
# scripts/services.sh), then runs formatting, lints, docs and every test with
# VTP_REQUIRE_SERVICES=1, so a test that needs a missing service fails rather
# than skips. Build output is cached outside the clone in ~/.cache/vtp.
set -euo pipefail
cd "$(dirname "$0")/.."

export VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$VTP_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A build from a fresh clone gains nothing from incremental state, which
# would only grow the cache by gigabytes.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$VTP_CACHE"

# Each step says how long the run has taken so far (cold-run budgets are in the README).
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    step "installing Rust (rustup; the toolchain is pinned in rust-toolchain.toml)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v cc >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    step "installing build tools and PostgreSQL"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config curl postgresql
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    step "installing Chromium and ChromeDriver (the dashboard's browser test)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

# The tools built from source, once: Garage (about 15 minutes on 2 cores)
# and cargo-deny. They build while the torch wheel downloads and the
# workspace builds, instead of after them; each in its own target directory.
CARGO_DENY_VERSION="0.20.2"
tools_log="$VTP_CACHE/tools-install.log"
(
    scripts/services.sh install
    if ! cargo deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
        echo "installing cargo-deny $CARGO_DENY_VERSION"
        # Without its release profile's fat LTO and single codegen unit,
        # which make the build several minutes longer on 2 cores (beside
        # the workspace's) for a check that runs for seconds.
        CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
            CARGO_TARGET_DIR="$VTP_CACHE/cargo-deny-build" cargo install cargo-deny \
            --version "$CARGO_DENY_VERSION" --locked --no-default-features
        rm -rf "$VTP_CACHE/cargo-deny-build"
    fi
) >"$tools_log" 2>&1 &
tools_install=$!
# Until the services start: an early failure does not leave the build running.
trap 'pkill -P "$tools_install" 2>/dev/null; kill "$tools_install" 2>/dev/null || true' EXIT

step "libtorch (torch wheel from PyPI, in $VTP_CACHE/venv)"
eval "$(scripts/libtorch.sh)"

step "Python test requirements (maturin, pytest, and the Ultralytics and pycocotools peers)"
python -m pip install -q --disable-pip-version-check -r crates/vtp-py/requirements-test.txt
# Ultralytics must never reach for the network (weights, fonts, telemetry).
export YOLO_OFFLINE=1

step "a moved torch is a rebuild, never a stale link (scripts/check-libtorch-relink.sh)"
scripts/check-libtorch-relink.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "the crates that do not train build without libtorch (the backend; the trainer service and its shell)"
if cargo tree --locked -p vtp-server -e normal -i torch-sys >/dev/null 2>&1; then
    echo "vtp-server depends on libtorch without the torch feature" >&2
    exit 1
fi
# The backend starts trainers through vtp-launch; the trainer is not its dependency.
# (`-i` of a workspace member that is not in the graph prints nothing and succeeds.)
if [ -n "$(cargo tree --locked -p vtp-server -e normal -i vtp-trainer 2>/dev/null)" ]; then
    echo "vtp-server depends on vtp-trainer without the torch feature" >&2
    exit 1
fi
if cargo tree --locked -p vtp-launch --features kubernetes -e normal -i torch-sys >/dev/null 2>&1; then
    echo "vtp-launch depends on libtorch" >&2
    exit 1
fi
if cargo tree --locked -p vtp-trainer --features service,s3 -e normal -i torch-sys >/dev/null 2>&1; then
    echo "vtp-trainer's service depends on libtorch without the torch feature" >&2
    exit 1
fi

step "the main job's build (scripts/demo-build.sh) has no TLS provider, Kubernetes, OpenTelemetry or Swagger UI"
. scripts/demo-build.sh
demo_tree="$(cargo tree "${demo_build_args[@]}" -e normal,build --prefix none)"
for crate in rustls aws-lc-sys ring kube opentelemetry utoipa-swagger-ui sqlx-postgres; do
    if grep -q "^$crate v" <<<"$demo_tree"; then
        echo "the main job's build compiles $crate:" >&2
        cargo tree "${demo_build_args[@]}" -e normal,build -i "$crate" >&2
        exit 1
    fi
done
echo "none of them in the main job's build"

step "the http-only client (no \`tls\`) refuses https URLs and CA bundles with a clear error"
cargo test --locked -q -p vtp-client --no-default-features --lib

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked --quiet

# Started only now: fmt, clippy and doc need no services, and meanwhile
# Garage and cargo-deny may still be building.
step "starting services (Postgres, Garage)"
if ! wait "$tools_install"; then
    cat "$tools_log" >&2
    echo "installing Garage or cargo-deny failed (log above)" >&2
    exit 1
fi
services_env="$(scripts/services.sh start)"
eval "$services_env"
trap 'scripts/services.sh stop' EXIT

step "cargo deny check: licenses, banned and duplicate crates, sources (deny.toml)"
cargo deny --all-features --locked check --hide-inclusion-graph licenses bans sources
advisory_db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691"
if [ -d "$advisory_db" ] || timeout 120 cargo deny fetch db; then
    step "cargo deny check advisories (RustSec database of $(git -C "$advisory_db" log -1 --format=%cs 2>/dev/null || echo today))"
    cargo deny --all-features --locked check --hide-inclusion-graph advisories
else
    echo "warning: the RustSec database cannot be fetched (github.com unreachable) and no copy is in $advisory_db: advisories not checked" >&2
fi

step "the vtp Python package into the venv (maturin develop): user scripts import it, in the Rust tests too"
(cd crates/vtp-py && maturin develop --locked)

step "cargo test (VTP_REQUIRE_SERVICES=$VTP_REQUIRE_SERVICES)"
cargo test --workspace --all-features --locked --no-fail-fast

step "the Rust examples run (examples/rust: training in process, the backend embedded, a custom BlobStore)"
for example in train_in_process embed_backend custom_blob_store; do
    cargo run --locked --quiet --all-features -p vtp-examples --example "$example"
done

if command -v kubectl >/dev/null 2>&1; then
    step "kubectl kustomize renders the deploy/ overlays"
    for overlay in deploy/overlays/*/; do
        kubectl kustomize "$overlay" >/dev/null
        echo "rendered $overlay"
    done
fi

step "Python bindings: pytest (real backend and in process; the dashboard in headless Chromium), mypy --strict, stubtest"
# The backend and trainer binaries the pytest suite runs, as cargo test built them.
cargo build --workspace --all-features --bins --locked
# Even built with every feature, the backend never trains: no libtorch in it.
if ldd "$CARGO_TARGET_DIR/debug/vtp-backend" | grep -E 'lib(torch|c10)'; then
    echo "vtp-backend links libtorch" >&2
    exit 1
fi
(cd crates/vtp-py && python -m pytest -q)
(cd crates/vtp-py && python -m mypy --strict python/vtp ../../examples/notebook/notebook.py)
(cd crates/vtp-py && python -m mypy.stubtest vtp._vtp)

step "schemathesis: the live backend on Postgres and Garage against its OpenAPI document"
scripts/schemathesis.sh

step "benches compile (in the dev profile, beside the tests' build; BENCHMARKS.md runs them in release)"
cargo build --locked -p vtp-server --features torch --benches

step "all tests passed"
