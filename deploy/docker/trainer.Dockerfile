# The VTP trainer (vtp-trainer-service, run by Kubernetes Jobs as
# `vtp-trainer-service run-job`): the Rust binary plus libtorch from the
# torch wheel, non-root.
#   docker build -f deploy/docker/trainer.Dockerfile -t vtp-trainer:dev .
# CUDA variant (the CUDA wheel carries the CUDA runtime libraries; the node
# needs the NVIDIA driver and device plugin):
#   docker build -f deploy/docker/trainer.Dockerfile -t vtp-trainer:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rust:1.95-bookworm AS build
ARG TORCH_INDEX
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
    && /opt/torch/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
ENV PATH=/opt/torch/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vtp-trainer --features service,torch,s3 --bin vtp-trainer-service \
    && cp target/release/vtp-trainer-service /vtp-trainer-service
# What the binary loads at run time: libtorch and, for CUDA wheels, the
# nvidia-* libraries beside it.
RUN site=/opt/torch/lib/python3.11/site-packages \
    && mkdir -p /opt/keep/torch \
    && cp -a "$site/torch/lib" /opt/keep/torch/ \
    && if [ -d "$site/nvidia" ]; then cp -a "$site/nvidia" /opt/keep/; fi

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vtp
# At the same path as at build time, so the binary's rpath finds them.
COPY --from=build /opt/keep /opt/torch/lib/python3.11/site-packages
COPY --from=build /vtp-trainer-service /usr/local/bin/vtp-trainer-service
USER 10001:10001
WORKDIR /home/vtp
# Loopback unless configured: as a service reached over the network, set
# VTP_TRAINER_LISTEN=0.0.0.0:8001 and VTP_TRAINER_TOKEN (from a Secret); the
# service refuses to listen beyond loopback without a token. Kubernetes Jobs
# run `run-job`, which listens nowhere.
ENV VTP_WORK_DIR=/home/vtp/work
EXPOSE 8001
ENTRYPOINT ["/usr/local/bin/vtp-trainer-service"]
