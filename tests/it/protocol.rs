//! The WebSocket protocol's JSON requests: the reply to each request type, `request_id`
//! echoed, bad input (`BAD_REQUEST` naming the field, the connection staying usable), every
//! JSON type in every field, duplicate fields, deep nesting, and huge or odd numbers (forwarded
//! byte-exact in a payload, refused in integer fields or beyond a double). The frames that carry
//! them are websocket.rs.

use serde_json::{json, Value};
use tungstenite::Message;
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, get};
use crate::websocket::{assert_still_serving, hostile_input_server, server_with_orders};
use crate::ws_client::{assert_ack, assert_error, publish_request, without_ts, WsClient};

/// The largest message these servers accept, small so that oversized messages are cheap.
const MAX_MESSAGE_BYTES: usize = 4096;

#[test]
fn subscribe_is_acked_echoing_the_request_id_and_topic() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_json(
        &json!({"type": "subscribe", "topic": "orders", "client_id": "c1", "request_id": "sub-1"}),
    );
    let mut ack = without_ts(client.recv_json());
    // The topic's position: a fresh topic has published nothing yet.
    let epoch = ack
        .as_object_mut()
        .unwrap()
        .remove("epoch")
        .expect("a subscribe ack carries the epoch");
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()), "{epoch}");
    let expected =
        json!({"type": "ack", "request_id": "sub-1", "status": "ok", "topic": "orders", "seq": 0});
    assert_eq!(ack, expected);
}

#[test]
fn ping_is_answered_with_a_pong_echoing_the_request_id() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_json(&json!({"type": "ping", "request_id": "p1"}));
    assert_eq!(
        without_ts(client.recv_json()),
        json!({"type": "pong", "request_id": "p1"})
    );
}

#[test]
fn replies_omit_request_id_when_the_request_had_none() {
    let (_server, mut client) = server_with_orders(&[]);
    let requests = [
        json!({"type": "subscribe", "topic": "orders", "client_id": "c1"}),
        json!({"type": "unsubscribe", "topic": "orders", "client_id": "c1"}),
        publish_request("orders", &Uuid::new_v4().to_string(), json!(1)),
        json!({"type": "ping"}),
        json!({"type": "subscribe", "topic": "ghost", "client_id": "c1"}),
        json!({"type": "subscribe", "client_id": "c1"}),
    ];
    for request in requests {
        client.send_json(&request);
        let reply = client.recv_json();
        assert_eq!(
            reply.get("request_id"),
            None,
            "{request} answered by {reply}"
        );
    }
}

#[test]
fn the_first_frame_a_client_receives_answers_its_first_request() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_json(&json!({"type": "subscribe", "topic": "orders", "client_id": "c1"}));
    match client.recv_message() {
        Message::Text(text) => {
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            assert_ack(&reply, "orders");
        }
        other => panic!("the first frame is not the ack: {other:?}"),
    }
}

#[test]
fn unsubscribe_is_acked_even_when_not_subscribed() {
    let (_server, mut client) = server_with_orders(&[]);
    client.unsubscribe("orders");
    client.subscribe("orders", None);
    client.unsubscribe("orders");
    client.unsubscribe("orders");
}

#[test]
fn requests_on_a_missing_topic_get_topic_not_found_naming_it() {
    let (_server, mut client) = server_with_orders(&[]);
    let requests = [
        json!({"type": "subscribe", "topic": "ghost", "client_id": "c1"}),
        json!({"type": "unsubscribe", "topic": "ghost", "client_id": "c1"}),
        publish_request("ghost", &Uuid::new_v4().to_string(), json!({"n": 1})),
    ];
    for request in requests {
        let reply = client.request(request);
        assert_error(&reply, "TOPIC_NOT_FOUND");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("ghost"),
            "message does not name the topic: {reply}"
        );
    }
    client.ping();
}

#[test]
fn text_that_is_not_a_json_object_gets_bad_request_and_the_connection_stays_usable() {
    let (_server, mut client) = server_with_orders(&[]);
    let not_objects = [
        "not json",
        r#"{"type":"ping""#,
        "",
        "[]",
        r#""ping""#,
        "42",
        "null",
    ];
    for text in not_objects {
        client.send_message(Message::text(text));
        assert_error(&client.recv_json(), "BAD_REQUEST");
        client.ping();
    }
}

#[test]
fn a_missing_or_wrongly_typed_field_gets_bad_request_naming_it() {
    let (_server, mut client) = server_with_orders(&[]);
    let id = Uuid::new_v4().to_string();
    let subscribe =
        json!({"type": "subscribe", "topic": "orders", "client_id": "c1", "request_id": "q"});
    let unsubscribe =
        json!({"type": "unsubscribe", "topic": "orders", "client_id": "c1", "request_id": "q"});
    let mut publish = publish_request("orders", &id, json!(1));
    publish["request_id"] = json!("q");
    let ping = json!({"type": "ping", "request_id": "q"});
    // (request, the field its error message must name)
    let bad_requests = [
        (json!({}), "type"),
        (without(&ping, "type"), "type"),
        (with(&ping, "type", json!("dance")), "type"),
        (with(&ping, "type", json!(5)), "type"),
        (with(&ping, "request_id", json!(5)), "request_id"),
        (without(&subscribe, "topic"), "topic"),
        (with(&subscribe, "topic", json!(5)), "topic"),
        (without(&subscribe, "client_id"), "client_id"),
        (with(&subscribe, "client_id", json!(7)), "client_id"),
        (with(&subscribe, "last_n", json!(-1)), "last_n"),
        (with(&subscribe, "last_n", json!(1.5)), "last_n"),
        (with(&subscribe, "last_n", json!("3")), "last_n"),
        (with(&subscribe, "request_id", json!(5)), "request_id"),
        (without(&unsubscribe, "topic"), "topic"),
        (without(&unsubscribe, "client_id"), "client_id"),
        (without(&publish, "topic"), "topic"),
        (without(&publish, "message"), "message"),
        (with(&publish, "message", json!("hi")), "message"),
        (with(&publish, "message", json!({"payload": 1})), "id"),
        (
            with(&publish, "message", json!({"id": 12, "payload": 1})),
            "id",
        ),
        (
            with(
                &publish,
                "message",
                json!({"id": "not-a-uuid", "payload": 1}),
            ),
            "id",
        ),
        (with(&publish, "message", json!({"id": id})), "payload"),
    ];
    for (request, field) in bad_requests {
        client.send_json(&request);
        let reply = client.recv_json();
        assert_error(&reply, "BAD_REQUEST");
        if request["request_id"] == "q" {
            assert_eq!(reply["request_id"], "q", "{request} answered by {reply}");
        }
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{request}: the error does not name `{field}`: {reply}"
        );
        client.ping();
    }
}

#[test]
fn a_binary_frame_gets_bad_request_and_the_connection_stays_usable() {
    let (_server, mut client) = server_with_orders(&[]);
    client.send_message(Message::binary(br#"{"type":"ping"}"#.to_vec()));
    assert_error(&client.recv_json(), "BAD_REQUEST");
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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
    let server = hostile_input_server();
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

/// `request` with `field` set to `value`.
fn with(request: &Value, field: &str, value: Value) -> Value {
    let mut request = request.clone();
    request[field] = value;
    request
}

/// `request` without `field`.
fn without(request: &Value, field: &str) -> Value {
    let mut request = request.clone();
    request.as_object_mut().unwrap().remove(field);
    request
}
