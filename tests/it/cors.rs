//! `CORS_ORIGINS`: preflights answered for every route without the key, `Access-Control-*`
//! headers only for allowed origins (errors included), `*` for any origin, nothing at all when
//! unset, and the `Origin` check on the WebSocket upgrade (403), alongside the key.

use std::net::SocketAddr;

use serde_json::json;

use crate::harness::Server;
use crate::http_client::{http, upgrade, Response};
use crate::ws_client::WsClient;

const APP: &str = "https://app.example.com";

const LOCAL_APP: &str = "http://localhost:3000";

const EVIL: &str = "https://evil.example.net";

/// Both allowed origins, written as an operator might: spaces, a trailing slash.
const CORS_ORIGINS: &str = " https://app.example.com/, http://localhost:3000";

const KEY: &str = "browser-k3y-5d2a";

/// The headers of a browser's CORS preflight for a JSON POST with the API key.
fn preflight_headers(origin: &str) -> [(&str, &str); 3] {
    [
        ("Origin", origin),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type,x-api-key"),
    ]
}

/// A CORS preflight of `path` from `origin`.
fn preflight(addr: SocketAddr, path: &str, origin: &str) -> Response {
    http(addr, "OPTIONS", path, &preflight_headers(origin), "")
}

/// Every `Access-Control-*` header of a response.
fn cors_headers(response: &Response) -> Vec<&(String, String)> {
    response
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("access-control-"))
        .collect()
}

/// The comma-separated items of header `name`, trimmed and lowercased.
fn header_list(response: &Response, name: &str) -> Vec<String> {
    response
        .header(name)
        .unwrap_or_default()
        .split(',')
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

/// Asserts a successful preflight of `path` (whose methods are `methods`) for `origin`.
fn assert_preflight_allows(response: &Response, origin: &str, methods: &[&str]) {
    assert_eq!(response.status, 204, "{response:?}");
    assert_eq!(response.body, "", "a 204 has no body: {response:?}");
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(origin),
        "{response:?}"
    );
    assert!(
        header_list(response, "vary").contains(&"origin".to_owned()),
        "no Vary: Origin: {response:?}"
    );
    for header in ["allow", "access-control-allow-methods"] {
        let listed = header_list(response, header);
        for method in methods.iter().chain(&["OPTIONS"]) {
            assert!(
                listed.contains(&method.to_ascii_lowercase()),
                "{header} lacks {method}: {response:?}"
            );
        }
    }
    let allowed_headers = header_list(response, "access-control-allow-headers");
    for header in ["content-type", "x-api-key"] {
        assert!(
            allowed_headers.contains(&header.to_owned()),
            "Access-Control-Allow-Headers lacks {header}: {response:?}"
        );
    }
    let max_age: u64 = response
        .header("access-control-max-age")
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Access-Control-Max-Age: {response:?}"));
    assert!(max_age > 0, "{response:?}");
}

#[test]
fn a_preflight_from_an_allowed_origin_is_answered_for_every_route() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS)]);
    let routes: [(&str, &[&str]); 5] = [
        ("/topics", &["GET", "POST"]),
        ("/topics/orders", &["DELETE"]),
        ("/topics/orders/messages", &["GET", "POST"]),
        ("/stats", &["GET"]),
        ("/metrics", &["GET"]),
    ];
    for origin in [APP, LOCAL_APP] {
        for (path, methods) in routes {
            let response = preflight(server.addr, path, origin);
            assert_preflight_allows(&response, origin, methods);
        }
    }
}

#[test]
fn a_preflight_needs_no_api_key() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS), ("API_KEY", KEY)]);
    let response = preflight(server.addr, "/topics", APP);
    assert_preflight_allows(&response, APP, &["GET", "POST"]);
    // The request the preflight announced still needs the key.
    let body = r#"{"name":"orders"}"#;
    http(server.addr, "POST", "/topics", &[("Origin", APP)], body)
        .expect_error(401, "UNAUTHORIZED");
    let created = http(
        server.addr,
        "POST",
        "/topics",
        &[("Origin", APP), ("X-API-Key", KEY)],
        body,
    );
    created.expect_json(201);
    assert_eq!(created.header("access-control-allow-origin"), Some(APP));
}

#[test]
fn a_preflight_from_another_origin_gets_no_allow_origin() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS)]);
    // Near misses of the allowed origins: scheme, port, a longer host or port, `null`.
    let others = [
        EVIL,
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com.evil.net",
        "http://localhost:30000",
        "null",
    ];
    for origin in others {
        let response = preflight(server.addr, "/topics", origin);
        assert_eq!(response.status, 204, "{response:?}");
        assert_eq!(
            response.header("access-control-allow-origin"),
            None,
            "{origin} allowed: {response:?}"
        );
    }
}

#[test]
fn responses_carry_allow_origin_only_for_allowed_origins() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS)]);
    let allowed = get_with_origin(server.addr, "/topics", Some(LOCAL_APP));
    allowed.expect_json(200);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some(LOCAL_APP)
    );
    assert!(header_list(&allowed, "vary").contains(&"origin".to_owned()));
    // Errors too: a browser page can only read an error it is allowed to see.
    let missing = http(
        server.addr,
        "DELETE",
        "/topics/none",
        &[("Origin", APP)],
        "",
    );
    missing.expect_error(404, "TOPIC_NOT_FOUND");
    assert_eq!(missing.header("access-control-allow-origin"), Some(APP));

    for origin in [Some(EVIL), None] {
        let response = get_with_origin(server.addr, "/topics", origin);
        response.expect_json(200);
        assert!(
            cors_headers(&response).is_empty(),
            "{origin:?}: {response:?}"
        );
    }
}

fn get_with_origin(addr: SocketAddr, path: &str, origin: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = origin
        .map(|origin| ("Origin", origin))
        .into_iter()
        .collect();
    http(addr, "GET", path, &headers, "")
}

#[test]
fn a_star_allows_any_origin() {
    let server = Server::start_with(&[("CORS_ORIGINS", "*")]);
    for origin in [EVIL, LOCAL_APP] {
        let response = preflight(server.addr, "/topics", origin);
        assert_eq!(response.status, 204, "{response:?}");
        let allow_origin = response.header("access-control-allow-origin");
        assert!(
            allow_origin == Some(origin) || allow_origin == Some("*"),
            "{origin}: {response:?}"
        );
        WsClient::try_connect(server.addr, "/ws", &[("Origin", origin)])
            .unwrap_or_else(|error| panic!("{origin} refused: {error}"))
            .ping();
    }
}

#[test]
fn without_cors_origins_no_cors_header_is_ever_sent() {
    let server = Server::start();
    let preflight = preflight(server.addr, "/topics", APP);
    assert!(
        cors_headers(&preflight).is_empty(),
        "CORS_ORIGINS is unset, yet the preflight answered with {:?}",
        cors_headers(&preflight)
    );
    for origin in [Some(APP), None] {
        let response = get_with_origin(server.addr, "/topics", origin);
        response.expect_json(200);
        assert!(cors_headers(&response).is_empty(), "{response:?}");
    }
    // And no Origin check on the WebSocket either.
    WsClient::try_connect(server.addr, "/ws", &[("Origin", EVIL)])
        .unwrap_or_else(|error| panic!("upgrade refused without CORS_ORIGINS: {error}"))
        .ping();
}

#[test]
fn a_websocket_upgrade_from_another_origin_is_403_forbidden() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS)]);
    for origin in [EVIL, "http://localhost:30000", "null"] {
        let refused = upgrade(server.addr, "/ws", &[("Origin", origin)]);
        refused.expect_error(403, "FORBIDDEN");
        match WsClient::try_connect(server.addr, "/ws", &[("Origin", origin)]) {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
            Err(other) => panic!("{origin}: expected a 403, got {other}"),
            Ok(_) => panic!("{origin}: upgraded from a disallowed origin"),
        }
    }
    // The refused upgrades left nothing behind: the server goes on serving.
    WsClient::connect(server.addr).ping();
}

#[test]
fn a_websocket_upgrade_from_an_allowed_origin_or_without_origin_works() {
    let server = Server::start_with(&[("CORS_ORIGINS", CORS_ORIGINS)]);
    crate::http_client::create_topic(server.addr, "orders");
    let mut from_app = WsClient::try_connect(server.addr, "/ws", &[("Origin", APP)])
        .unwrap_or_else(|error| panic!("allowed origin refused: {error}"));
    from_app.subscribe("orders", None);
    // A client without Origin (a server, a CLI) is not a browser: no Origin check.
    let mut publisher = WsClient::try_connect(server.addr, "/ws", &[])
        .unwrap_or_else(|error| panic!("upgrade without Origin refused: {error}"));
    publisher.publish("orders", json!({"from": "cli"}));
    assert_eq!(
        from_app.recv_event("orders")["payload"],
        json!({"from": "cli"})
    );
}

#[test]
fn origin_and_api_key_are_both_required_on_the_upgrade() {
    let server = Server::start_with(&[("CORS_ORIGINS", APP), ("API_KEY", KEY)]);
    let with_key = format!("/ws?api_key={KEY}");
    upgrade(server.addr, &with_key, &[("Origin", EVIL)]).expect_error(403, "FORBIDDEN");
    upgrade(server.addr, "/ws", &[("Origin", APP)]).expect_error(401, "UNAUTHORIZED");
    WsClient::try_connect(server.addr, &with_key, &[("Origin", APP)])
        .unwrap_or_else(|error| panic!("allowed origin with the key refused: {error}"))
        .ping();
}
