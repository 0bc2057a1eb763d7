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

mod harness;
mod http_client;
mod ws_client;

mod auth;
mod backpressure;
mod config;
mod fanout;
mod heartbeat;
mod lifecycle;
mod protocol;
mod replay;
mod rest;
