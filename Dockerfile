# syntax=docker/dockerfile:1.7
# Every Counterweight image from one Dockerfile: one build stage compiles all
# binaries once (static musl), and one small final stage per image picks its
# binary. Pick the image with --target; build from the repository root:
#
#   docker build --target controller    -t counterweight/controller:dev .
#   docker build --target webhook       -t counterweight/webhook:dev .
#   docker build --target gate          -t counterweight/gate:dev .
#   docker build --target cwctl         -t counterweight/cwctl:dev .
#   docker build --target sync-postgres -t counterweight/sync-postgres:dev .
#   docker build --target sync-rsync    -t counterweight/sync-rsync:dev .
#
# Building a second image reuses the build stage from BuildKit's cache, so
# the workspace compiles once for all of them. (ENTRYPOINT cannot take a
# build ARG, which is why the images are targets and not one ARG-driven
# stage.)

ARG RUST_VERSION=1.95
ARG TARGET=x86_64-unknown-linux-musl

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET
# ring compiles C code; musl-gcc is the C compiler for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${TARGET}"
ENV CC_x86_64_unknown_linux_musl=musl-gcc
WORKDIR /src
COPY . .
# release profile (thin LTO, one codegen unit) for the long-running
# processes; the `gate` profile (fat LTO, opt-level z, stripped) for the
# init container that ships in every service pod.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --target "${TARGET}" \
        -p counterweight-controller --bin counterweight-controller \
        -p counterweight-webhook --bin counterweight-webhook \
        -p counterweight-cli --bin cwctl \
        -p counterweight-sync --bin counterweight-sync \
 && cargo build --locked --profile gate --target "${TARGET}" \
        -p counterweight-gate --bin counterweight-gate \
 && mkdir /out \
 && cp "target/${TARGET}/release/counterweight-controller" \
       "target/${TARGET}/release/counterweight-webhook" \
       "target/${TARGET}/release/cwctl" \
       "target/${TARGET}/release/counterweight-sync" \
       "target/${TARGET}/gate/counterweight-gate" /out/

# distroless/static: CA certificates and a non-root user, no shell, no libc.
# USER is numeric (distroless' nonroot is 65532): the kubelet can then check
# runAsNonRoot without a runAsUser in the pod. EXPOSE lists what the
# manifests (manifests/base) serve: peers 9443 and metrics 9090; the webhook
# 8443 and metrics 9090.
#
# tools/images.sh builds the same images without Docker, from
# tools/images/images.tsv; tests/e2e/tests/images.rs checks that both say the
# same entrypoint, user, ports, stop signal and binary path.
FROM gcr.io/distroless/static-debian12:nonroot AS controller
COPY --from=build /out/counterweight-controller /usr/local/bin/counterweight-controller
USER 65532:65532
EXPOSE 9443 9090
ENTRYPOINT ["/usr/local/bin/counterweight-controller"]

FROM gcr.io/distroless/static-debian12:nonroot AS webhook
COPY --from=build /out/counterweight-webhook /usr/local/bin/counterweight-webhook
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/counterweight-webhook"]

# cwctl for Jobs and debugging (`kubectl run --rm -it --image=... -- status`).
FROM gcr.io/distroless/static-debian12:nonroot AS cwctl
COPY --from=build /out/cwctl /usr/local/bin/cwctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cwctl"]

# The init-gate on `scratch`: nothing but the binary. It reads the
# in-cluster CA from its service-account mount, so it needs no CA bundle.
# 65532 is distroless' "nonroot"; any non-zero UID works (runAsNonRoot).
FROM scratch AS gate
COPY --from=build /out/counterweight-gate /counterweight-gate
USER 65532:65532
ENTRYPOINT ["/counterweight-gate"]

# The database synchronization pod: `counterweight-sync db` supervises the
# PostgreSQL server of this image with pg_ctl, so both live in one image.
# Debian's PostgreSQL 15 (/usr/lib/postgresql/15/bin, the supervisor's
# default --pg-bin); user `postgres` is uid 999. PostgreSQL's port, 5432, is
# the supervisor's default --pg-port. STOPSIGNAL: SIGINT, as the postgres
# base image sets it (counterweight-sync stops cleanly on SIGINT and SIGTERM;
# said here so both stages and tools/images.sh agree).
FROM postgres:15-bookworm AS sync-postgres
COPY --from=build /out/counterweight-sync /usr/local/bin/counterweight-sync
USER 999:999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/counterweight-sync"]

# The file-replication pod: `counterweight-sync files` runs rsync, and the
# same image runs the receiving rsync daemon. No EXPOSE: the daemon's port
# and --listen are the deployment's choice. STOPSIGNAL: as sync-postgres.
FROM debian:bookworm-slim AS sync-rsync
RUN apt-get update \
 && apt-get install -y --no-install-recommends rsync \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/counterweight-sync /usr/local/bin/counterweight-sync
USER 65532:65532
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/counterweight-sync"]
