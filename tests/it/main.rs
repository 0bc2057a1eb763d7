//! Black-box integration tests of `pubsub-backend`: every test launches the built binary on a
//! free port of 127.0.0.1 and talks to it over real sockets, with raw HTTP/1.1 and tungstenite,
//! as a user would. Tests run in parallel, each against its own server. Each file covers one
//! feature, and tests its normal use and its abuse alike; docs/protocol.md and README.md are
//! the contract they hold the server to.
//!
//! Helpers:
//! - [`harness`]: starting the server in an empty environment, signalling and reaping it;
//!   `wait_until`.
//! - [`http_client`]: a raw HTTP/1.1 client and the REST calls.
//! - [`ws_client`]: a WebSocket client with the protocol's requests as methods.
//! - [`redis`]: a `redis-server` of the test's own, for cluster mode.
//! - [`record`]: with `PUBSUB_API_RECORD=DIR`, both clients append what they exchange to DIR, for
//!   tests/api/check_traffic.py to check against docs/openapi.json and docs/asyncapi.json.
//!
//! Running the server:
//! - [`config`]: `--help` and `--version`, the settings table agreeing with README.md, the
//!   Dockerfile's and docker-compose.yml's settings, the start-up line, invalid values refused.
//! - [`health`]: `GET /health` and the `healthcheck` subcommand, the Docker image's probe.
//! - [`shutdown`]: SIGTERM and SIGINT: queued events flushed, `server_shutdown`, 1001, exit 0
//!   within the grace period; no acked message lost under load.
//! - [`metrics`]: `GET /metrics`, parsed, every counter moving by exactly what was done.
//! - [`connection_limits`]: `MAX_CONNECTIONS`, the open-files and thread limits: 503, logged
//!   once a second, full recovery.
//! - [`timeouts`]: `HANDSHAKE_TIMEOUT_SEC` and `WRITE_TIMEOUT_SEC`: slowloris, silent and
//!   never-reading clients cut at their deadline while a normal client stays fast.
//! - [`panics`]: a panic under the broker lock ends only its own connection or request
//!   (debug builds, which have the test hook).
//! - [`soak`]: churn of connecting, subscribing, publishing and vanishing clients; threads,
//!   descriptors, memory and `/health` back to idle (`SOAK_SECS` for a long run).
//!
//! HTTP and REST:
//! - [`http`]: HTTP/1.1 parsing: malformed and hostile heads, smuggling, lying lengths,
//!   pipelining, chunked framing, the absolute form.
//! - [`rest_handoff`]: the pool of reused connections to tiny_http: answers framed right
//!   (HEAD, over 32 KiB), each to the client that asked (also when a request hides in a
//!   chunked body), chunked bodies forwarded decoded, `OPTIONS *`, bare LF, non-ASCII heads.
//! - [`rest`]: rules every route shares: 404, 405 with `Allow`, 413, `HEAD`, `/ws` without an
//!   upgrade.
//! - [`topics`]: creating, listing and deleting topics, and `GET /stats`.
//! - [`http_publish`]: `POST /topics/{name}/messages`.
//! - [`history`]: `GET /topics/{name}/messages`, with `last_n` and `since_seq`.
//! - [`auth`]: `API_KEY` on every route and on the upgrade; no way past it; never logged.
//! - [`cors`]: `CORS_ORIGINS` on REST and on the WebSocket upgrade.
//! - [`console`]: the live console page at `GET /` and `CONSOLE=off`.
//!
//! WebSocket:
//! - [`websocket`]: the upgrade and RFC 6455 framing: malformed upgrades, close codes 1002,
//!   1007 and 1009, legal but unusual frames.
//! - [`protocol`]: the JSON requests and their replies, bad input of every kind, nesting and
//!   numbers.
//! - [`fanout`]: delivery to subscribers: exactly once, in order, isolated.
//! - [`replay`]: `last_n` and the replay-to-live hand-over.
//! - [`resume`]: offsets (`epoch`, `seq`) and resuming with `since_seq`.
//! - [`backpressure`]: the slow consumer cut.
//! - [`heartbeat`]: heartbeats and dead-peer reaping.
//! - [`cli`]: the binary as a client: `sub` (resuming across restarts and losses), `pub`
//!   (stopping at a bad line), the REST wrappers, the API key.
//! - [`cluster`]: `REDIS_URL`: instances sharing topics, numbering, history and resume;
//!   exactly once in order across instances; Redis lost, killed links, Redis back older.

mod harness;
mod http_client;
mod record;
mod redis;
mod ws_client;

mod auth;
mod backpressure;
mod cli;
mod cluster;
mod config;
mod connection_limits;
mod console;
mod cors;
mod fanout;
mod health;
mod heartbeat;
mod history;
mod http;
mod http_publish;
mod metrics;
// The server's panic hook exists only when it is built with debug assertions, as `cargo test`
// builds it and `cargo test --release` does not (the binary and these tests share a profile).
#[cfg(debug_assertions)]
mod panics;
mod protocol;
mod replay;
mod rest;
mod rest_handoff;
mod resume;
mod shutdown;
mod soak;
mod timeouts;
mod topics;
mod websocket;
