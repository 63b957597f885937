# syntax=docker/dockerfile:1
#
# kvmesh container image: `docker build -t kvmesh .`
#
# The build stage runs the same command as CI (.ci/run): cargo build --release --locked -p
# kvmesh-node --bin kvmesh. The runtime stage is Debian slim with the binary, curl for the health
# check, and a non-root user (uid/gid 10001). See docs/operations.md#container-image.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and target/ between builds (BuildKit), so a code change
# rebuilds only kvmesh's own crates. The binary is copied out because the mount is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kvmesh-node --bin kvmesh \
    && install -D -m 0755 target/release/kvmesh /out/kvmesh

FROM debian:bookworm-slim AS runtime
# /etc/kvmesh/certs and /var/lib/kvmesh/ca are owned by kvmesh, so that an empty named volume
# mounted on them is writable by the node (Docker copies the directory's owner into a new volume).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kvmesh \
    && useradd --system --uid 10001 --gid kvmesh --home-dir /var/lib/kvmesh --shell /usr/sbin/nologin kvmesh \
    && install -d -o kvmesh -g kvmesh -m 0750 /etc/kvmesh /etc/kvmesh/certs /var/lib/kvmesh /var/lib/kvmesh/ca
COPY --from=build /out/kvmesh /usr/local/bin/kvmesh
USER 10001:10001
WORKDIR /var/lib/kvmesh
# HTTP: OpenAI API, /health, /metrics (http_addr). UDP: QUIC gossip and forwarded requests (quic_addr).
EXPOSE 8080/tcp 7946/udp
# /health answers 200 while this node can serve (a healthy engine of its own or, in a mesh, a
# peer's) and 503 otherwise. Set KVMESH_HEALTH_URL when http_addr is not port 8080. (Shell form
# on purpose, to expand that variable.)
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS -o /dev/null "${KVMESH_HEALTH_URL:-http://127.0.0.1:8080/health}" || exit 1
ENTRYPOINT ["kvmesh"]
CMD ["serve"]
