//! Browsers and probes: `CORS_ORIGINS` on REST and on the WebSocket upgrade, the
//! live console at `GET /` (`CONSOLE=off`), and `pubsub-backend healthcheck`, the Docker
//! image's probe. The console driven by a real Chromium is tests/browser/console.mjs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread;

use serde_json::json;

use crate::harness::{run_to_exit, Server};
use crate::http_client::{get, http, upgrade, Response};
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

/// Element ids the console's page has and tests/browser/console.mjs drives.
const CONSOLE_IDS: [&str; 12] = [
    "api-key",
    "topic-name",
    "create-topic",
    "topics",
    "sub-topic",
    "sub-last-n",
    "subscribe",
    "pub-topic",
    "pub-payload",
    "publish",
    "events",
    "ws-status",
];

/// Asserts `response` is the console: a self-contained HTML page.
fn assert_console(response: &Response) {
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/html"),
        "Content-Type {content_type:?}"
    );
    let page = &response.body;
    assert!(
        page.trim_start()
            .to_ascii_lowercase()
            .starts_with("<!doctype html>"),
        "not an HTML page: {}",
        &page[..page.len().min(200)]
    );
    for id in CONSOLE_IDS {
        assert!(
            page.contains(&format!("id=\"{id}\"")),
            "no #{id} in the page"
        );
    }
    // Self-contained: no external scripts, styles, fonts or images.
    for reference in ["src=", "<link", "@import", "url(", "http://", "https://"] {
        assert!(
            !page.contains(reference),
            "the console refers to something outside itself ({reference})"
        );
    }
}

#[test]
fn get_slash_serves_the_console() {
    let server = Server::start();
    assert_console(&get(server.addr, "/"));
}

#[test]
fn the_console_page_needs_no_key_but_the_api_still_does() {
    let server = Server::start_with(&[("API_KEY", KEY)]);
    assert_console(&get(server.addr, "/"));
    get(server.addr, "/topics").expect_error(401, "UNAUTHORIZED");
    // Only GET is open: the page is not a way around the key.
    http(server.addr, "POST", "/", &[], "{}").expect_error(401, "UNAUTHORIZED");
}

#[test]
fn console_off_turns_the_page_into_a_404() {
    for value in ["off", "OFF", "false", "0"] {
        let server = Server::start_with(&[("CONSOLE", value)]);
        get(server.addr, "/").expect_error(404, "NOT_FOUND");
        get(server.addr, "/health").expect_json(200);
    }
    let server = Server::start_with(&[("CONSOLE", "on")]);
    assert_console(&get(server.addr, "/"));
}

#[test]
fn an_invalid_console_or_cors_setting_stops_start_up() {
    for (variable, value) in [("CONSOLE", "maybe"), ("CORS_ORIGINS", " , ")] {
        let run = run_to_exit(&[], &[(variable, value)]);
        assert_eq!(run.code, Some(2), "{variable}={value:?}: {run:?}");
        assert!(run.stderr.contains(variable), "{run:?}");
    }
}

/// `pubsub-backend healthcheck` against port `port` of 127.0.0.1.
fn healthcheck(port: u16, overrides: &[(&str, &str)]) -> crate::harness::Finished {
    let port = port.to_string();
    let mut env = vec![("PORT", port.as_str())];
    env.extend_from_slice(overrides);
    run_to_exit(&["healthcheck"], &env)
}

#[test]
fn healthcheck_exits_0_when_the_server_answers() {
    let server = Server::start_with(&[("API_KEY", KEY)]);
    let port = server.addr.port();
    // /health needs no key, so neither does the probe; HOST=0.0.0.0 (a container's) means
    // this machine's loopback.
    for host in ["127.0.0.1", "0.0.0.0"] {
        let run = healthcheck(port, &[("HOST", host)]);
        assert_eq!(run.code, Some(0), "HOST={host}: {run:?}");
        assert_eq!(run.stderr, "", "{run:?}");
    }
    // The flag overrides the environment, as for the server.
    let flag = run_to_exit(
        &["healthcheck", "--port", &port.to_string()],
        &[("PORT", "1")],
    );
    assert_eq!(flag.code, Some(0), "{flag:?}");
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts a failed probe: non-zero exit and one line on stderr.
fn assert_unhealthy(run: &crate::harness::Finished, mentions: &str) {
    assert!(
        matches!(run.code, Some(code) if code != 0),
        "exit code {:?}: {run:?}",
        run.code
    );
    let lines: Vec<&str> = run.stderr.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one stderr line: {run:?}");
    assert!(lines[0].contains(mentions), "{run:?}");
}

#[test]
fn healthcheck_fails_with_one_line_when_nothing_listens() {
    let port = free_port();
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, &port.to_string());
}

/// Serves one connection with `answer` (after reading the request), or with silence.
fn fake_server(answer: Option<&'static str>) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // The whole request head first, however many writes it came in.
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|window| window == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        match answer {
            Some(answer) => {
                let _ = stream.write_all(answer.as_bytes());
            }
            // Hold the connection until the probe gives up and closes it.
            None => while stream.read(&mut chunk).is_ok_and(|n| n > 0) {},
        }
    });
    (port, handle)
}

#[test]
fn healthcheck_fails_when_health_is_not_200() {
    let answer =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (port, server) = fake_server(Some(answer));
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, "503");
    server.join().unwrap();
}

#[test]
fn healthcheck_gives_up_on_a_server_that_never_answers() {
    // run_to_exit allows 5 s: within Docker's --timeout=5s of the image's HEALTHCHECK.
    let (port, server) = fake_server(None);
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, &port.to_string());
    server.join().unwrap();
}
