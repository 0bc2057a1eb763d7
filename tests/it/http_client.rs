//! A minimal HTTP/1.1 client over `TcpStream` (one request per connection, read to EOF) and
//! the REST calls the other tests build on.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::DEADLINE;
use crate::record;
use crate::ws_client::seq_field;

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(header, _)| *header == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {self:?}"))
    }

    /// Asserts `status` and a JSON content type, and returns the parsed body.
    pub fn expect_json(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "Content-Type is {content_type:?}, not application/json: {self:?}"
        );
        self.json()
    }

    /// Asserts `status` and the body every failure has (docs/protocol.md, "REST API"):
    /// `{"error":{"code":code,"message":"..."}}`.
    pub fn expect_error(&self, status: u16, code: &str) {
        let body = self.expect_json(status);
        assert_eq!(body["error"]["code"], code, "wrong error code: {self:?}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "error without a message: {self:?}");
    }
}

/// `GET path` without extra headers.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, &[], "")
}

/// `POST path` with `body` and no Content-Type.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> Response {
    http(addr, "POST", path, &[], body)
}

/// `DELETE path` without extra headers.
pub fn delete(addr: SocketAddr, path: &str) -> Response {
    http(addr, "DELETE", path, &[], "")
}

/// Sends one request with `Connection: close` and a `Content-Length`, and reads the response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    http_raw(addr, request.as_bytes())
}

/// Sends `request` as is and parses the response; panics if none came.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> Response {
    try_http_raw(addr, request).unwrap_or_else(|| {
        panic!(
            "no response to {:?}",
            String::from_utf8_lossy(&request[..request.len().min(200)])
        )
    })
}

/// Sends `request` as is and parses the response; `None` if the server closed without one.
pub fn try_http_raw(addr: SocketAddr, request: &[u8]) -> Option<Response> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    // A server may answer (413, 400) and close before reading everything: keep going and
    // read whatever response it sent.
    let _ = stream.write_all(request);
    let mut received = Vec::new();
    let mut chunk = [0; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(error) if received.is_empty() && is_timeout(&error) => {
                panic!("no response within {DEADLINE:?}")
            }
            // A reset after the response is how some servers end a refused upload.
            Err(_) => break,
        }
    }
    record::http("http", request, &received, true);
    (!received.is_empty()).then(|| parse_response(&received))
}

/// Sends a WebSocket upgrade request for `path` (which may carry a query) with extra
/// `headers`, and returns the answer: a refusal whole (the server closes after it), or only the
/// head of a `101 Switching Protocols`, after which the connection is dropped.
pub fn upgrade(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0; 8192];
    loop {
        let switched =
            find(&received, b"\r\n\r\n").is_some() && received.starts_with(b"HTTP/1.1 101 ");
        if switched {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => {
                panic!("no complete answer to the upgrade of {path} within {DEADLINE:?}")
            }
            Err(_) => break,
        }
    }
    record::http("upgrade", request.as_bytes(), &received, true);
    assert!(!received.is_empty(), "no answer to the upgrade of {path}");
    parse_response(&received)
}

/// What came back on one connection for bytes sent as they are ([`exchange`]).
#[derive(Debug)]
pub struct RawExchange {
    /// Every byte the server sent.
    pub received: Vec<u8>,
    /// Whether the server ended the connection (EOF or reset) before the timeout.
    pub closed: bool,
}

impl RawExchange {
    /// The complete responses received, in order; panics on bytes that are not one.
    pub fn responses(&self) -> Vec<Response> {
        parse_responses(&self.received)
    }

    /// The status of every response received, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.responses()
            .iter()
            .map(|response| response.status)
            .collect()
    }
}

/// Sends `request` as is on a new connection, then half-closes it (the client has nothing more
/// to say) and reads until the server ends the connection or `timeout` has passed. Write
/// errors are ignored: a server may answer and close before reading everything.
pub fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> RawExchange {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    let _ = stream.write_all(request);
    let _ = stream.shutdown(Shutdown::Write);
    let outcome = read_until_closed(&mut stream, timeout);
    record::http("exchange", request, &outcome.received, outcome.closed);
    outcome
}

/// Reads what `stream` delivers until EOF, a reset, or `timeout` from now.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> RawExchange {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut chunk = [0; 8192];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return RawExchange {
                received,
                closed: false,
            };
        }
        stream.set_read_timeout(Some(remaining)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => continue,
            Err(_) => break,
        }
    }
    RawExchange {
        received,
        closed: true,
    }
}

/// Sends `request` on an open keep-alive connection and reads exactly one response (framed by
/// `Content-Length`); `None` if the connection ends first.
pub fn round_trip(stream: &mut TcpStream, request: &[u8]) -> Option<Response> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request).ok()?;
    let mut received = Vec::new();
    let mut chunk = [0; 8192];
    loop {
        if let Some(head_end) = find(&received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |length| length.trim().parse().unwrap());
            if received.len() >= head_end + 4 + length {
                record::http("round_trip", request, &received, false);
                assert_eq!(
                    received.len(),
                    head_end + 4 + length,
                    "more than one response to one request"
                );
                return Some(parse_response(&received));
            }
        }
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => received.extend_from_slice(&chunk[..n]),
            Err(error) if is_timeout(&error) => panic!("no response within {DEADLINE:?}"),
            _ => {
                record::http("round_trip", request, &received, true);
                return None;
            }
        }
    }
}

/// Splits bytes holding zero or more complete HTTP responses (framed by `Content-Length`, as
/// every response of the server is, or chunked) and parses each.
pub fn parse_responses(mut received: &[u8]) -> Vec<Response> {
    let mut responses = Vec::new();
    while !received.is_empty() {
        let head_end = find(received, b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "bytes after {} response(s) are not a response: {:?}",
                responses.len(),
                String::from_utf8_lossy(received)
            )
        });
        let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map(|length| length.trim().parse::<usize>().unwrap());
        let end = match length {
            Some(length) => (head_end + 4 + length).min(received.len()),
            None => received.len(),
        };
        responses.push(parse_response(&received[..end]));
        received = &received[end..];
    }
    responses
}

/// `POST /topics` for `name`, asserting it was created.
pub fn create_topic(addr: SocketAddr, name: &str) {
    let body = json!({ "name": name }).to_string();
    let created = post(addr, "/topics", &body).expect_json(201);
    assert_eq!(created, json!({"status": "created", "topic": name}));
}

/// The body of `GET /stats`.
pub fn stats(addr: SocketAddr) -> Value {
    get(addr, "/stats").expect_json(200)
}

/// The body of `GET /health`.
pub fn health(addr: SocketAddr) -> Value {
    get(addr, "/health").expect_json(200)
}

/// The `subscribers` count `/stats` gives for `topic`, which must exist.
pub fn subscriber_count(addr: SocketAddr, topic: &str) -> u64 {
    let stats = stats(addr);
    stats["topics"][topic]["subscribers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no subscriber count for {topic:?} in {stats}"))
}

/// `POST /topics/{topic}/messages` with `body`.
pub fn post_message(addr: SocketAddr, topic: &str, body: &str) -> Response {
    post(addr, &format!("/topics/{topic}/messages"), body)
}

/// Publishes `payload` (JSON text) over HTTP under a fresh id; checks the whole 201 reply and
/// returns the `seq` it gave.
pub fn publish_over_http(addr: SocketAddr, topic: &str, payload: &str) -> u64 {
    let id = Uuid::new_v4().to_string();
    let body = format!(r#"{{"id":"{id}","payload":{payload}}}"#);
    let reply = post_message(addr, topic, &body).expect_json(201);
    let seq = seq_field(&reply);
    let expected = json!({"status": "published", "topic": topic, "id": id, "seq": seq});
    assert_eq!(reply, expected);
    seq
}

/// `GET /topics/{topic}/messages{query}`, checked to be a 200.
pub fn history(addr: SocketAddr, topic: &str, query: &str) -> Value {
    get(addr, &format!("/topics/{topic}/messages{query}")).expect_json(200)
}

/// The `seq`s of a history reply's messages.
pub fn history_seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no `messages` array: {history}"))
        .iter()
        .map(seq_field)
        .collect()
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn parse_response(received: &[u8]) -> Response {
    let text = String::from_utf8_lossy(received);
    let head_end = find(received, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("response without an end of head: {text:?}"));
    let head = String::from_utf8_lossy(&received[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: String::new(),
    };
    let raw_body = &received[head_end + 4..];
    let body = if response
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        decode_chunked(raw_body)
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length.parse().unwrap();
        raw_body[..length.min(raw_body.len())].to_vec()
    } else {
        raw_body.to_vec()
    };
    response.body = String::from_utf8(body).expect("response body is not UTF-8");
    response
}

/// RFC 9112 7.1: size line in hex, chunk, CRLF; a zero size ends the body.
fn decode_chunked(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").expect("truncated chunked body");
        let size_line = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size_hex = size_line.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size_hex, 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
