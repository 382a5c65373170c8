# syntax=docker/dockerfile:1.7
# klavi-token-sidecar: release build in a Rust image, run from distroless
# as a fixed non-root user. Build: docker build -t klavi-token-sidecar .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Only what the binary is built from (.dockerignore is an allowlist).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
# Registry and target as BuildKit cache mounts: dependencies are compiled
# once and reused across builds; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin klavi-token-sidecar \
    && cp target/release/klavi-token-sidecar /klavi-token-sidecar

# distroless/cc: glibc, CA certificates for TLS to Klavi, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="klavi-token-sidecar" \
      org.opencontainers.image.description="Keeps a valid Klavi payment API token and serves it to the apps of its pod" \
      org.opencontainers.image.source="https://github.com/klavi-token-sidecar/klavi-token-sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=build /klavi-token-sidecar /usr/local/bin/klavi-token-sidecar
# The nonroot user of distroless (65532); nothing is written at run time,
# so the root filesystem can be read-only.
USER 65532:65532
# 8089: token API (loopback inside the pod); 8090: probes and /metrics.
EXPOSE 8089 8090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/klavi-token-sidecar", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/klavi-token-sidecar"]
CMD ["run"]
