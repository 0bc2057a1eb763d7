//! The REST routes: every success and failure of SPEC section 2.

use serde_json::json;

use crate::harness::{wait_until, Server, DEADLINE};
use crate::http_client::{
    create_topic, delete, exchange, get, health, http, http_raw, post, stats, try_http_raw,
};
use crate::ws_client::WsClient;

/// The only characters a topic name may hold (SPEC section 2).
const ALLOWED_NAME_CHARACTERS: &str =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:";

#[test]
fn creating_a_topic_returns_201_and_a_second_time_409() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_error(409, "TOPIC_EXISTS");
}

#[test]
fn create_accepts_the_body_whatever_its_content_type() {
    let server = Server::start();
    let content_types = [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
    ];
    for (index, content_type) in content_types.into_iter().enumerate() {
        let name = format!("topic-{index}");
        let body = json!({ "name": name }).to_string();
        let response = http(
            server.addr,
            "POST",
            "/topics",
            &[("Content-Type", content_type)],
            &body,
        );
        assert_eq!(
            response.expect_json(201)["topic"],
            name.as_str(),
            "{content_type}"
        );
    }
}

#[test]
fn create_rejects_bad_bodies_with_400() {
    let server = Server::start();
    let too_long = format!(r#"{{"name":"{}"}}"#, "a".repeat(129));
    let bad_bodies = [
        "",
        "   ",
        "{",
        "name=orders",
        r#"{"name":"orders""#,
        "[]",
        "null",
        r#""orders""#,
        "{}",
        r#"{"topic":"orders"}"#,
        r#"{"name":null}"#,
        r#"{"name":5}"#,
        r#"{"name":["orders"]}"#,
        r#"{"name":""}"#,
        r#"{"name":"has space"}"#,
        r#"{"name":"a/b"}"#,
        r#"{"name":"a?b"}"#,
        r#"{"name":"caf\u00e9"}"#,
        r#"{"name":"tab\there"}"#,
        &too_long,
    ];
    for body in bad_bodies {
        post(server.addr, "/topics", body).expect_error(400, "BAD_REQUEST");
    }
    let listed = get(server.addr, "/topics").expect_json(200);
    assert_eq!(
        listed,
        json!({"topics": []}),
        "a bad request created a topic"
    );
}

#[test]
fn a_name_of_128_allowed_characters_is_accepted_and_deletable() {
    let server = Server::start();
    let name: String = ALLOWED_NAME_CHARACTERS.chars().cycle().take(128).collect();
    create_topic(server.addr, &name);
    let deleted = delete(server.addr, &format!("/topics/{name}")).expect_json(200);
    assert_eq!(deleted, json!({"status": "deleted", "topic": name}));
}

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
fn topics_are_listed_sorted_by_name_with_subscriber_counts() {
    let server = Server::start();
    assert_eq!(
        get(server.addr, "/topics").expect_json(200),
        json!({"topics": []})
    );
    for name in ["orders", "alerts", "Zebra", "metrics.cpu"] {
        create_topic(server.addr, name);
    }
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    subscriber.subscribe("alerts", None);
    let mut other_subscriber = WsClient::connect(server.addr);
    other_subscriber.subscribe("orders", None);

    let listed = get(server.addr, "/topics").expect_json(200);
    let expected = json!({"topics": [
        {"name": "Zebra", "subscribers": 0},
        {"name": "alerts", "subscribers": 1},
        {"name": "metrics.cpu", "subscribers": 0},
        {"name": "orders", "subscribers": 2},
    ]});
    assert_eq!(listed, expected);
}

#[test]
fn deleting_a_topic_returns_200_then_404() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    let deleted = delete(server.addr, "/topics/orders").expect_json(200);
    assert_eq!(deleted, json!({"status": "deleted", "topic": "orders"}));
    delete(server.addr, "/topics/orders").expect_error(404, "TOPIC_NOT_FOUND");
    delete(server.addr, "/topics/never-created").expect_error(404, "TOPIC_NOT_FOUND");
    assert_eq!(
        get(server.addr, "/topics").expect_json(200),
        json!({"topics": []})
    );
}

#[test]
fn health_counts_topics_and_subscriptions_and_uptime_grows() {
    let server = Server::start();
    let initial = health(server.addr);
    assert_eq!(initial["topics"], 0, "{initial}");
    assert_eq!(initial["subscribers"], 0, "{initial}");
    assert!(
        initial["uptime_sec"].is_u64(),
        "uptime_sec not an integer: {initial}"
    );

    create_topic(server.addr, "orders");
    create_topic(server.addr, "alerts");
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    subscriber.subscribe("alerts", None);
    let mut other_subscriber = WsClient::connect(server.addr);
    other_subscriber.subscribe("orders", None);
    let busy = health(server.addr);
    assert_eq!(busy["topics"], 2, "{busy}");
    assert_eq!(busy["subscribers"], 3, "one per subscription: {busy}");

    wait_until("uptime_sec reaches 1", || {
        health(server.addr)["uptime_sec"].as_u64() >= Some(1)
    });
}

#[test]
fn stats_count_every_publish_even_beyond_the_ring() {
    let server = Server::start_with(&[("RING_SIZE", "5")]);
    create_topic(server.addr, "orders");
    create_topic(server.addr, "idle");
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    WsClient::connect(server.addr).publish_sequence("orders", 0..8);

    let expected = json!({"topics": {
        "orders": {"messages": 8, "subscribers": 1},
        "idle": {"messages": 0, "subscribers": 0},
    }});
    assert_eq!(stats(server.addr), expected);

    delete(server.addr, "/topics/idle").expect_json(200);
    assert_eq!(stats(server.addr)["topics"].get("idle"), None);
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

#[test]
fn a_malformed_request_never_gets_a_5xx_and_the_server_carries_on() {
    let server = Server::start();
    let malformed: [&[u8]; 3] = [
        b"GARBAGE\r\n\r\n",
        b"POST /topics HTTP/1.1\r\nContent-Length: nope\r\nConnection: close\r\n\r\n{}",
        b"\x00\xff\x10\r\n\r\n",
    ];
    for request in malformed {
        if let Some(response) = try_http_raw(server.addr, request) {
            assert!(
                (400..500).contains(&response.status),
                "{:?} answered {response:?}",
                String::from_utf8_lossy(request)
            );
        }
    }
    health(server.addr);
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

/// RFC 9112 3.2.2: a server accepts the absolute form of a request target, as proxies send it.
#[test]
fn an_absolute_form_request_target_is_served() {
    let server = Server::start();
    let request = format!(
        "GET http://{}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        server.addr
    );
    let health = http_raw(server.addr, request.as_bytes()).expect_json(200);
    assert!(health["uptime_sec"].is_u64(), "{health}");
}
