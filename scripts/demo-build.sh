# The main job's build (sourced by scripts/demo.sh, and checked by
# scripts/test.sh): only what the embedded defaults run. No Postgres, S3 or
# Kubernetes code, no TLS provider (it talks to loopback only), no
# OpenTelemetry and no Swagger UI. The backend is built without `torch`: it
# does not depend on the trainer, so it compiles beside libtorch's bindings
# rather than after them.
# shellcheck disable=SC2034
demo_build_args=(--locked -p vtp-server -p vtp-trainer -p vtp-cli --no-default-features
    --features vtp-trainer/service,vtp-trainer/torch,vtp-cli/torch)
