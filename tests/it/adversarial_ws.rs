//! Hostile WebSocket input: malformed upgrade requests, frames that
//! break RFC 6455, deeply nested JSON, huge numbers, and every JSON type in every field of every
//! request. Each gets the right error or close code, and the server keeps serving everyone else.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::Server;
use crate::http_client::{create_topic, exchange, get, health};
use crate::ws_client::{assert_ack, assert_error, client_frame, WsClient};

/// The largest message these servers accept, small so that oversized messages are cheap.
const MAX_MESSAGE_BYTES: usize = 4096;

/// How long a refused handshake may take to be answered and closed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// A server with the topic `orders`.
fn server() -> Server {
    let limit = MAX_MESSAGE_BYTES.to_string();
    let server = Server::start_with(&[
        ("MAX_MESSAGE_BYTES", limit.as_str()),
        ("HANDSHAKE_TIMEOUT_SEC", "1"),
    ]);
    create_topic(server.addr, "orders");
    server
}

/// Asserts that other clients are still served: a WebSocket round trip and `/health`.
fn assert_still_serving(addr: SocketAddr) {
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
    let server = server();
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
    let server = server();
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
    let server = server();
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

/// `depth` nested arrays: `[[[...]]]`.
fn nested_arrays(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

/// `depth` nested objects: `{"a":{"a":...{}}}`.
fn nested_objects(depth: usize) -> String {
    "{\"a\":".repeat(depth - 1) + "{}" + &"}".repeat(depth - 1)
}

/// A publish request to `orders` with `payload` spliced in as raw text.
/// A publish of `payload` as written, under a fresh message id: a repeated id would be taken
/// for a retry and not published again.
fn publish_text(request_id: &str, payload: &str) -> String {
    let id = uuid::Uuid::new_v4();
    format!(
        r#"{{"type":"publish","topic":"orders","request_id":"{request_id}","message":{{"id":"{id}","payload":{payload}}}}}"#
    )
}

#[test]
fn deeply_nested_json_never_crashes_the_server() {
    let server = Server::start_with(&[("MAX_MESSAGE_BYTES", "1048576")]);
    create_topic(server.addr, "orders");
    let mut client = WsClient::connect(server.addr);
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    // Nesting everywhere a value can go, down to half a million levels (1 MB of brackets):
    // the connection threads have 256 KiB stacks, so any recursion without a limit would
    // overflow them.
    for depth in [100, 127, 128, 129, 1_000, 10_000, 100_000, 500_000] {
        for (shape, nested) in [
            ("arrays", nested_arrays(depth)),
            ("objects", nested_objects(depth)),
        ] {
            let texts = [
                ("payload", publish_text("deep", &nested)),
                (
                    "topic",
                    format!(
                        r#"{{"type":"subscribe","topic":{nested},"client_id":"c","request_id":"deep"}}"#
                    ),
                ),
                (
                    "an unknown field",
                    format!(r#"{{"type":"ping","request_id":"deep","x":{nested}}}"#),
                ),
                (
                    "message",
                    format!(
                        r#"{{"type":"publish","topic":"orders","request_id":"deep","message":{nested}}}"#
                    ),
                ),
                ("the whole frame", nested.clone()),
            ];
            for (place, text) in texts {
                if text.len() > 1_048_576 {
                    continue;
                }
                client.send_message(tungstenite::Message::text(text));
                let reply = client.recv_json();
                let what = format!("{depth} nested {shape} in {place}");
                assert!(
                    matches!(reply["type"].as_str(), Some("ack" | "pong" | "error")),
                    "{what}: {reply}"
                );
                if reply["type"] == "error" {
                    assert_error(&reply, "BAD_REQUEST");
                }
            }
        }
        client.ping();
    }
    // The payloads that were accepted reached the subscriber whole (read as raw text: a
    // JSON parser with a depth limit could not read the deepest ones).
    let mut events = 0;
    loop {
        subscriber.send_json(&json!({"type": "ping", "request_id": "end"}));
        let text = subscriber.recv_text();
        if text.contains("\"pong\"") && text.contains("\"end\"") {
            break;
        }
        assert!(
            text.contains("\"event\""),
            "{}",
            &text[..text.len().min(200)]
        );
        events += 1;
    }
    eprintln!("{events} deeply nested payloads accepted and delivered");
    assert_still_serving(server.addr);
}

#[test]
fn payloads_nested_up_to_the_json_depth_limit_are_forwarded_byte_exact() {
    let server = server();
    let mut publisher = WsClient::connect(server.addr);
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    // Every envelope a payload travels in must stay within what serde_json reads with its
    // default limit: the deepest, a history answer (`{"messages":[{"payload":...}]}`), leaves
    // 124 levels to the payload.
    let depths = [1, 50, 100, 124];
    for depth in depths {
        for nested in [nested_arrays(depth), nested_objects(depth)] {
            publisher.send_message(tungstenite::Message::text(publish_text("d", &nested)));
            assert_ack(&publisher.recv_json(), "orders");
            let event = subscriber.recv_text();
            let expected = format!(r#""payload":{nested}}}"#);
            assert!(event.contains(&expected), "{event}");
            let parsed: Value = serde_json::from_str(&event).unwrap();
            assert_eq!(parsed["type"], "event");
        }
    }
    let published = 2 * depths.len();
    // The replay of a new subscription, and the history answer, parse too.
    let mut late = WsClient::connect(server.addr);
    late.send_json(
        &json!({"type": "subscribe", "topic": "orders", "client_id": "late",
        "last_n": published}),
    );
    assert_ack(&serde_json::from_str(&late.recv_text()).unwrap(), "orders");
    for _ in 0..published {
        let replayed: Value = serde_json::from_str(&late.recv_text()).unwrap();
        assert_eq!(replayed["type"], "event");
    }
    let history = get(server.addr, "/topics/orders/messages");
    let history: Value = serde_json::from_str(&history.body)
        .unwrap_or_else(|error| panic!("history unreadable by serde_json: {error}"));
    assert_eq!(history["messages"].as_array().unwrap().len(), published);
    // One level more would make the history answer unreadable: refused.
    publisher.send_message(tungstenite::Message::text(publish_text(
        "d",
        &nested_arrays(125),
    )));
    assert_error(&publisher.recv_json(), "BAD_REQUEST");
}

#[test]
fn no_payload_is_accepted_whose_event_a_json_parser_cannot_read() {
    let server = server();
    let mut publisher = WsClient::connect(server.addr);
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    // Around the limit, and far beyond it (MAX_MESSAGE_BYTES is 4096 here).
    for depth in [124, 125, 126, 127, 128, 129, 1_000] {
        for nested in [nested_arrays(depth), nested_objects(depth)] {
            let text = publish_text("deep", &nested);
            if text.len() > MAX_MESSAGE_BYTES {
                continue;
            }
            publisher.send_message(tungstenite::Message::text(text));
            let reply = publisher.recv_json();
            if reply["type"] == "error" {
                assert_error(&reply, "BAD_REQUEST");
                continue;
            }
            assert_ack(&reply, "orders");
            // Accepted: every subscriber must be able to read the event.
            let event = subscriber.recv_text();
            let parsed = serde_json::from_str::<Value>(&event);
            assert!(
                parsed.is_ok(),
                "a payload {depth} deep was accepted, and its event cannot be read: {:?}",
                parsed.err()
            );
        }
    }
    // Far too deep is refused, naming the payload.
    publisher.send_message(tungstenite::Message::text(publish_text(
        "deep",
        &nested_arrays(1_000),
    )));
    let reply = publisher.recv_json();
    assert_error(&reply, "BAD_REQUEST");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("message.payload"));
}

/// Publishes every number of `numbers` alone, in an array and in an object with odd spacing,
/// and checks that each payload reaches the subscriber byte for byte.
fn assert_forwarded_byte_exact(numbers: &[&str]) {
    let server = server();
    let mut publisher = WsClient::connect(server.addr);
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    for number in numbers {
        let payloads = [
            number.to_string(),
            format!("[{number}, {number}]"),
            format!("{{ \"n\" : {number} , \"m\":[ {number} ] }}"),
        ];
        for payload in payloads {
            let text = publish_text("num", &payload);
            publisher.send_message(tungstenite::Message::text(text));
            let ack = publisher.recv_json();
            assert_ack(&ack, "orders");
            let event = subscriber.recv_text();
            assert!(
                event.contains(&format!(r#""payload":{payload}}}"#)),
                "{payload} was not forwarded as sent: {event}"
            );
        }
    }
    // History returns them as sent too.
    let history = get(server.addr, "/topics/orders/messages?last_n=3");
    assert_eq!(history.status, 200, "{history:?}");
    let last = numbers.last().unwrap();
    assert!(
        history.body.contains(&format!("\"payload\":{last}")),
        "{history:?}"
    );
}

#[test]
fn huge_and_odd_numbers_in_a_payload_are_forwarded_byte_exact() {
    assert_forwarded_byte_exact(&[
        "0.1e-400",
        "18446744073709551616",
        "18446744073709551615",
        "-9223372036854775809",
        "-0",
        "-0.0",
        "0.0",
        "123456789012345678901234567890",
        "123456789012345678901234567890.123456789012345678901234567890e-5",
        "1.7976931348623157e308",
        "4.9e-324",
        "100000000000000000000000000000000000000000000000000000000000000000000000000000",
    ]);
}

#[test]
/// A number beyond the range of a double (1e400) is refused, by decision (docs/protocol.md,
/// "WebSocket protocol"): serde_json and many other parsers cannot read it, so a subscriber could not read
/// the event. RFC 8259 section 6 lets each implementation set such limits.
fn numbers_beyond_a_double_in_a_payload_are_refused_naming_the_payload() {
    let server = server();
    let mut publisher = WsClient::connect(server.addr);
    for number in ["1e400", "-1e400", "1E+400"] {
        publisher.send_message(tungstenite::Message::text(publish_text("orders", number)));
        let reply = publisher.recv_json();
        assert_error(&reply, "BAD_REQUEST");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("message.payload"),
            "{reply}"
        );
    }
    publisher.ping();
}

#[test]
fn huge_and_odd_numbers_in_integer_fields_get_bad_request_naming_the_field() {
    let server = server();
    let mut client = WsClient::connect(server.addr);
    for number in [
        "1e400",
        "18446744073709551616",
        "123456789012345678901234567890",
        "-1",
        "-0",
        "1.0",
        "1e2",
        "0.5",
        "-9223372036854775809",
    ] {
        for (field, extra) in [("last_n", ""), ("since_seq", r#","epoch":"e""#)] {
            let text = format!(
                r#"{{"type":"subscribe","topic":"orders","client_id":"c","request_id":"n","{field}":{number}{extra}}}"#
            );
            client.send_message(tungstenite::Message::text(text.clone()));
            let reply = client.recv_json();
            assert_error(&reply, "BAD_REQUEST");
            let message = reply["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("`{field}`")), "{text}: {reply}");
            assert_eq!(reply["request_id"], "n");
        }
    }
    // The largest u64 is an integer, accepted as a position that is not recovered.
    let reply = client.request(json!({
        "type": "subscribe", "topic": "orders", "client_id": "c",
        "since_seq": u64::MAX, "epoch": "e",
    }));
    assert_ack(&reply, "orders");
    assert_eq!(reply["recovered"], false, "{reply}");
    client.ping();
}

/// One value of every JSON type (and a few of each).
fn every_json_type() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(""),
        json!("x"),
        json!([]),
        json!([1, "a"]),
        json!({}),
        json!({"a": 1}),
    ]
}

/// What a request with one field set to one value must get.
enum Expect {
    /// `BAD_REQUEST` whose message names this field.
    BadRequest(&'static str),
    /// An ack (or a pong).
    Accepted,
    /// `TOPIC_NOT_FOUND`.
    NotFound,
}

/// The verdict for `value` in `field` of a request of type `kind`.
fn expected_outcome(kind: &str, field: &str, value: &Value) -> Expect {
    let string = value.as_str();
    match field {
        "type" => Expect::BadRequest("type"),
        "request_id" if string.is_some() => Expect::Accepted,
        "request_id" => Expect::BadRequest("request_id"),
        "topic" => match string {
            Some("x") => Expect::NotFound,
            _ => Expect::BadRequest("topic"),
        },
        "client_id" => match string {
            Some("x") => Expect::Accepted,
            _ => Expect::BadRequest("client_id"),
        },
        "last_n" | "since_seq" if value.as_u64().is_some() => Expect::Accepted,
        "last_n" | "since_seq" => Expect::BadRequest(if field == "last_n" {
            "last_n"
        } else {
            "since_seq"
        }),
        "epoch" if string.is_some() => Expect::Accepted,
        "epoch" => Expect::BadRequest("epoch"),
        "message" => Expect::BadRequest("message"),
        "message.id" => Expect::BadRequest("message.id"),
        "message.payload" => Expect::Accepted,
        other => panic!("no rule for {other} in {kind}"),
    }
}

#[test]
fn every_json_type_in_every_field_gets_bad_request_naming_it_or_is_accepted() {
    let server = server();
    let mut client = WsClient::connect(server.addr);
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    let base = |kind: &str| -> Value {
        match kind {
            "subscribe" | "unsubscribe" => {
                json!({"type": kind, "topic": "orders", "client_id": "c", "request_id": "q"})
            }
            "resume" => json!({
                "type": "subscribe", "topic": "orders", "client_id": "c", "request_id": "q",
                "since_seq": 0, "epoch": "e",
            }),
            "publish" => json!({
                "type": "publish", "topic": "orders", "request_id": "q",
                "message": {"id": uuid::Uuid::new_v4().to_string(), "payload": 1},
            }),
            "ping" => json!({"type": "ping", "request_id": "q"}),
            other => panic!("{other}"),
        }
    };
    let fields: [(&str, &[&str]); 5] = [
        (
            "subscribe",
            &["type", "request_id", "topic", "client_id", "last_n"],
        ),
        ("resume", &["since_seq", "epoch"]),
        ("unsubscribe", &["type", "request_id", "topic", "client_id"]),
        (
            "publish",
            &[
                "type",
                "request_id",
                "topic",
                "message",
                "message.id",
                "message.payload",
            ],
        ),
        ("ping", &["type", "request_id"]),
    ];
    let mut tried = 0;
    let mut published = 0;
    for (kind, names) in fields {
        for field in names {
            for value in every_json_type() {
                let mut request = base(kind);
                match field.split_once('.') {
                    Some((outer, inner)) => request[outer][inner] = value.clone(),
                    None => request[*field] = value.clone(),
                }
                // `message` set to an object keeps nothing of the base message.
                client.send_json(&request);
                let reply = client.recv_json();
                let expect = if *field == "message" && value.is_object() {
                    Expect::BadRequest(if value.get("id").is_none() {
                        "message.id"
                    } else {
                        "message.payload"
                    })
                } else {
                    expected_outcome(kind, field, &value)
                };
                let what = format!("{kind} with {field} = {value}");
                match expect {
                    Expect::BadRequest(named) => {
                        assert_error(&reply, "BAD_REQUEST");
                        let message = reply["error"]["message"].as_str().unwrap();
                        assert!(
                            message.contains(named),
                            "{what}: {reply} does not name {named}"
                        );
                    }
                    Expect::NotFound => assert_error(&reply, "TOPIC_NOT_FOUND"),
                    Expect::Accepted => {
                        assert!(
                            matches!(reply["type"].as_str(), Some("ack" | "pong")),
                            "{what}: {reply}"
                        );
                        if kind == "publish" {
                            published += 1;
                            let event = subscriber.recv_event("orders");
                            if *field == "message.payload" {
                                assert_eq!(event["payload"], value, "{what}");
                            }
                        }
                    }
                }
                // The request_id is echoed when it is a string, and never otherwise.
                let echoed = if *field == "request_id" {
                    value.as_str().map(|id| json!(id))
                } else {
                    Some(json!("q"))
                };
                assert_eq!(reply.get("request_id").cloned(), echoed, "{what}: {reply}");
                client.ping();
                tried += 1;
            }
        }
    }
    subscriber.assert_nothing_pending();
    eprintln!("{tried} field/type combinations tried, {published} publishes accepted");
}

#[test]
fn duplicate_fields_are_bad_request() {
    let server = server();
    let mut client = WsClient::connect(server.addr);
    for (text, field) in [
        (r#"{"type":"ping","type":"publish"}"#, "type"),
        (
            r#"{"type":"subscribe","topic":"orders","topic":"other","client_id":"c"}"#,
            "topic",
        ),
        (
            r#"{"type":"ping","request_id":"a","request_id":"b"}"#,
            "request_id",
        ),
        (
            r#"{"type":"publish","topic":"orders","message":{"id":"7f8e2a9c-4b1d-4c3e-9f6a-1b2c3d4e5f60","payload":1,"payload":2}}"#,
            "message",
        ),
    ] {
        client.send_message(tungstenite::Message::text(text));
        let reply = client.recv_json();
        assert_error(&reply, "BAD_REQUEST");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{text}: {reply}");
        client.ping();
    }
}
