#!/usr/bin/env bash
# Schemathesis against the live backend, on Postgres and Garage, with tokens
# on (as any backend beyond loopback runs): every operation of the OpenAPI
# document the backend serves, with generated valid and invalid requests,
# and its stateful phase, which follows the document's links (a created
# job to its read, start, cancel and metrics; an uploaded dataset to its
# deletion). It must answer no 5xx, only documented statuses, content types
# and headers, bodies matching their schemas, and 4xx to invalid data.
#
#   eval "$(scripts/services.sh start)"; scripts/schemathesis.sh
#
# Needs the backend binary built (`cargo build --workspace --all-features
# --bins`) and `st` (schemathesis, in crates/vtp-py/requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VTP_TEST_DATABASE_URL:?start the services first: eval \"\$(scripts/services.sh start)\"}"
: "${VTP_TEST_S3_ENDPOINT:?start the services first}"
bin="${CARGO_TARGET_DIR:-target}/debug"
work="$(mktemp -d)"
db="vtp_t_schemathesis_$$"
server_url="${VTP_TEST_DATABASE_URL%/*}"

psql "$VTP_TEST_DATABASE_URL" -qc "create database $db" >/dev/null
backend=""
cleanup() {
    [ -n "$backend" ] && kill "$backend" 2>/dev/null && wait "$backend" 2>/dev/null
    psql "$VTP_TEST_DATABASE_URL" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The caller's token, made the way an operator makes one; schemathesis
# sends it from its environment (scripts/schemathesis.toml), never on a
# command line.
VTP_SCHEMATHESIS_TOKEN="$(VTP_DATABASE_URL="$server_url/$db" VTP_LOG=warn \
    "$bin/vtp-backend" token create --user schemathesis)"
export VTP_SCHEMATHESIS_TOKEN

# Started jobs go to a trainer URL where nothing listens: their launches
# fail and are retried as after any outage, and no training runs beside the
# fuzzing.
VTP_LISTEN=127.0.0.1:0 \
VTP_AUTH=tokens \
VTP_LAUNCHER=http \
VTP_TRAINER_URL=http://127.0.0.1:9 \
VTP_DATABASE_URL="$server_url/$db" \
VTP_BLOB_URL="s3://$VTP_TEST_S3_BUCKET/schemathesis-$$" \
VTP_S3_ENDPOINT="$VTP_TEST_S3_ENDPOINT" \
VTP_S3_ALLOW_HTTP=1 \
VTP_S3_REGION="$VTP_TEST_S3_REGION" \
VTP_S3_ACCESS_KEY_ID="$VTP_TEST_S3_ACCESS_KEY_ID" \
VTP_S3_SECRET_ACCESS_KEY="$VTP_TEST_S3_SECRET_ACCESS_KEY" \
VTP_WORK_DIR="$work/trainer" \
VTP_LOG=warn \
    "$bin/vtp-backend" >"$work/backend.out" 2>"$work/backend.log" &
backend=$!
url=""
for _ in $(seq 1 100); do
    url="$(sed -n 's/^vtp-backend listening on //p' "$work/backend.out")"
    [ -n "$url" ] && break
    kill -0 "$backend" 2>/dev/null || { cat "$work/backend.log" >&2; exit 1; }
    sleep 0.2
done
[ -n "$url" ] || { echo "the backend did not start" >&2; cat "$work/backend.log" >&2; exit 1; }
echo "schemathesis: backend at $url (Postgres database $db, Garage bucket $VTP_TEST_S3_BUCKET)"

# One real dataset of the caller's, so that the jobs schemathesis creates
# (scripts/schemathesis.toml names it in their bodies) are made, and the
# stateful phase follows the links from a created job to its read, start,
# cancel and metrics.
python - "$work/shapes.zip" <<'PY'
import sys, zipfile, io
from PIL import Image
with zipfile.ZipFile(sys.argv[1], "w") as archive:
    for label, shade in (("dark", 40), ("light", 220)):
        for i in range(4):
            image = io.BytesIO()
            Image.new("RGB", (16, 16), (shade, shade + i, shade)).save(image, "PNG")
            archive.writestr(f"{label}/{i}.png", image.getvalue())
PY
VTP_SCHEMATHESIS_DATASET="$(curl -sf -H @<(printf 'Authorization: Bearer %s\n' "$VTP_SCHEMATHESIS_TOKEN") \
    -F "file=@$work/shapes.zip" -F dataset_name=shapes "$url/datasets/upload" |
    python -c 'import json, sys; print(json.load(sys.stdin)["s3_uri"])')"
export VTP_SCHEMATHESIS_DATASET

# Every check that holds for this API. Left out: positive_data_acceptance
# (a request valid by the schema may still be refused: a dataset that does
# not exist, a value out of its range), use_after_free (DELETE cancels a
# job, which stays readable), and the checks that need several users' tokens.
checks="not_a_server_error,status_code_conformance,content_type_conformance"
checks="$checks,response_headers_conformance,response_schema_conformance"
checks="$checks,negative_data_rejection,missing_required_header,unsupported_method"
checks="$checks,ensure_resource_availability"
# The job event stream is left out: it stays open while a job is not over
# (every job schemathesis creates stays pending), which schemathesis can
# only count as a timeout. Its refusals and its replay and reconnect are
# tested in crates/vtp-server/tests/api.rs.
status=0
st --config-file scripts/schemathesis.toml run "$url/openapi.json" \
    --checks "$checks" \
    --max-examples "${VTP_SCHEMATHESIS_EXAMPLES:-40}" \
    --seed "${VTP_SCHEMATHESIS_SEED:-1}" \
    --workers 2 \
    --request-timeout 30 \
    --exclude-path-regex '/events$' \
    --suppress-health-check too_slow,filter_too_much \
    --report junit --report-dir "$work/report" || status=$?
if [ "$status" != 0 ]; then
    echo "schemathesis failed; the backend's log:" >&2
    tail -50 "$work/backend.log" >&2
fi
exit "$status"
