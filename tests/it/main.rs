//! Black-box integration tests of `pubsub-backend`: every test launches the built binary on a
//! free port of 127.0.0.1 and talks to it over real sockets, with raw HTTP/1.1 and tungstenite,
//! as a user would. Tests run in parallel, each against its own server.
//!
//! Helpers:
//! - [`harness`]: starting, signalling and reaping the server; `wait_until`.
//! - [`http_client`]: a raw HTTP/1.1 client and the REST calls.
//! - [`ws_client`]: a WebSocket client with the protocol's requests as methods.
//!
//! Tests, in the order of `shared/SPEC.md`:
//! - [`config`]: flags, start-up line, invalid configuration refused (section 1).
//! - [`rest`]: every REST route, its successes and failures (section 2).
//! - [`protocol`]: WebSocket requests, replies, bad input and closing codes (sections 3 and 4).
//! - [`fanout`]: delivery to subscribers: exactly once, in order, isolated (section 4).
//! - [`replay`]: `last_n` and the replay-to-live hand-over (section 4).
//! - [`backpressure`]: the slow consumer cut (section 4).
//! - [`heartbeat`]: heartbeats and dead-peer reaping (section 4).
//! - [`lifecycle`]: topic deletion and graceful shutdown on signals (section 4).
//! - [`auth`]: `API_KEY` on REST and on the WebSocket upgrade (section 6).
//!
//! Then what extends it:
//! - [`resume`]: offsets (`epoch`, `seq`) and resuming with `since_seq`.
//! - [`history`]: HTTP publish and history, `/topics/{name}/messages`.
//! - [`metrics`]: `GET /metrics`, parsed, every counter moving by exactly what was done.
//! - [`browsers`]: `CORS_ORIGINS` on REST and WebSocket, the console page at `GET /`,
//!   `CONSOLE=off`, and the `healthcheck` probe.
//!
//! Attacks (every one also checks that a normal client is still served after it;
//! tests marked `#[ignore = "server bug: ..."]` reproduce a bug not fixed yet):
//! - [`adversarial_http`]: malformed request heads, random mutations, oversized lines and
//!   headers, smuggling attempts (conflicting framing), lying `Content-Length`s.
//! - [`adversarial_ws`]: malformed upgrades, frames that break RFC 6455 (close codes 1002,
//!   1007, 1009), deep nesting, huge numbers, every JSON type in every field.
//! - [`slow_clients`]: slowloris, silent and never-reading clients cut by their deadlines
//!   while a normal client's round trips stay fast.
//! - [`floods`]: `MAX_CONNECTIONS`, the open-files and thread limits: 503, logged once a
//!   second, full recovery.
//! - [`soak`]: churn of connecting, subscribing, publishing and vanishing clients; threads,
//!   descriptors, memory and `/health` back to idle (`SOAK_SECS` for a long run).
//! - [`shutdown_load`]: SIGTERM under load loses no acked message.
//! - [`auth_bypass`]: no way past `API_KEY`, and the key never logged.
//! - [`panics`]: a panic under the broker lock closes only its connection.
//!
//! Performance (speed targets live in `bench.sh`, not here):
//! - [`rest_handoff`]: the pool of reused connections to tiny_http: answers framed right
//!   (HEAD, over 32 KiB), each to the client that asked (also when a request hides in a
//!   chunked body), chunked bodies forwarded decoded, `OPTIONS *`, bare LF, non-ASCII heads.

mod harness;
mod http_client;
mod ws_client;

mod adversarial_http;
mod adversarial_ws;
mod auth;
mod auth_bypass;
mod backpressure;
mod browsers;
mod config;
mod fanout;
mod floods;
mod heartbeat;
mod history;
mod lifecycle;
mod metrics;
mod panics;
mod protocol;
mod replay;
mod rest;
mod rest_handoff;
mod resume;
mod shutdown_load;
mod slow_clients;
mod soak;
