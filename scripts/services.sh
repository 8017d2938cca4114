#!/usr/bin/env bash
# Starts the services the test suite needs, on loopback, installing what is
# missing: Postgres (the local cluster) and Garage (a single-node S3 store with
# one key and one bucket). Prints `export VAR=...` lines for the tests.
#
#   eval "$(scripts/services.sh start)"   # start and export VTP_TEST_*
#   scripts/services.sh stop              # stop the Garage it started
#   scripts/services.sh install           # only install Garage (a cargo build)
set -euo pipefail

VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
GARAGE_VERSION="2.5.0"
GARAGE_DIR="$VTP_CACHE/garage"
GARAGE_S3_PORT="${VTP_GARAGE_S3_PORT:-3900}"
GARAGE_RPC_PORT="${VTP_GARAGE_RPC_PORT:-3901}"
GARAGE_ADMIN_PORT="${VTP_GARAGE_ADMIN_PORT:-3903}"
# Fixed test credentials: Garage runs on loopback only, for tests.
S3_KEY_ID="GK0123456789abcdef01234567"
S3_SECRET="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
S3_BUCKET="vtp-test"

log() { echo "services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

start_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        log "installing PostgreSQL"
        as_root apt-get update -qq >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    fi
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        local version
        version="$(ls /etc/postgresql | sort -V | tail -1)"
        log "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
            || as_root pg_ctlcluster "$version" main start >&2
        for _ in $(seq 1 30); do
            pg_isready -h 127.0.0.1 -p 5432 -q && break
            sleep 0.5
        done
    fi
    pg_isready -h 127.0.0.1 -p 5432 -q || { log "PostgreSQL did not come up"; exit 1; }
    # Tests connect as `postgres` over TCP. Debian's default cluster wants a
    # password there: give the local superuser one (loopback only, tests only).
    PG_URL="${VTP_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    if ! psql "$PG_URL" -Atqc "select 1" >/dev/null 2>&1; then
        local with_password="postgres://postgres:vtp-test@127.0.0.1:5432/postgres"
        if ! psql "$with_password" -Atqc "select 1" >/dev/null 2>&1; then
            log "setting a password for the postgres role (loopback test cluster)"
            as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'vtp-test'\"" >&2 || true
        fi
        psql "$with_password" -Atqc "select 1" >/dev/null 2>&1 || {
            log "cannot connect to PostgreSQL on 127.0.0.1:5432; set VTP_TEST_DATABASE_URL"
            exit 1
        }
        PG_URL="$with_password"
    fi
    # Drop databases left behind by interrupted test runs. Not with (force):
    # one with a session open belongs to a suite running beside this one
    # (a second checkout's tests), and stays.
    psql "$PG_URL" -Atqc "select datname from pg_database where datname like 'vtp\_t\_%'" 2>/dev/null |
        while read -r db; do
            [ -n "$db" ] && psql "$PG_URL" -qc "drop database if exists $db" >/dev/null 2>&1 || true
        done
}

install_garage() {
    if command -v garage >/dev/null 2>&1 && garage --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
        return
    fi
    log "installing garage $GARAGE_VERSION with cargo (takes a while, once)"
    # Its own target directory: a build sharing the workspace's would hold
    # cargo's lock on it and stall the workspace build running beside it.
    local build_dir="$VTP_CACHE/garage-build"
    CARGO_TARGET_DIR="$build_dir" cargo install garage --version "$GARAGE_VERSION" --locked \
        --no-default-features --features bundled-libs,lmdb >&2
    rm -rf "$build_dir"
}

garage_cli() { garage -c "$GARAGE_DIR/garage.toml" "$@"; }

stop_garage() {
    if [ -f "$GARAGE_DIR/garage.pid" ]; then
        kill "$(cat "$GARAGE_DIR/garage.pid")" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$(cat "$GARAGE_DIR/garage.pid")" 2>/dev/null || break
            sleep 0.2
        done
        rm -f "$GARAGE_DIR/garage.pid"
    fi
}

start_garage() {
    install_garage
    stop_garage
    rm -rf "$GARAGE_DIR"
    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    cat >"$GARAGE_DIR/garage.toml" <<TOML
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$GARAGE_RPC_PORT"
rpc_public_addr = "127.0.0.1:$GARAGE_RPC_PORT"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$GARAGE_S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$GARAGE_ADMIN_PORT"
TOML
    chmod 600 "$GARAGE_DIR/garage.toml"
    log "starting garage on 127.0.0.1:$GARAGE_S3_PORT"
    RUST_LOG=warn nohup garage -c "$GARAGE_DIR/garage.toml" server >"$GARAGE_DIR/garage.log" 2>&1 &
    echo $! >"$GARAGE_DIR/garage.pid"
    local node=""
    for _ in $(seq 1 50); do
        node="$(garage_cli node id -q 2>/dev/null | cut -d@ -f1)" && [ -n "$node" ] && break
        sleep 0.2
    done
    [ -n "$node" ] || { log "garage did not start:"; cat "$GARAGE_DIR/garage.log" >&2; exit 1; }
    # `node id` reads a local file; wait until the daemon answers RPC too.
    local up=""
    for _ in $(seq 1 100); do
        garage_cli status >/dev/null 2>&1 && { up=1; break; }
        sleep 0.2
    done
    [ -n "$up" ] || { log "garage RPC did not come up:"; cat "$GARAGE_DIR/garage.log" >&2; exit 1; }
    garage_cli layout assign -z dc1 -c 1G "$node" >/dev/null
    garage_cli layout apply --version 1 >/dev/null
    garage_cli key import --yes -n vtp-test "$S3_KEY_ID" "$S3_SECRET" >/dev/null
    garage_cli bucket create "$S3_BUCKET" >/dev/null
    garage_cli bucket allow --read --write --owner "$S3_BUCKET" --key vtp-test >/dev/null
    # Ready when an authenticated request gets through.
    for _ in $(seq 1 50); do
        curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GARAGE_S3_PORT/" | grep -q '^[1-5]' && break
        sleep 0.2
    done
}

case "${1:-start}" in
    start)
        start_postgres
        start_garage
        cat <<ENV
export VTP_REQUIRE_SERVICES=1
export VTP_TEST_DATABASE_URL=$PG_URL
export VTP_TEST_S3_ENDPOINT=http://127.0.0.1:$GARAGE_S3_PORT
export VTP_TEST_S3_REGION=garage
export VTP_TEST_S3_BUCKET=$S3_BUCKET
export VTP_TEST_S3_ACCESS_KEY_ID=$S3_KEY_ID
export VTP_TEST_S3_SECRET_ACCESS_KEY=$S3_SECRET
ENV
        ;;
    stop) stop_garage ;;
    # Only the build, so that scripts/test.sh can run it beside its own.
    install) install_garage ;;
    *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
