# syntax=docker/dockerfile:1
#
# tally as a static musl binary on Alpine, run as a non-root user.
#
#   docker build -t tally .
#   docker run -p 5000:5000 -v tally-data:/var/lib/tally tally
#   docker compose up --scale tally=3          # replicas on Redis behind nginx (compose.yaml)
#
# The build is `cargo build --release --locked` with no feature flags, exactly what the
# tests build: tally has no optional Cargo features today. Nothing links to OpenSSL: the
# HTTP client's TLS (https sources) is rustls with ring, and the Redis client is built
# without TLS; the C parts (bundled SQLite, mimalloc, ring) are compiled by gcc against musl.

# The Rust release the repository is developed with (Cargo.toml's rust-version is the floor).
FROM rust:1.95-alpine3.23 AS build
SHELL ["/bin/ash", "-eo", "pipefail", "-c"]
# The image's own musl-dev; pinning its exact revision would break on every Alpine update.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# web/static/ is embedded in the binary at compile time (rust-embed).
COPY web ./web
COPY data ./data
COPY benches ./benches
COPY examples ./examples
COPY tests ./tests
# The registry and the target directory are BuildKit caches, so a rebuild after a source
# change recompiles tally alone. musl binaries are static by default (crt-static).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tally \
    && cp target/release/tally /usr/local/bin/tally \
    && if readelf -d /usr/local/bin/tally | grep -q NEEDED; then \
         echo "tally is not statically linked" >&2; exit 1; \
       fi

# Alpine rather than scratch: busybox's wget runs the health check, and a shell helps when
# debugging a replica. The binary needs nothing else from the image but the root
# certificates https sources are verified against (SSL_CERT_FILE or SSL_CERT_DIR replace
# them); like musl-dev above, the image's own revision of ca-certificates.
FROM alpine:3.23
# hadolint ignore=DL3018
RUN apk add --no-cache ca-certificates
RUN addgroup -S -g 10001 tally \
    && adduser -S -D -H -u 10001 -G tally -h /var/lib/tally -s /sbin/nologin tally \
    && mkdir -p /var/lib/tally/data \
    && chown -R tally:tally /var/lib/tally
COPY --from=build /usr/local/bin/tally /usr/local/bin/tally

# Every flag is also TALLY_<FLAG>. Inside a container the service listens on every
# interface: the only network that reaches it is the container's (compose's), and the
# published ports decide what the host exposes. Alone, the container keeps its jobs in
# SQLite on the volume; compose.yaml points the replicas at Redis instead.
ENV TALLY_BIND=0.0.0.0:5000 \
    TALLY_STORE=sqlite:/var/lib/tally/tally.db \
    TALLY_DATA_DIR=/var/lib/tally/data
# The SQLite file, the pipeline's journal and the datasets (--data-dir) live here.
VOLUME ["/var/lib/tally"]
WORKDIR /var/lib/tally
# Numeric, so that it resolves the same in the host's tools and in Kubernetes' runAsNonRoot.
USER 10001:10001
EXPOSE 5000

# /healthz answers while the process lives, even with every worker busy or the store
# unreachable (/readyz is the one that says whether to send work).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:5000/healthz"]

# SIGTERM (docker stop) drains: intake stops, running jobs finish or go back to the
# queue within --shutdown-timeout (30 s); give the container at least that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["serve"]
