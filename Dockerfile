# syntax=docker/dockerfile:1
# analytics-service container image.
#
#   docker build -t analytics-service:dev .
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" -t IMAGE:0.1.0 .
# CREATED is the commit's time, not the build's, so rebuilding a commit gives the same
# metadata (BuildKit also clamps layer timestamps to SOURCE_DATE_EPOCH).
#
# Base images are pinned by digest (tag kept for readability). To bump one, resolve the
# tag's current multi-arch index digest and replace tag and digest together, then rebuild
# and run scripts/check-deploy.sh and scripts/check-release-binary.sh:
#   docker buildx imagetools inspect docker.io/library/rust:1.95-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
# The builder and the runtime must stay on the same Debian release (glibc).
#
# Stages: chef (toolchain + cargo-chef) -> planner (dependency recipe from the manifests)
# -> builder (dependencies compiled in their own cached layer, then the sources) -> runtime
# (distroless, no shell, non-root; the default target). dev-builder -> dev is the debug image
# the Tiltfile builds. protoc comes from the protoc-bin-vendored crate, so no
# system package is installed. The release command line is the one in
# scripts/build-release.sh; scripts/check-deploy.sh checks that the two agree.

ARG CARGO_CHEF_VERSION=0.1.71

FROM docker.io/library/rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS chef
ARG CARGO_CHEF_VERSION
WORKDIR /build
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"

FROM chef AS planner
# .dockerignore admits only what the build needs: Cargo.toml, Cargo.lock, build.rs,
# proto/, migrations/, src/ and bench/ (a workspace member: cargo loads its manifest, and
# `--bin analytics-service` builds the service alone).
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --bin analytics-service --recipe-path recipe.json
COPY . .
# build.rs stamps analytics_build_info{git_commit} from GIT_COMMIT (there is no .git in the
# build context). Set after the dependency layer so a new revision does not invalidate it.
ARG REVISION=unknown
ENV GIT_COMMIT=${REVISION}
# migrations/ is compiled into the binary (refinery embeds it), so the runtime image needs
# no SQL files.
RUN cargo build --release --locked --bin analytics-service \
    && install -D -m 0755 target/release/analytics-service /out/analytics-service

# --- Development image (Tiltfile: docker_build(..., target="dev")) -----------------------
# A debug build with BuildKit cache mounts for the registry and target/, so a source change
# recompiles only this crate. Same distroless runtime as the release image: Tilt rebuilds
# and redeploys instead of live-updating, since the runtime has no shell to restart in.
FROM docker.io/library/rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS dev-builder
WORKDIR /build
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --locked --bin analytics-service \
    && install -D -m 0755 target/debug/analytics-service /out/analytics-service

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS dev
COPY --from=dev-builder --chown=0:0 /out/analytics-service /usr/local/bin/analytics-service
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/analytics-service"]
CMD ["serve"]

# --- Release image (the default target: last stage) ---------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="analytics-service" \
      org.opencontainers.image.description="Event tracking and user identification over gRPC, backed by PostgreSQL and Redis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/haunted-saas/analytics-service" \
      org.opencontainers.image.url="https://github.com/haunted-saas/analytics-service" \
      org.opencontainers.image.documentation="https://github.com/haunted-saas/analytics-service/blob/main/docs/deploy.md" \
      org.opencontainers.image.vendor="haunted-saas" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot" \
      org.opencontainers.image.base.digest="sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f"
COPY --from=builder --chown=0:0 /out/analytics-service /usr/local/bin/analytics-service
# The distroless "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532
# 50051: gRPC (TLS/mTLS when configured). 9090: plain HTTP /metrics, /livez, /readyz.
EXPOSE 50051 9090
# For Docker and Compose (Kubernetes ignores it and uses the chart's probes): the binary's
# own gRPC health check, exec form (the image has no shell). With mTLS on the gRPC port,
# override it with the --tls-* flags of `analytics-service healthcheck`.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/analytics-service", "healthcheck", "--addr", "127.0.0.1:50051", "--timeout-seconds", "5"]
ENTRYPOINT ["/usr/local/bin/analytics-service"]
CMD ["serve"]
