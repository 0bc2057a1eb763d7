//! tiny_http on its own, answering `GET /health` the way pubsub-backend does: the baseline
//! for what pubsub-backend's peek dispatcher and request hand-off cost per REST request.
//! Run it, then point the load tool's `rest` scenario at both:
//!
//! ```sh
//! cargo run --release --example tiny_http_alone -- 127.0.0.1:0
//! cargo run --release --example loadgen -- rest --url http://127.0.0.1:PORT --cycle-connections 0
//! ```
//!
//! It prints `listening on ADDR` on stderr, as the server does, and serves until killed.

use std::sync::Arc;
use std::thread;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let server = match tiny_http::Server::http(&addr) {
        Ok(server) => Arc::new(server),
        Err(error) => {
            eprintln!("tiny_http_alone: cannot bind {addr}: {error}");
            std::process::exit(1);
        }
    };
    match server.server_addr().to_ip() {
        Some(bound) => eprintln!("listening on {bound}"),
        None => eprintln!("listening on {addr}"),
    }
    // Two workers, as pubsub-backend runs.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let server = Arc::clone(&server);
            thread::spawn(move || {
                let json =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .expect("a constant ASCII header");
                while let Ok(request) = server.recv() {
                    let body = r#"{"uptime_sec":0,"topics":0,"subscribers":0}"#;
                    let response = tiny_http::Response::from_string(body).with_header(json.clone());
                    let _ = request.respond(response);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}
