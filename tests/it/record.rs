//! Recording of what the test clients exchange with the server, for the API documents' checker
//! (tests/api/check_traffic.py, run by test.sh): when `PUBSUB_API_RECORD` names a directory,
//! [`WsClient`](crate::ws_client::WsClient) appends every text frame it sends and receives, and
//! [`http_client`](crate::http_client) every HTTP exchange, as JSON lines to files there: one per
//! process and kind (`ws-PID.jsonl`, `http-PID.jsonl`), each line written whole under a lock, since
//! tests run in parallel threads. Without the variable nothing is recorded.
//!
//! A WebSocket line: `{"conn":"PID-N","dir":"sent"|"received","text":"..."}`; a frame the checker
//! cannot read as text is `{"conn":...,"dir":"sent","opaque":"binary"|"raw"}`, which tells it that
//! the connection's requests and replies can no longer be paired by their order.
//!
//! An HTTP line holds the bytes as they went, so that hostile and pipelined requests are checked
//! as the server saw them: `{"source":"...","request":"...","response":"...","closed":true}`,
//! where `request` is every byte sent on the connection and `response` every byte received
//! (`request_hex`/`response_hex` instead when they are not UTF-8). The checker splits them into
//! requests (method, target, body) and responses (status, `Content-Type`, body).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::{json, Map, Value};

/// The environment variable naming the directory to record into.
pub const RECORD_VAR: &str = "PUBSUB_API_RECORD";

/// One open file of recorded lines, appended to under its lock.
struct Sink(Mutex<Option<File>>);

/// The directory to record into, if recording is on (read once per process).
fn directory() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(std::env::var_os(RECORD_VAR)?);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("{RECORD_VAR}={}: {error}", dir.display()));
        Some(dir)
    })
    .as_ref()
}

/// Whether recording is on.
pub fn enabled() -> bool {
    directory().is_some()
}

fn sink(kind: &'static str) -> Option<&'static Sink> {
    static WS: OnceLock<Sink> = OnceLock::new();
    static HTTP: OnceLock<Sink> = OnceLock::new();
    let dir = directory()?;
    let cell = if kind == "ws" { &WS } else { &HTTP };
    Some(cell.get_or_init(|| {
        let path = dir.join(format!("{kind}-{}.jsonl", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|error| panic!("cannot record to {}: {error}", path.display()));
        Sink(Mutex::new(Some(file)))
    }))
}

/// Appends `line` to the file of `kind`; a test that panicked while holding the lock leaves
/// the file usable.
fn append(kind: &'static str, line: &Value) {
    let Some(sink) = sink(kind) else { return };
    let mut text = line.to_string();
    text.push('\n');
    let mut file = sink
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(file) = file.as_mut() {
        file.write_all(text.as_bytes())
            .unwrap_or_else(|error| panic!("recording failed: {error}"));
    }
}

/// A name for one WebSocket connection, unique across the processes of a run.
pub fn new_connection() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A text frame sent (`dir` "sent") or received ("received") on `conn`.
pub fn ws_text(conn: &str, dir: &str, text: &str) {
    if enabled() {
        append("ws", &json!({"conn": conn, "dir": dir, "text": text}));
    }
}

/// A data frame sent on `conn` that the checker cannot read as a request: a binary frame, or
/// bytes written past tungstenite.
pub fn ws_opaque(conn: &str, what: &str) {
    if enabled() {
        append("ws", &json!({"conn": conn, "dir": "sent", "opaque": what}));
    }
}

/// One HTTP exchange on one connection: every byte sent, every byte received, and whether the
/// server had closed the connection when reading stopped. `source` names the client function.
pub fn http(source: &str, request: &[u8], response: &[u8], closed: bool) {
    if !enabled() {
        return;
    }
    let mut line = Map::new();
    line.insert("source".into(), json!(source));
    put_bytes(&mut line, "request", request);
    put_bytes(&mut line, "response", response);
    line.insert("closed".into(), json!(closed));
    append("http", &Value::Object(line));
}

/// `bytes` under `name` as text, or under `name_hex` when they are not UTF-8.
fn put_bytes(line: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => line.insert(name.into(), json!(text)),
        Err(_) => {
            let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            line.insert(format!("{name}_hex"), json!(hex))
        }
    };
}
