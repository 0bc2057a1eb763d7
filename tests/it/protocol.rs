//! The WebSocket protocol: replies to each request type, bad input, and the frames that close a
//! connection (SPEC sections 3 and 4).

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::create_topic;
use crate::ws_client::{
    assert_ack, assert_error, publish_request, without_ts, WsClient, RESERVED_OPCODE_FRAME,
    TEXT_FRAME,
};

/// A server with the topic `orders` and a client connected to it.
fn server_with_orders(overrides: &[(&str, &str)]) -> (Server, WsClient) {
    let server = Server::start_with(overrides);
    create_topic(server.addr, "orders");
    let client = WsClient::connect(server.addr);
    (server, client)
}

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
