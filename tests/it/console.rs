//! The live console at `GET /`: a self-contained HTML page with the elements the browser test
//! drives (tests/browser/console.mjs runs it in a real Chromium), open without the key, and a
//! 404 with `CONSOLE=off`.

use crate::harness::Server;
use crate::http_client::{get, http, Response};

/// The key of the server that checks the page is open while the API is not.
const KEY: &str = "browser-k3y-5d2a";

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
