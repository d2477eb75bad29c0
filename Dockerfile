# syntax=docker/dockerfile:1
#
# presence-worker image: built in the official Rust image, run from distroless (glibc and libgcc,
# no shell, no package manager) as a non-root user.
#
#   docker build --build-arg GIT_SHA="$(git rev-parse --short=12 HEAD)" -t presence-worker .
#
# The builder is Debian 12 (bookworm), like the runtime, so the binary links against the same glibc.
# distroless publishes no versioned tags: pin the runtime by digest where builds must be
# reproducible (`FROM gcr.io/distroless/cc-debian12:nonroot@sha256:...`).

FROM rust:1.95.0-bookworm AS builder
WORKDIR /build
# Strip the release binary without touching Cargo.toml; set before the dependency layer so both
# builds share one profile (a different profile would rebuild every dependency).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# Dependency layer: the manifest, the lockfile and the build script, with an empty library and
# main. It is rebuilt only when one of those three files changes, not on every source change.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources (src/lua/*.lua is included at compile time, so it must be here too). COPY keeps
# the files' own times, which can be older than the dummy build's: touch the crate roots so cargo
# rebuilds the crate instead of shipping the dummy.
COPY src ./src
# Declared here, after the dependency layer, so a new commit does not invalidate it; build.rs
# reads GIT_SHA (there is no .git in the context) for presence_build_info.
ARG GIT_SHA=unknown
RUN touch src/main.rs src/lib.rs \
    && GIT_SHA="${GIT_SHA}" cargo build --release --locked --bin presence-worker \
    && cp target/release/presence-worker /presence-worker

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="presence-worker" \
      org.opencontainers.image.description="Turns a Redis Stream of join/leave/heartbeat events into exact presence state" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /presence-worker /usr/local/bin/presence-worker
# distroless's nonroot user, numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# /metrics, /healthz and /readyz (--http-addr, default 0.0.0.0:9464).
EXPOSE 9464
# Exec form: the binary is PID 1 and receives SIGTERM itself (it drains the batch in hand).
ENTRYPOINT ["/usr/local/bin/presence-worker"]
CMD ["run"]
