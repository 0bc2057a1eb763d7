//! `API_KEY`: which requests need the key and which do not (`GET /health`, `GET /`,
//! `OPTIONS`), where the key may be given (`X-API-Key`, `Authorization: Bearer`, `?api_key=` on
//! the upgrade only), that no trick gets past it (paths, case, percent-encoding, a near key,
//! duplicated headers, other methods), and that the key never reaches the logs, even at `TRACE`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Server, DEADLINE};
use crate::http_client::{exchange, get, history_seqs, http, Response};
use crate::ws_client::{seq_field, WsClient};

/// The key of these servers: distinctive, so any trace of it in a log line is found.
const KEY: &str = "Sk-7f1c0b9e-4d2a-AUTH-bypass";

/// The name of a topic that exists, to tell a refusal from an empty answer.
const SECRET_TOPIC: &str = "secret-topic";

/// A server that needs [`KEY`].
fn server_with_key() -> Server {
    Server::start_with(&[("API_KEY", KEY)])
}

/// Every REST request but `GET /health`, as (method, path, body).
const PROTECTED_REQUESTS: [(&str, &str, &str); 4] = [
    ("POST", "/topics", r#"{"name":"orders"}"#),
    ("GET", "/topics", ""),
    ("GET", "/stats", ""),
    ("DELETE", "/topics/orders", ""),
];

#[test]
fn rest_requests_without_the_right_key_are_401() {
    let server = server_with_key();
    let wrong_keys: [&[(&str, &str)]; 4] = [
        &[],
        &[("X-API-Key", "")],
        &[("X-API-Key", "wrong")],
        &[("X-API-Key", &KEY[..KEY.len() - 1])],
    ];
    for headers in wrong_keys {
        for (method, path, body) in PROTECTED_REQUESTS {
            http(server.addr, method, path, headers, body).expect_error(401, "UNAUTHORIZED");
        }
    }
    let listed = http(server.addr, "GET", "/topics", &[("X-API-Key", KEY)], "");
    assert_eq!(
        listed.expect_json(200),
        json!({"topics": []}),
        "an unauthorized POST created a topic"
    );
}

#[test]
fn rest_requests_with_the_key_succeed() {
    let server = server_with_key();
    let expected_status = [201, 200, 200, 200];
    for ((method, path, body), status) in PROTECTED_REQUESTS.into_iter().zip(expected_status) {
        http(server.addr, method, path, &[("X-API-Key", KEY)], body).expect_json(status);
    }
    // Header names are case-insensitive (RFC 9110 5.1).
    http(server.addr, "GET", "/topics", &[("x-api-key", KEY)], "").expect_json(200);
}

#[test]
fn health_needs_no_key() {
    let server = server_with_key();
    get(server.addr, "/health").expect_json(200);
}

#[test]
fn both_messages_routes_need_the_api_key() {
    const KEY: &str = "k3y-history-secret";
    let server = Server::start_with(&[("API_KEY", KEY)]);
    let with_key = [("X-API-Key", KEY)];
    http(
        server.addr,
        "POST",
        "/topics",
        &with_key,
        r#"{"name":"orders"}"#,
    )
    .expect_json(201);
    let path = "/topics/orders/messages";
    let body = r#"{"payload":1}"#;
    for headers in [&[][..], &[("X-API-Key", "wrong")][..]] {
        http(server.addr, "POST", path, headers, body).expect_error(401, "UNAUTHORIZED");
        http(server.addr, "GET", path, headers, "").expect_error(401, "UNAUTHORIZED");
    }
    let published = http(server.addr, "POST", path, &with_key, body).expect_json(201);
    assert_eq!(seq_field(&published), 1, "an unauthorized POST published");
    let history = http(server.addr, "GET", path, &with_key, "").expect_json(200);
    assert_eq!(history_seqs(&history), [1]);
}

#[test]
fn the_bearer_scheme_is_matched_case_insensitively() {
    // RFC 9110 11.1: the authentication scheme is a case-insensitive token.
    let server = server_with_key();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let credentials = format!("{scheme} {KEY}");
        let authorization = [("Authorization", credentials.as_str())];
        http(server.addr, "GET", "/topics", &authorization, "").expect_json(200);
        let metrics = http(server.addr, "GET", "/metrics", &authorization, "");
        assert_eq!(metrics.status, 200, "{scheme}: {metrics:?}");
    }
}

#[test]
fn a_websocket_upgrade_without_the_right_key_is_refused_with_401() {
    let server = server_with_key();
    let refused: [(&str, &[(&str, &str)]); 5] = [
        ("/ws", &[]),
        ("/ws", &[("X-API-Key", "wrong")]),
        ("/ws?api_key=wrong", &[]),
        ("/ws?api_key=", &[]),
        ("/ws?other=1", &[]),
    ];
    for (path, headers) in refused {
        match WsClient::try_connect(server.addr, path, headers) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{path} {headers:?}");
            }
            Err(other) => panic!("{path} {headers:?}: expected a 401, got {other}"),
            Ok(_) => panic!("{path} {headers:?}: upgraded without the key"),
        }
    }
}

#[test]
fn a_websocket_upgrade_accepts_the_key_as_header_or_query_parameter() {
    let server = server_with_key();
    let query = format!("/ws?api_key={KEY}");
    let accepted: [(&str, &[(&str, &str)]); 2] = [("/ws", &[("X-API-Key", KEY)]), (&query, &[])];
    for (path, headers) in accepted {
        let mut client = WsClient::try_connect(server.addr, path, headers)
            .unwrap_or_else(|error| panic!("{path} {headers:?} refused: {error}"));
        client.ping();
    }
}

#[test]
fn the_key_never_appears_in_the_logs() {
    let mut server = Server::start_with(&[("API_KEY", KEY), ("LOG_LEVEL", "TRACE")]);
    for (method, path, body) in PROTECTED_REQUESTS {
        http(server.addr, method, path, &[("X-API-Key", KEY)], body);
    }
    WsClient::try_connect(server.addr, &format!("/ws?api_key={KEY}"), &[])
        .unwrap()
        .ping();
    WsClient::try_connect(server.addr, "/ws", &[("X-API-Key", KEY)])
        .unwrap()
        .ping();
    // Exiting flushes the log, so every line it will ever hold is checked.
    server.sigterm();
    server.wait_exit(DEADLINE).expect("the server did not exit");
    let lines = server.log_lines_after_exit();
    assert!(
        lines.len() > 2,
        "too few lines to prove anything: {lines:#?}"
    );
    let leaks: Vec<&String> = lines.iter().filter(|line| line.contains(KEY)).collect();
    assert!(leaks.is_empty(), "the API key was logged: {leaks:#?}");
}

/// A server that needs [`KEY`], logs at `TRACE` and holds [`SECRET_TOPIC`]: what every attempt
/// to get past the key below is tried on.
fn server() -> Server {
    let server = Server::start_with(&[("API_KEY", KEY), ("LOG_LEVEL", "TRACE")]);
    let created = http(
        server.addr,
        "POST",
        "/topics",
        &[("X-API-Key", KEY)],
        &format!(r#"{{"name":"{SECRET_TOPIC}"}}"#),
    );
    created.expect_json(201);
    server
}

/// Asserts a refusal: 401 `UNAUTHORIZED`, and nothing of the data in the body.
fn assert_unauthorized(what: &str, response: &Response) {
    assert_eq!(response.status, 401, "{what}: {response:?}");
    response.expect_error(401, "UNAUTHORIZED");
    assert!(
        !response.body.contains(SECRET_TOPIC),
        "{what}: the body shows data: {response:?}"
    );
}

/// Sends `request` as raw bytes and returns its one response.
fn raw(addr: SocketAddr, request: &str) -> Response {
    let outcome = exchange(addr, request.as_bytes(), Duration::from_secs(5));
    let mut responses = outcome.responses();
    assert_eq!(responses.len(), 1, "{request:?}: {responses:?}");
    responses.remove(0)
}

#[test]
fn path_tricks_do_not_get_past_the_key() {
    let server = server();
    let paths = [
        "/topics",
        "/health/../topics",
        "/health/%2e%2e/topics",
        "/./topics",
        "//topics",
        "/topics/",
        "/Topics",
        "/TOPICS",
        "/%74opics",
        "/topics%2f",
        "/topics?x=/health",
        "/topics#/health",
        "/topics;/health",
        "/topics%00",
        "/topics/secret-topic/messages",
        "/topics/secret-topic/messages?last_n=10",
        "/stats",
        "/stats?/health",
        "/metrics",
        "/health/",
        "/health/../stats",
        "/HEALTH",
        "/nope",
        "*",
        "http://127.0.0.1/topics",
        "http://127.0.0.1/health/../topics",
    ];
    for path in paths {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_unauthorized(&format!("GET {path}"), &raw(server.addr, &request));
    }
    // Other methods on the data routes.
    for (method, path) in [
        ("POST", "/topics"),
        ("DELETE", "/topics/secret-topic"),
        ("POST", "/topics/secret-topic/messages"),
        ("PUT", "/topics"),
        ("PATCH", "/topics/secret-topic"),
        ("HEAD", "/topics"),
        ("HEAD", "/stats"),
        ("TRACE", "/topics"),
        ("POST", "/health"),
        ("DELETE", "/health"),
    ] {
        let response = http(server.addr, method, path, &[], r#"{"name":"planted"}"#);
        assert_eq!(response.status, 401, "{method} {path}: {response:?}");
    }
    // Nothing changed: the topic is there, and nothing was planted or published.
    let stats = http(server.addr, "GET", "/stats", &[("X-API-Key", KEY)], "").expect_json(200);
    assert_eq!(
        stats,
        serde_json::json!({"topics": {SECRET_TOPIC: {"messages": 0, "subscribers": 0}}})
    );
}

#[test]
fn only_get_health_the_console_and_options_are_open() {
    let server = server();
    for path in [
        "/health",
        "/health?x",
        "/health?api_key=wrong",
        "/health?x=/topics",
    ] {
        let response = http(server.addr, "GET", path, &[], "");
        let body = response.expect_json(200);
        assert!(body["uptime_sec"].is_u64(), "GET {path}: {body}");
        assert!(!response.body.contains(SECRET_TOPIC));
    }
    let console = http(server.addr, "GET", "/", &[], "");
    assert_eq!(console.status, 200, "{console:?}");
    assert!(!console.body.contains(SECRET_TOPIC));
    // HEAD shows no body, whatever its status.
    let head = raw(
        server.addr,
        "HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.body, "", "{head:?}");
    // OPTIONS is open to all (CORS preflights carry no credentials) and shows no data.
    for path in [
        "/topics",
        "/topics/secret-topic",
        "/topics/secret-topic/messages",
        "/stats",
        "/metrics",
        "/topics/no-such-topic",
    ] {
        let response = http(server.addr, "OPTIONS", path, &[], "");
        assert_eq!(response.status, 204, "OPTIONS {path}: {response:?}");
        assert_eq!(response.body, "", "OPTIONS {path} has a body: {response:?}");
    }
    // OPTIONS with a body and a data route: still nothing executed or shown.
    let planted = http(
        server.addr,
        "OPTIONS",
        "/topics",
        &[],
        r#"{"name":"planted"}"#,
    );
    assert_eq!(planted.body, "");
    let listed = http(server.addr, "GET", "/topics", &[("X-API-Key", KEY)], "").expect_json(200);
    assert_eq!(listed["topics"].as_array().unwrap().len(), 1, "{listed}");
}

#[test]
fn the_key_counts_only_exactly_and_only_in_the_header() {
    let server = server();
    let upper = KEY.to_uppercase();
    let lower = KEY.to_lowercase();
    let with_suffix = format!("{KEY}x");
    let with_inner_space = format!("{KEY} x");
    let prefix = &KEY[..KEY.len() - 1];
    let quoted = format!("\"{KEY}\"");
    let bearer_lower = format!("bearer{KEY}");
    let bearer_no_space = format!("Bearer{KEY}");
    let basic = format!("Basic {}", base64(&format!("user:{KEY}")));
    let basic_raw = format!("Basic {KEY}");
    let token = format!("Token {KEY}");
    let bearer = format!("Bearer {KEY}");
    let cookie = format!("api_key={KEY}");
    let refused: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no key", vec![]),
        ("an empty key", vec![("X-API-Key", "")]),
        ("the key upper-cased", vec![("X-API-Key", &upper)]),
        ("the key lower-cased", vec![("X-API-Key", &lower)]),
        (
            "the key and one more character",
            vec![("X-API-Key", &with_suffix)],
        ),
        (
            "the key, a space and more",
            vec![("X-API-Key", &with_inner_space)],
        ),
        (
            "the key less its last character",
            vec![("X-API-Key", prefix)],
        ),
        ("the key in quotes", vec![("X-API-Key", &quoted)]),
        ("the key in another header", vec![("X-Api-Token", KEY)]),
        ("the key as a cookie", vec![("Cookie", &cookie)]),
        (
            "Authorization: Basic user:key",
            vec![("Authorization", &basic)],
        ),
        (
            "Authorization: Basic key",
            vec![("Authorization", &basic_raw)],
        ),
        ("Authorization: Token key", vec![("Authorization", &token)]),
        (
            "Authorization: Bearerkey",
            vec![("Authorization", &bearer_no_space)],
        ),
        (
            "Authorization: bearerkey",
            vec![("Authorization", &bearer_lower)],
        ),
        ("Authorization: the bare key", vec![("Authorization", KEY)]),
        (
            "a wrong X-API-Key before the right one",
            vec![("X-API-Key", "wrong"), ("X-API-Key", KEY)],
        ),
        (
            "a wrong X-API-Key before a right Bearer",
            vec![("X-API-Key", "wrong"), ("Authorization", &bearer)],
        ),
    ];
    for (what, headers) in &refused {
        let response = http(server.addr, "GET", "/topics", headers, "");
        assert_unauthorized(what, &response);
    }
    // The key anywhere in the URL is not a credential for REST.
    for path in [
        format!("/topics?api_key={KEY}"),
        format!("/topics?x-api-key={KEY}"),
        format!("/stats?api_key={KEY}"),
        format!("/topics/{SECRET_TOPIC}/messages?api_key={KEY}"),
    ] {
        let response = http(server.addr, "GET", &path, &[], "");
        assert_unauthorized("the key in the query", &response);
    }

    let with_trailing_space = format!("{KEY} ");
    let bearer_lower_scheme = format!("bearer {KEY}");
    let bearer_two_spaces = format!("Bearer  {KEY}");
    let accepted: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("X-API-Key", vec![("X-API-Key", KEY)]),
        ("x-api-key in lower case", vec![("x-api-key", KEY)]),
        ("Authorization: Bearer", vec![("Authorization", &bearer)]),
        // RFC 9110 11.1: the scheme is case-insensitive, and one or more spaces follow it.
        (
            "Authorization: bearer",
            vec![("Authorization", &bearer_lower_scheme)],
        ),
        (
            "Authorization: Bearer and two spaces",
            vec![("Authorization", &bearer_two_spaces)],
        ),
        // RFC 9110 5.5: white space around a field value is not part of it.
        (
            "the key with a trailing space",
            vec![("X-API-Key", &with_trailing_space)],
        ),
        (
            "the right X-API-Key twice",
            vec![("X-API-Key", KEY), ("X-API-Key", KEY)],
        ),
    ];
    for (what, headers) in &accepted {
        let response = http(server.addr, "GET", "/topics", headers, "");
        assert_eq!(response.status, 200, "{what}: {response:?}");
    }
    // The right key first and a wrong one after: the server may take the first or refuse the
    // ambiguity, but never a 5xx.
    let response = http(
        server.addr,
        "GET",
        "/topics",
        &[("X-API-Key", KEY), ("X-API-Key", "wrong")],
        "",
    );
    assert!(
        response.status == 200 || response.status == 401 || response.status == 400,
        "{response:?}"
    );
}

#[test]
fn the_websocket_upgrade_needs_the_exact_key() {
    let server = server();
    let refused_paths = [
        "/ws".to_string(),
        "/ws?api_key=".to_string(),
        "/ws?api_key=wrong".to_string(),
        format!("/ws?api_key={}", KEY.to_uppercase()),
        format!("/ws?api_key={}x", KEY),
        format!("/ws?api_key={}", &KEY[..KEY.len() - 1]),
        format!("/ws?api_key={KEY}%20"),
        format!("/ws?api_key=%22{KEY}%22"),
        format!("/ws?API_KEY={KEY}"),
        format!("/ws?xapi_key={KEY}"),
        format!("/ws?x=api_key={KEY}"),
        format!("/ws?api_key=wrong&api_key={KEY}"),
        format!("/ws?api_key[]={KEY}"),
        format!("/ws#api_key={KEY}"),
    ];
    for path in &refused_paths {
        match WsClient::try_connect(server.addr, path, &[]) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{path}");
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert!(body.contains("UNAUTHORIZED"), "{path}: {body}");
            }
            Err(other) => panic!("{path}: expected a 401, got {other}"),
            Ok(_) => panic!("{path}: upgraded without the exact key"),
        }
    }
    // Paths that only look like /ws are REST, where the query key counts for nothing.
    for path in [
        format!("/WS?api_key={KEY}"),
        format!("/ws/?api_key={KEY}"),
        format!("//ws?api_key={KEY}"),
        format!("/ws/../ws?api_key={KEY}"),
    ] {
        match WsClient::try_connect(server.addr, &path, &[]) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{path}")
            }
            Err(other) => panic!("{path}: expected a 401, got {other}"),
            Ok(_) => panic!("{path}: upgraded"),
        }
    }
    let wrong_headers: [&[(&str, &str)]; 3] = [
        &[("X-API-Key", "wrong")],
        &[("X-API-Key", "")],
        &[("Cookie", "api_key=x")],
    ];
    for headers in wrong_headers {
        assert!(
            matches!(
                WsClient::try_connect(server.addr, "/ws", headers),
                Err(tungstenite::Error::Http(ref response)) if response.status() == 401
            ),
            "{headers:?}"
        );
    }
    // The key with other parameters around it, or in the header, is accepted.
    for path in [
        format!("/ws?api_key={KEY}"),
        format!("/ws?x=1&api_key={KEY}"),
        format!("/ws?api_key={KEY}&x=1"),
        format!("/ws?api_key={KEY}&api_key=wrong"),
    ] {
        let mut client = WsClient::try_connect(server.addr, &path, &[])
            .unwrap_or_else(|error| panic!("{path}: {error}"));
        client.ping();
    }
    let mut client = WsClient::try_connect(server.addr, "/ws", &[("X-API-Key", KEY)]).unwrap();
    client.ping();
}

#[test]
fn the_key_never_reaches_the_logs_whatever_was_tried() {
    let mut server = server();
    let addr = server.addr;
    // Right and wrong keys (the wrong ones contain the key: a log of them would leak it) in
    // every place a client might put them, on routes that succeed and routes that fail.
    let near_misses = [
        KEY.to_string(),
        format!("{KEY}x"),
        format!("{KEY} "),
        format!("x{KEY}"),
    ];
    for key in &near_misses {
        for path in [
            "/topics",
            "/stats",
            "/nope",
            "/health",
            "/topics/nope/messages",
        ] {
            http(addr, "GET", path, &[("X-API-Key", key)], "");
            http(
                addr,
                "GET",
                path,
                &[("Authorization", &format!("Bearer {key}"))],
                "",
            );
            http(
                addr,
                "GET",
                &format!("{path}?api_key={}", key.replace(' ', "%20")),
                &[],
                "",
            );
        }
        http(addr, "POST", "/topics", &[("X-API-Key", key)], "{not json");
        let in_url = key.replace(' ', "%20");
        let _ = WsClient::try_connect(addr, &format!("/ws?api_key={in_url}"), &[]);
        let _ = WsClient::try_connect(addr, "/ws", &[("X-API-Key", key)]);
        // A malformed upgrade carrying the key.
        let request =
            format!("GET /ws?api_key={in_url} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n");
        exchange(addr, request.as_bytes(), Duration::from_secs(5));
        // A malformed REST request carrying the key.
        let request = format!(
            "GET /topics?api_key={in_url} HTTP/1.1\r\nX-API-Key: {key}\r\nBroken header\r\n\r\n"
        );
        exchange(addr, request.as_bytes(), Duration::from_secs(5));
    }
    let mut client = WsClient::try_connect(addr, &format!("/ws?api_key={KEY}"), &[]).unwrap();
    client.subscribe(SECRET_TOPIC, None);
    let mut publisher = WsClient::try_connect(addr, "/ws", &[("X-API-Key", KEY)]).unwrap();
    publisher.publish(SECRET_TOPIC, serde_json::json!({"note": "no key here"}));
    client.recv_event(SECRET_TOPIC);
    client.close();
    publisher.close();

    server.sigterm();
    server.wait_exit(DEADLINE).expect("the server did not exit");
    let lines = server.log_lines_after_exit();
    assert!(
        lines.iter().any(|line| line.contains(" TRACE ")),
        "no TRACE line: the test proves nothing"
    );
    let leaks: Vec<&String> = lines.iter().filter(|line| line.contains(KEY)).collect();
    assert!(
        leaks.is_empty(),
        "the key was logged ({} of {} lines): {:#?}",
        leaks.len(),
        lines.len(),
        &leaks[..leaks.len().min(5)]
    );
    eprintln!("{} log lines at TRACE, none with the key", lines.len());
}

/// Standard base64 with padding (RFC 4648 4), for a Basic credential.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let bytes = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * index) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
