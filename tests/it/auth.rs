//! `API_KEY`: REST and the WebSocket upgrade need the key, `GET /health` does not, and the key
//! never reaches the logs (SPEC section 6).

use serde_json::json;

use crate::harness::{Server, DEADLINE};
use crate::http_client::{get, http};
use crate::ws_client::WsClient;

/// The key the servers of these tests are started with.
const KEY: &str = "k3y-7f1c0b9e-secret";

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
