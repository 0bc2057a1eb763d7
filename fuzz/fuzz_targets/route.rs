//! Fuzzes `decide_route`, the dispatcher's decision on the bytes peeked so far from a new
//! connection: WebSocket, REST, closed, request line too long, or wait for more.
//!
//! Each input is the peeked bytes. Every input is tried with several capacities (the size of the
//! peek buffer): the server's own (`MAX_REQUEST_LINE`, read from main.rs), exactly the input's
//! length (a full buffer), one more, half of it, and the degenerate 0 and `usize::MAX`. Besides
//! "never panics", it checks:
//! - empty input → `Closed`;
//! - a `\n` in the input → `WebSocket` or `Rest`, decided by the request line alone: the same
//!   route for the input cut just after its first `\n`, whatever follows, and whatever the
//!   capacity; `WebSocket` exactly when the request target's path before `?` is `/ws`, the
//!   target taken in origin form (`/ws?…`) or in absolute form (`http://host/ws?…`, scheme http
//!   or https in any case, as RFC 9112 3.2.2 asks a server to accept);
//! - no `\n` and at least `capacity` bytes → `TooLong`; no `\n` and fewer → `None` (wait).
//!
//! `decide_route`, `Route` and `MAX_REQUEST_LINE` are used directly from main.rs's `dispatch`
//! module (`pub(crate)` there); the expected route is worked out here without its parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../main.rs"]
#[allow(dead_code, unused_imports, unused_macros, clippy::all)]
mod server;

use server::dispatch::{decide_route, Route, MAX_REQUEST_LINE};

/// The route a complete request line should get, written independently of main.rs: the target
/// is the second space-separated field of `METHOD SP TARGET SP VERSION`; in absolute form its
/// path starts at the first `/` after `scheme://authority` (none: `/`); the path ends at `?`.
fn expected_route(line: &[u8]) -> Route {
    let target = match line.iter().position(|&b| b == b' ') {
        Some(first_space) => {
            let rest = &line[first_space + 1..];
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            &rest[..end]
        }
        None => &[][..],
    };
    let target = origin_form(target);
    let path_end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    if &target[..path_end] == b"/ws" {
        Route::WebSocket
    } else {
        Route::Rest
    }
}

/// The target without an absolute form's `http://authority` or `https://authority` (scheme in
/// any case). A target that is not UTF-8 is no URI in either form, and stays as it is.
fn origin_form(target: &[u8]) -> &[u8] {
    if std::str::from_utf8(target).is_err() {
        return target;
    }
    let lower = target.to_ascii_lowercase();
    let after_scheme = if lower.starts_with(b"http://") {
        7
    } else if lower.starts_with(b"https://") {
        8
    } else {
        return target;
    };
    let rest = &target[after_scheme..];
    match rest.iter().position(|&b| b == b'/' || b == b'?') {
        Some(start) if rest[start] == b'/' => &rest[start..],
        _ => b"/",
    }
}

fn check(data: &[u8], capacity: usize) {
    let route = decide_route(data, capacity);
    if data.is_empty() {
        assert_eq!(
            route,
            Some(Route::Closed),
            "empty input, capacity {capacity}"
        );
        return;
    }
    match data.iter().position(|&b| b == b'\n') {
        Some(newline) => {
            let line = &data[..newline];
            let expected = expected_route(line);
            assert_eq!(
                route.as_ref(),
                Some(&expected),
                "line {:?}, capacity {capacity}",
                String::from_utf8_lossy(line)
            );
            // The decision is final once the line is complete: more bytes never change it.
            assert_eq!(
                decide_route(&data[..=newline], capacity).as_ref(),
                Some(&expected),
                "prefix up to the newline, capacity {capacity}"
            );
            // A request line that starts `GET /ws` then ends, or goes on with ' ' or '?', is a
            // WebSocket upgrade (a check that needs no model of the parser).
            if let Some(rest) = line.strip_prefix(b"GET /ws") {
                if rest.is_empty() || rest[0] == b' ' || rest[0] == b'?' {
                    assert_eq!(route, Some(Route::WebSocket), "GET /ws line");
                }
            }
            if route == Some(Route::WebSocket) {
                assert!(
                    line.windows(3).any(|w| w == b"/ws"),
                    "WebSocket route for a line without /ws"
                );
            }
        }
        None if data.len() >= capacity => {
            assert_eq!(
                route,
                Some(Route::TooLong),
                "len {} >= capacity {capacity}",
                data.len()
            );
        }
        None => {
            assert_eq!(route, None, "len {} < capacity {capacity}", data.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for capacity in [
        MAX_REQUEST_LINE,
        data.len(),
        data.len().saturating_add(1),
        data.len() / 2,
        0,
        usize::MAX,
    ] {
        check(data, capacity);
    }
});
