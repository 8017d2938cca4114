# The VTP backend (vtp-backend): no libtorch, a small Debian runtime, non-root.
#   docker build -f deploy/docker/backend.Dockerfile -t vtp-backend:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vtp-server --bin vtp-backend \
    && cp target/release/vtp-backend /vtp-backend

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vtp
COPY --from=build /vtp-backend /usr/local/bin/vtp-backend
USER 10001:10001
ENV VTP_LISTEN=0.0.0.0:8000
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/vtp-backend"]
