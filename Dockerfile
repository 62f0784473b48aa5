# electrum-lb: multi-stage build, small runtime image, non-root user.
#
#   docker build -t electrum-lb .
#   docker run -d --name electrum-lb \
#     -v /srv/electrum-lb/config:/etc/electrum-lb/config:ro \
#     -v /srv/electrum-lb/certs:/etc/electrum-lb/certs:ro \
#     -p 50001-50002:50001-50002 -p 40001-40002:40001-40002 \
#     -p 60001-60002:60001-60002 -p 30001-30002:30001-30002 \
#     -p 9105:9105 electrum-lb
#
# Paths in the config are relative to /etc/electrum-lb (the working
# directory): `certs/server.crt` is /etc/electrum-lb/certs/server.crt.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin electrum-lb || true
COPY src ./src
COPY certs ./certs
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin electrum-lb

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 electrum-lb \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /etc/electrum-lb --shell /usr/sbin/nologin electrum-lb
COPY --from=build /src/target/release/electrum-lb /usr/local/bin/electrum-lb
# The shipped configuration and development certificate, replaced by mounts
# in production.
COPY --chown=root:electrum-lb config /etc/electrum-lb/config
COPY --chown=root:electrum-lb certs /etc/electrum-lb/certs
RUN chmod 0640 /etc/electrum-lb/certs/server.key
WORKDIR /etc/electrum-lb
# glibc keeps up to 256 freed blocks per size in each thread's cache
# (default 7): a busy proxy has far more than 7 requests of one size in
# flight, and each past the seventh went through malloc's slow path. About
# 4% fewer instructions per uncached answer (README "Performance").
ENV GLIBC_TUNABLES=glibc.malloc.tcache_count=256
# Numeric, so that Kubernetes can check runAsNonRoot (deploy/kubernetes).
USER 10001:10001
# TCP and TLS listeners of the shipped coins, and the metrics port.
EXPOSE 50001 50002 40001 40002 60001 60002 30001 30002 9105
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9105/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/electrum-lb"]
CMD ["--config", "/etc/electrum-lb/config/electrum-lb.toml"]
