# weir in a container: docker-compose.yml runs the whole demo stack from this image
# (weir, its two demo upstreams and the load generator are all this one binary).
#
#   docker build --build-arg WEIR_BUILD_REVISION=$(git rev-parse --short HEAD) -t weir .
#   docker run --rm -v /path/to/dir-with-weir.toml:/etc/weir:ro -e WEIR_ADMIN_TOKEN=... \
#     -p 8080:8080 -p 9901:9901 weir
#
# The config is mounted at run time (a directory holding weir.toml at /etc/weir), never
# baked in. Its listeners must not be on 127.0.0.1 to be reachable from outside the
# container, and an admin listener off loopback needs WEIR_ADMIN_TOKEN (or token_file).

# ---- build ------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Fleet mode (`--features fleet`): the etcd client crate compiles etcd's .proto files at
# build time, with protoc and the well-known types from libprotobuf-dev. The `jemalloc`
# feature (memory of closed connections goes back to the system) builds jemalloc with
# make, which this image has.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, against stub sources, so that editing the sources rebuilds only
# weir itself: this layer is reused as long as the manifests and Cargo.lock do not
# change. (The bench target is declared in a manifest, so its file must exist too.)
COPY Cargo.toml Cargo.lock ./
COPY crates/weir/Cargo.toml crates/weir/
COPY crates/weir-testkit/Cargo.toml crates/weir-testkit/
RUN mkdir -p src crates/weir/src crates/weir/benches crates/weir-testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs crates/weir/src/lib.rs crates/weir-testkit/src/lib.rs \
    && for b in routing contention; do echo 'fn main() {}' > crates/weir/benches/$b.rs; done \
    && cargo build --release --locked --features fleet,jemalloc --bin weir \
    && rm -rf src crates/weir/src crates/weir/benches crates/weir-testkit/src

# The context has no .git: the revision `weir --version` and the admin API report comes
# in as a build argument (after the dependency layer, which it must not invalidate):
#   docker build --build-arg WEIR_BUILD_REVISION=$(git rev-parse --short HEAD) -t weir .
ARG WEIR_BUILD_REVISION=unknown
COPY src ./src
COPY crates ./crates
# COPY keeps the files' own modification times, which may be older than the stub build:
# touch the crate roots so cargo rebuilds weir from the real sources.
RUN touch src/main.rs src/lib.rs crates/weir/src/lib.rs crates/weir-testkit/src/lib.rs \
    && cargo build --release --locked --features fleet,jemalloc --bin weir \
    && install -D -m 0755 target/release/weir /out/weir

# ---- runtime ----------------------------------------------------------------------
FROM debian:bookworm-slim

# CA roots for TLS to upstreams (`tls = true` in a pool) and webhooks; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid, so volume ownership is the same on every host.
RUN groupadd --system --gid 10001 weir \
    && useradd --system --uid 10001 --gid weir --home-dir /var/lib/weir \
        --no-create-home --shell /usr/sbin/nologin weir \
    && install -d -o weir -g weir -m 0750 /var/lib/weir \
    && install -d -m 0755 /etc/weir

COPY --from=builder /out/weir /usr/local/bin/weir

USER 10001:10001
# The state dir ([state] dir = "/var/lib/weir" in config/compose/weir.toml): weights, rollout
# progress and the event journal. A named volume mounted here starts owned by weir.
WORKDIR /var/lib/weir
VOLUME ["/var/lib/weir"]

# 8080: the proxy ([proxy] listen); 9901: admin API, dashboard and /metrics ([admin] listen).
EXPOSE 8080 9901

# GET /healthz on the admin listener; needs no token. Containers of this image that are
# not the proxy (the demo upstreams, the load generator) turn it off in docker-compose.yml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["weir", "ctl", "--admin", "http://127.0.0.1:9901", "health"]

ENTRYPOINT ["weir"]
CMD ["run", "--config", "/etc/weir/weir.toml"]
