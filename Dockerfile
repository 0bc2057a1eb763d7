# pubsub-backend: a static binary in an otherwise empty image.
#
#   docker build -t pubsub-backend .
#   docker run --rm -p 8000:8000 pubsub-backend
#
# Only the classic builder's syntax is used (no BuildKit-only flags such as
# `COPY --chmod` or cache mounts), so this builds with any Docker engine.
#
# test.sh cannot pull the Rust image below on our machines, so it tests the
# FINAL stage on its own: it takes every line after the last `FROM` of this
# file, swaps the `COPY --from=build ...` line for a copy of a musl binary built
# on the host, and builds, runs, queries and stops that image. Keep exactly one
# `COPY --from=build` line in the final stage and no `RUN` there (scratch has
# no shell anyway).

# ---- build stage -----------------------------------------------------------
# Alpine's Rust image targets musl natively, and Rust's musl target links
# statically by default, so the result needs no libc at run time and can live
# in `FROM scratch`.
FROM rust:1-alpine AS build

# musl-dev provides the C runtime objects the linker wants on Alpine.
RUN apk add --no-cache musl-dev

WORKDIR /app

# Build the dependencies first against a dummy main.rs, so that editing
# main.rs only rebuilds this crate and not the whole dependency tree
# (the classic builder has no cache mounts).
COPY Cargo.toml Cargo.lock ./
RUN echo 'fn main() {}' > main.rs \
 && cargo build --release --locked \
 && rm main.rs

# The real source, and the API descriptions it serves (include_str!). COPY
# keeps the file's mtime from the build context, which can be older than the
# dummy build above; `touch` makes cargo rebuild it.
COPY main.rs ./
COPY docs/openapi.json docs/asyncapi.json ./docs/
RUN touch main.rs \
 && cargo build --release --locked \
 && ./target/release/pubsub-backend --version

# ---- final stage -----------------------------------------------------------
# Nothing but the binary: no shell, no package manager, no libc.
FROM scratch

COPY --from=build /app/target/release/pubsub-backend /pubsub-backend

# Numeric ids need no /etc/passwd; 65534 is "nobody" by convention. The
# server binds an unprivileged port, so it needs no root at all.
USER 65534:65534

# Only what differs in a container: the server's own settings table is the
# only source of defaults (`pubsub-backend --help` prints it, README.md's
# Configuration section documents it); override any setting with
# `docker run -e NAME=VALUE`. HOST must be 0.0.0.0 in a container, or the
# published port reaches nothing. PORT=8000 is the server's default too, but
# it is stated here on purpose: `EXPOSE 8000` below and docker-compose.yml's
# port mapping depend on it, and should not silently follow a new default.
ENV HOST=0.0.0.0 \
    PORT=8000

EXPOSE 8000

# The server shuts down gracefully on SIGTERM (flushes queues for at most
# SHUTDOWN_GRACE_SEC, closes WebSockets with 1001, exits 0). It installs its
# own handler, which matters because PID 1 gets no default signal handling.
STOPSIGNAL SIGTERM

# The binary is its own probe (scratch has no shell and no curl): it asks
# GET /health on 127.0.0.1:$PORT and exits 0 on a 200.
HEALTHCHECK --interval=10s --timeout=5s --start-period=3s --retries=3 \
  CMD ["/pubsub-backend", "healthcheck"]

# Exec form: there is no shell in scratch, and the server must be PID 1 itself
# so that it, not a shell, receives `docker stop`'s SIGTERM.
ENTRYPOINT ["/pubsub-backend"]
