//! The WebSocket transport (RFC 6455): malformed upgrade requests (`400` with a JSON error),
//! frames that break the RFC and their close codes (1002 protocol, 1007 not UTF-8, 1009 too
//! big), legal but unusual framing that must be accepted, and the server serving everyone else
//! throughout. The JSON requests carried in the frames are protocol.rs.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, exchange, health};
use crate::ws_client::{
    assert_ack, assert_error, client_frame, publish_request, WsClient, RESERVED_OPCODE_FRAME,
    TEXT_FRAME,
};

/// The largest message these servers accept, small so that oversized messages are cheap.
const MAX_MESSAGE_BYTES: usize = 4096;

/// How long a refused handshake may take to be answered and closed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// A server with the topic `orders`, [`MAX_MESSAGE_BYTES`], and a handshake deadline of 1 s, so
/// that an upgrade request left incomplete ends quickly: for the tests of hostile input, here
/// and in `protocol`.
pub(crate) fn hostile_input_server() -> Server {
    let limit = MAX_MESSAGE_BYTES.to_string();
    let server = Server::start_with(&[
        ("MAX_MESSAGE_BYTES", limit.as_str()),
        ("HANDSHAKE_TIMEOUT_SEC", "1"),
    ]);
    create_topic(server.addr, "orders");
    server
}

/// A server with the topic `orders` and a client connected to it.
pub(crate) fn server_with_orders(overrides: &[(&str, &str)]) -> (Server, WsClient) {
    let server = Server::start_with(overrides);
    create_topic(server.addr, "orders");
    let client = WsClient::connect(server.addr);
    (server, client)
}

/// Asserts that other clients are still served: a WebSocket round trip and `/health`.
pub(crate) fn assert_still_serving(addr: SocketAddr) {
    let mut client = WsClient::connect(addr);
    client.ping();
    assert!(health(addr)["uptime_sec"].is_u64());
}

/// A complete upgrade request for `/ws` with `extra` header lines, minus the ones named in
/// `without`.
fn upgrade_request(method: &str, version: &str, without: &[&str], extra: &str) -> Vec<u8> {
    let headers = [
        ("Host", "x"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let mut request = format!("{method} /ws {version}\r\n");
    for (name, value) in headers.iter().filter(|(name, _)| !without.contains(name)) {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(extra);
    request.push_str("\r\n");
    request.into_bytes()
}

#[test]
fn malformed_upgrade_requests_get_400_with_a_json_error() {
    let server = hostile_input_server();
    let many_headers: String = (0..200).map(|n| format!("X-H{n}: {n}\r\n")).collect();
    let big_headers: String = (0..80)
        .map(|n| format!("X-Big-{n}: {}\r\n", "b".repeat(1000)))
        .collect();
    let requests: Vec<(&str, Vec<u8>)> = vec![
        (
            "no Sec-WebSocket-Key",
            upgrade_request("GET", "HTTP/1.1", &["Sec-WebSocket-Key"], ""),
        ),
        (
            "no Sec-WebSocket-Version",
            upgrade_request("GET", "HTTP/1.1", &["Sec-WebSocket-Version"], ""),
        ),
        (
            "version 8",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &["Sec-WebSocket-Version"],
                "Sec-WebSocket-Version: 8\r\n",
            ),
        ),
        (
            "version 14",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &["Sec-WebSocket-Version"],
                "Sec-WebSocket-Version: 14\r\n",
            ),
        ),
        ("POST /ws", upgrade_request("POST", "HTTP/1.1", &[], "")),
        ("PUT /ws", upgrade_request("PUT", "HTTP/1.1", &[], "")),
        ("HTTP/1.0", upgrade_request("GET", "HTTP/1.0", &[], "")),
        (
            "no Connection header",
            upgrade_request("GET", "HTTP/1.1", &["Connection"], ""),
        ),
        (
            "Connection: keep-alive",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &["Connection"],
                "Connection: keep-alive\r\n",
            ),
        ),
        // (A request to /ws without `Upgrade: websocket` is answered by REST with 426: see
        // rest.rs.)
        (
            "200 headers",
            upgrade_request("GET", "HTTP/1.1", &[], &many_headers),
        ),
        (
            "80 KB of headers",
            upgrade_request("GET", "HTTP/1.1", &[], &big_headers),
        ),
        (
            "a header line of garbage",
            upgrade_request("GET", "HTTP/1.1", &[], "\u{1}\u{2}garbage\r\n"),
        ),
    ];
    for (name, request) in &requests {
        let outcome = exchange(server.addr, request, EXCHANGE_TIMEOUT);
        assert!(outcome.closed, "{name}: not closed");
        let responses = outcome.responses();
        assert_eq!(responses.len(), 1, "{name}: {responses:?}");
        responses[0].expect_error(400, "BAD_REQUEST");
    }
    eprintln!("{} malformed upgrade requests refused", requests.len());
    assert_still_serving(server.addr);
}

#[test]
fn a_message_at_max_message_bytes_is_accepted_and_one_over_closes_with_1009() {
    const LIMIT: usize = 1024;
    let (server, mut client) = server_with_orders(&[("MAX_MESSAGE_BYTES", "1024")]);
    client.send_message(Message::text(publish_text_of_length(LIMIT)));
    assert_ack(&client.recv_json(), "orders");
    client.send_message(Message::text(publish_text_of_length(LIMIT + 1)));
    assert_eq!(client.expect_close(), CloseCode::Size);

    let mut client = WsClient::connect(server.addr);
    client.send_message(Message::text(publish_text_of_length(64 * LIMIT)));
    assert_eq!(client.expect_close(), CloseCode::Size);
}

#[test]
fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_raw_frame(TEXT_FRAME, b"{\"type\":\"\xff\xfe\"}", true);
    assert_eq!(client.expect_close(), CloseCode::Invalid);
}

#[test]
fn an_unmasked_client_frame_closes_with_1002() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_raw_frame(TEXT_FRAME, br#"{"type":"ping"}"#, false);
    assert_eq!(client.expect_close(), CloseCode::Protocol);
}

#[test]
fn a_reserved_opcode_closes_with_1002() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_raw_frame(RESERVED_OPCODE_FRAME, b"{}", true);
    assert_eq!(client.expect_close(), CloseCode::Protocol);
}

/// Frames that break RFC 6455, each sent on a fresh connection after a valid handshake, with
/// the close codes the server may answer with.
fn protocol_violations() -> Vec<(String, Vec<u8>, &'static [CloseCode])> {
    const PROTOCOL: &[CloseCode] = &[CloseCode::Protocol];
    const INVALID: &[CloseCode] = &[CloseCode::Invalid];
    const SIZE: &[CloseCode] = &[CloseCode::Size];
    let ping = br#"{"type":"ping"}"#;
    let mut violations: Vec<(String, Vec<u8>, &'static [CloseCode])> = Vec::new();
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        violations.push((
            format!("reserved opcode {opcode:#x}"),
            client_frame(0x80 | opcode, b"{}", true),
            PROTOCOL,
        ));
    }
    for (name, first_byte) in [("RSV1", 0xC1), ("RSV2", 0xA1), ("RSV3", 0x91)] {
        violations.push((
            format!("{name} set without an extension"),
            client_frame(first_byte, ping, true),
            PROTOCOL,
        ));
    }
    let split = |first: Vec<u8>, second: Vec<u8>| [first, second].concat();
    violations.extend([
        (
            "an unmasked text frame".to_string(),
            client_frame(0x81, ping, false),
            PROTOCOL,
        ),
        (
            "an unmasked ping".to_string(),
            client_frame(0x89, b"", false),
            PROTOCOL,
        ),
        (
            "a fragmented ping".to_string(),
            split(
                client_frame(0x09, b"a", true),
                client_frame(0x80, b"b", true),
            ),
            PROTOCOL,
        ),
        (
            "a fragmented close".to_string(),
            client_frame(0x08, &1000u16.to_be_bytes(), true),
            PROTOCOL,
        ),
        (
            "a continuation without a start".to_string(),
            client_frame(0x80, ping, true),
            PROTOCOL,
        ),
        (
            "an unfinished continuation without a start".to_string(),
            client_frame(0x00, ping, true),
            PROTOCOL,
        ),
        (
            "a new text frame inside a fragmented message".to_string(),
            split(
                client_frame(0x01, b"{\"type\":", true),
                client_frame(0x81, ping, true),
            ),
            PROTOCOL,
        ),
        (
            "a ping of 126 bytes".to_string(),
            client_frame(0x89, &[b'p'; 126], true),
            PROTOCOL,
        ),
        (
            "a close of 200 bytes".to_string(),
            client_frame(0x88, &[b'c'; 200], true),
            PROTOCOL,
        ),
        (
            "a close with a 1-byte payload".to_string(),
            client_frame(0x88, &[3], true),
            PROTOCOL,
        ),
        (
            "a close with code 999".to_string(),
            client_frame(0x88, &999u16.to_be_bytes(), true),
            PROTOCOL,
        ),
        (
            "a close with code 1005 (never sent on the wire)".to_string(),
            client_frame(0x88, &1005u16.to_be_bytes(), true),
            PROTOCOL,
        ),
        (
            "a close with code 5000".to_string(),
            client_frame(0x88, &5000u16.to_be_bytes(), true),
            PROTOCOL,
        ),
        (
            "a close whose reason is not UTF-8".to_string(),
            client_frame(0x88, b"\x03\xe8\xff\xfe", true),
            &[CloseCode::Invalid, CloseCode::Protocol],
        ),
        // Invalid UTF-8 in text.
        (
            "a lone continuation byte".to_string(),
            client_frame(0x81, b"{\"type\":\"\x80\"}", true),
            INVALID,
        ),
        (
            "an overlong encoding of NUL".to_string(),
            client_frame(0x81, b"{\"type\":\"\xc0\x80\"}", true),
            INVALID,
        ),
        (
            "an encoded surrogate".to_string(),
            client_frame(0x81, b"{\"type\":\"\xed\xa0\x80\"}", true),
            INVALID,
        ),
        (
            "a code point over U+10FFFF".to_string(),
            client_frame(0x81, b"{\"type\":\"\xf4\x90\x80\x80\"}", true),
            INVALID,
        ),
        (
            "a character cut at the end of the message".to_string(),
            client_frame(0x81, b"{\"type\":\"ping\"}\xe2\x82", true),
            INVALID,
        ),
        (
            "invalid UTF-8 in the second fragment".to_string(),
            split(
                client_frame(0x01, b"{\"type\":\"", true),
                client_frame(0x80, b"\xff\"}", true),
            ),
            INVALID,
        ),
        // Too big.
        (
            "one text frame over MAX_MESSAGE_BYTES".to_string(),
            client_frame(0x81, &vec![b' '; MAX_MESSAGE_BYTES + 1], true),
            SIZE,
        ),
        (
            "fragments adding up to over MAX_MESSAGE_BYTES".to_string(),
            (0..5)
                .flat_map(|n| {
                    let first_byte = match n {
                        0 => 0x01,
                        4 => 0x80,
                        _ => 0x00,
                    };
                    client_frame(first_byte, &vec![b' '; MAX_MESSAGE_BYTES / 4], true)
                })
                .collect(),
            SIZE,
        ),
        (
            "a binary frame over MAX_MESSAGE_BYTES".to_string(),
            client_frame(0x82, &vec![0; MAX_MESSAGE_BYTES * 2], true),
            SIZE,
        ),
        (
            "a frame header announcing 2^63 - 1 bytes".to_string(),
            [
                0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
            ]
            .to_vec(),
            SIZE,
        ),
        (
            "a 64-bit length with its top bit set".to_string(),
            [0x81, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4].to_vec(),
            &[CloseCode::Protocol, CloseCode::Size],
        ),
    ]);
    violations
}

#[test]
fn frames_that_break_rfc_6455_get_the_right_close_code_and_others_are_served() {
    let server = hostile_input_server();
    let addr = server.addr;
    // A bystander keeps a subscription through all of it.
    let mut bystander = WsClient::connect(addr);
    bystander.subscribe("orders", None);
    let violations = protocol_violations();
    let count = violations.len();
    let runs: Vec<_> = violations
        .into_iter()
        .map(|(name, frames, expected)| {
            thread::spawn(move || {
                let mut client = WsClient::connect(addr);
                client.ping();
                client.send_raw_bytes(&frames);
                let code = client.expect_close();
                assert!(
                    expected.contains(&code),
                    "{name}: closed with {code:?}, expected one of {expected:?}"
                );
            })
        })
        .collect();
    for run in runs {
        run.join().unwrap();
    }
    eprintln!("{count} protocol violations closed with the right code");
    let mut publisher = WsClient::connect(addr);
    publisher.publish("orders", json!({"after": "violations"}));
    assert_eq!(
        bystander.recv_event("orders")["payload"],
        json!({"after": "violations"})
    );
    assert_still_serving(addr);
    // Every violator's connection is gone: only the bystander is subscribed, and only the
    // bystander and the publisher are open.
    assert_eq!(health(addr)["subscribers"], 1);
}

#[test]
fn legal_but_unusual_framing_is_accepted() {
    let server = hostile_input_server();
    let mut client = WsClient::connect(server.addr);
    // A message in three fragments with a ping between them (RFC 6455 5.4: control frames
    // may be injected in the middle of a fragmented message).
    let text = br#"{"type":"ping","request_id":"frag"}"#;
    client.send_raw_bytes(&client_frame(0x01, &text[..5], true));
    client.send_raw_bytes(&client_frame(0x89, b"hello", true));
    client.send_raw_bytes(&client_frame(0x00, &text[5..20], true));
    client.send_raw_bytes(&client_frame(0x80, &text[20..], true));
    // The ping's pong comes first (tungstenite shows it as a message), then the reply.
    let reply = client.recv_json();
    assert_eq!(reply["type"], "pong", "{reply}");
    assert_eq!(reply["request_id"], "frag", "{reply}");
    // A multi-byte character split across two fragments is valid UTF-8 once reassembled.
    let text = "{\"type\":\"ping\",\"request_id\":\"\u{20ac}\"}".as_bytes();
    let euro = text.iter().position(|&b| b == 0xe2).unwrap();
    client.send_raw_bytes(&client_frame(0x01, &text[..euro + 1], true));
    client.send_raw_bytes(&client_frame(0x80, &text[euro + 1..], true));
    assert_eq!(client.recv_json()["request_id"], "\u{20ac}");
    // An empty text frame is not JSON: BAD_REQUEST, and the connection stays.
    client.send_raw_bytes(&client_frame(0x81, b"", true));
    assert_error(&client.recv_json(), "BAD_REQUEST");
    // A message of exactly MAX_MESSAGE_BYTES in 64-bit-length framing is fine.
    let mut padded = br#"{"type":"ping","request_id":"big"}"#.to_vec();
    padded.resize(MAX_MESSAGE_BYTES, b' ');
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend((padded.len() as u64).to_be_bytes());
    frame.extend([0, 0, 0, 0]);
    frame.extend(&padded);
    client.send_raw_bytes(&frame);
    assert_eq!(client.recv_json()["request_id"], "big");
    // A close with an application code (3000-4999) is echoed.
    client.send_raw_bytes(&client_frame(0x88, &4000u16.to_be_bytes(), true));
    assert_eq!(client.expect_close(), CloseCode::from(4000));
    assert_still_serving(server.addr);
}

/// A publish request to `orders` whose text is exactly `length` bytes long.
fn publish_text_of_length(length: usize) -> String {
    let with_filler = |filler: &str| {
        let mut request = publish_request("orders", &Uuid::new_v4().to_string(), json!(filler));
        request["request_id"] = json!("big");
        request.to_string()
    };
    let overhead = with_filler("").len();
    let text = with_filler(&"x".repeat(length - overhead));
    assert_eq!(text.len(), length);
    text
}
