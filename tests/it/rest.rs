//! What every REST route shares: bodies over `MAX_MESSAGE_BYTES` (`413`, chunked too), unknown
//! routes (`404`), wrong methods (`405` with `Allow`), `HEAD` as `GET` without the body, and
//! `/ws` without an upgrade (`426`). The routes themselves have their own files: topics,
//! http_publish, history, health, metrics, console.

use crate::harness::{Server, DEADLINE};
use crate::http_client::{create_topic, exchange, get, http, http_raw, post};

#[test]
fn a_body_over_max_message_bytes_is_413_and_one_at_the_limit_is_accepted() {
    const LIMIT: usize = 1024;
    let server = Server::start_with(&[("MAX_MESSAGE_BYTES", "1024")]);
    let at_limit = format!("{:<LIMIT$}", r#"{"name":"orders"}"#);
    assert_eq!(at_limit.len(), LIMIT);
    post(server.addr, "/topics", &at_limit).expect_json(201);

    let over_limit = format!("{at_limit} ");
    post(server.addr, "/topics", &over_limit).expect_error(413, "PAYLOAD_TOO_LARGE");
    let far_over_limit = " ".repeat(100 * LIMIT);
    post(server.addr, "/topics", &far_over_limit).expect_error(413, "PAYLOAD_TOO_LARGE");
}

#[test]
fn a_chunked_body_over_max_message_bytes_is_413() {
    let server = Server::start_with(&[("MAX_MESSAGE_BYTES", "1024")]);
    let chunk = " ".repeat(1000);
    let request = format!(
        "POST /topics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\n\r\n{size:x}\r\n{chunk}\r\n{size:x}\r\n{chunk}\r\n0\r\n\r\n",
        size = chunk.len()
    );
    http_raw(server.addr, request.as_bytes()).expect_error(413, "PAYLOAD_TOO_LARGE");
}

#[test]
fn an_unknown_route_is_404() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    let unknown = [
        ("GET", "/index.html"),
        ("GET", "/nope"),
        ("GET", "/topic"),
        ("GET", "/healthz"),
        ("GET", "/topics/orders/events"),
        ("GET", "/topics/orders/messages/1"),
        ("POST", "/publish"),
        ("DELETE", "/stats/orders"),
    ];
    for (method, path) in unknown {
        http(server.addr, method, path, &[], "").expect_error(404, "NOT_FOUND");
    }
}

#[test]
fn a_wrong_method_is_405_with_an_allow_header() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    let wrong = [
        ("PUT", "/topics", "GET, HEAD, POST"),
        ("DELETE", "/topics", "GET, HEAD, POST"),
        ("PATCH", "/topics", "GET, HEAD, POST"),
        ("GET", "/topics/orders", "DELETE"),
        ("POST", "/topics/orders", "DELETE"),
        ("PUT", "/topics/orders", "DELETE"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/health", "GET, HEAD"),
        ("POST", "/stats", "GET, HEAD"),
        ("PUT", "/stats", "GET, HEAD"),
    ];
    for (method, path, allowed) in wrong {
        let response = http(server.addr, method, path, &[], "");
        response.expect_error(405, "METHOD_NOT_ALLOWED");
        let allow = response
            .header("allow")
            .unwrap_or_else(|| panic!("no Allow: {response:?}"));
        assert_eq!(
            methods(allow),
            methods(allowed),
            "{method} {path}: {response:?}"
        );
    }
    // The refused DELETE /topics must not have touched the topic.
    assert_eq!(
        get(server.addr, "/topics").expect_json(200)["topics"][0]["name"],
        "orders"
    );
}

#[test]
/// RFC 9110 15.5.22: `/ws` serves upgrades only; anything else there is answered like any
/// route: 426 naming the protocol, 204 with `Allow` to OPTIONS, 401 first without the key.
fn ws_without_an_upgrade_is_426_and_follows_the_rules_of_every_route() {
    let server = Server::start_with(&[("API_KEY", "k")]);
    let keyed = |method, headers: &[(&str, &str)]| {
        let mut all = vec![("X-API-Key", "k")];
        all.extend_from_slice(headers);
        http(server.addr, method, "/ws", &all, "")
    };
    let answer = keyed("GET", &[]);
    answer.expect_error(426, "BAD_REQUEST");
    assert_eq!(answer.header("upgrade"), Some("websocket"));
    keyed("GET", &[("Upgrade", "h2c"), ("Connection", "Upgrade")]).expect_error(426, "BAD_REQUEST");
    get(server.addr, "/ws").expect_error(401, "UNAUTHORIZED");
    let options = http(server.addr, "OPTIONS", "/ws", &[], "");
    assert_eq!(options.status, 204);
    assert_eq!(options.header("allow"), Some("GET, OPTIONS"));
}

/// The methods of an `Allow` header, sorted, so `GET, POST` equals `POST,GET`.
fn methods(allow: &str) -> Vec<String> {
    let mut methods: Vec<String> = allow
        .split(',')
        .map(|method| method.trim().to_owned())
        .collect();
    methods.sort();
    methods
}

/// RFC 9110 9.3.2: HEAD answers as GET would, without the body.
#[test]
fn head_is_get_without_the_body_on_every_get_route() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    for path in [
        "/",
        "/topics",
        "/topics/orders/messages",
        "/health",
        "/stats",
        "/metrics",
        "/topics/missing/messages",
    ] {
        let got = get(server.addr, path);
        let head = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let exchanged = exchange(server.addr, head.as_bytes(), DEADLINE);
        assert!(exchanged.closed, "HEAD {path}: not closed");
        let text = String::from_utf8_lossy(&exchanged.received).to_string();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("HEAD {path}: no head in {text:?}"));
        assert_eq!(body, "", "HEAD {path}: a body");
        let status = &head["HTTP/1.1 ".len().."HTTP/1.1 200".len()];
        assert_eq!(status, got.status.to_string(), "HEAD {path}: {head}");
        let length = head.lines().find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|n| n.trim().to_string())
        });
        // /metrics grows with the requests it counts, /health's uptime may gain a digit.
        let length: usize = length.expect("no Content-Length").parse().unwrap();
        if path != "/metrics" {
            assert!(
                length.abs_diff(got.body.len()) <= 1,
                "HEAD {path}: Content-Length {length}, GET body {}",
                got.body.len()
            );
        }
    }
}
