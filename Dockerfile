# syntax=docker/dockerfile:1
# Images for the three binaries, one build stage and one final target each:
#   docker build --target cloudmap-xds -t cloudmap-xds .   (also the default target)
#   docker build --target demo-server  -t demo-server .
#   docker build --target demo-client  -t demo-client .   (contains cloudmap-xds too, for `bootstrap`)
# Every target runs as an unprivileged user (uid 10001). deploy/README.md has the ECR push commands.

# Where the images take the binaries from: `build` (below, the default) compiles them here;
# `prebuilt` copies ones built outside into target/image-bin/ (CI: scripts/test-images.sh).
ARG BINARIES=build

# ---- build: all three release binaries in one cargo run (protoc comes from a crate, none needed) ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and target/ between builds; binaries are copied out
# of the mounted target/ in the same step because the mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cloudmap-xds -p demo-server -p demo-client \
 && mkdir -p /out \
 && cp target/release/cloudmap-xds target/release/demo-server target/release/demo-client /out/

# ---- prebuilt: binaries built before the image (only used with --build-arg BINARIES=prebuilt) ----
FROM scratch AS prebuilt
COPY target/image-bin/ /out/

# ---- the binaries the images copy ----
# hadolint ignore=DL3006
FROM ${BINARIES} AS binaries

# ---- runtime base: CA certificates (AWS APIs over TLS) and the unprivileged user ----
FROM debian:bookworm-slim AS runtime
# Package versions follow the base image's Debian release (DL3008 ignored: exact pins break at
# every Debian point release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app

# ---- demo-server: gRPC on 50051. The health check is a TCP connect (bash's /dev/tcp): no gRPC
# health probe is packaged in Debian, and demo-server reports SERVING as soon as it listens. ----
FROM runtime AS demo-server
COPY --from=binaries /out/demo-server /usr/local/bin/demo-server
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "</dev/tcp/127.0.0.1/50051"]
ENTRYPOINT ["/usr/local/bin/demo-server"]

# ---- demo-client: HTTP on 8080 (/describe, /healthz). The entrypoint writes the gRPC xDS
# bootstrap with `cloudmap-xds bootstrap` (zone from ECS task metadata), then starts
# `demo-client serve`. No curl in this image: the health check is a TCP connect to 8080
# (the NLB in deploy/ checks GET /healthz itself). ----
FROM runtime AS demo-client
COPY --from=binaries /out/demo-client /out/cloudmap-xds /usr/local/bin/
COPY --chmod=0755 deploy/docker/demo-client-entrypoint.sh /usr/local/bin/demo-client-entrypoint
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "</dev/tcp/127.0.0.1/8080"]
ENTRYPOINT ["/usr/local/bin/demo-client-entrypoint"]

# ---- cloudmap-xds: ADS on 18000; admin (/healthz) on 127.0.0.1:9901, inside the container only.
# curl is installed for the health check: a few MB, and `curl -fsS` checks the HTTP status. ----
FROM runtime AS cloudmap-xds
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binaries /out/cloudmap-xds /usr/local/bin/cloudmap-xds
USER 10001:10001
EXPOSE 18000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:9901/healthz"]
ENTRYPOINT ["/usr/local/bin/cloudmap-xds"]
