//! Publishing over HTTP, `POST /topics/{name}/messages`: exactly like the WebSocket `publish`
//! (one `seq` counter, the same events, payloads byte for byte), an id generated when absent,
//! and every refusal (`400`, `404`, `405`, `413`) publishing nothing.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::Server;
use crate::history::server_with_subscriber;
use crate::http_client::{
    create_topic, delete, history, history_seqs, http, post_message, publish_over_http, stats,
};
use crate::ws_client::{assert_timestamp, seq_field, without_ts, WsClient};

/// A payload whose key order a parse into a sorted map would lose.
const ODD_KEY_ORDER: &str = r#"{"zeta":1,"alpha":{"k2":2,"k1":[true,null,1.5]}}"#;

#[test]
fn http_publish_is_201_with_id_and_seq_and_reaches_websocket_subscribers() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    let id = Uuid::new_v4().to_string();
    let body = format!(r#"{{"payload":{ODD_KEY_ORDER},"id":"{id}"}}"#);
    let path = "/topics/orders/messages";
    let response = http(
        server.addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &body,
    );
    let expected = json!({"status": "published", "topic": "orders", "id": id, "seq": 1});
    assert_eq!(response.expect_json(201), expected);

    // The event, byte for byte the payload published (key order included).
    let text = subscriber.recv_text();
    assert!(
        text.contains(&format!(r#""payload":{ODD_KEY_ORDER}"#)),
        "payload re-ordered or reformatted: {text}"
    );
    let http_event: Value = serde_json::from_str(&text).unwrap();
    assert_timestamp(&http_event);
    let payload: Value = serde_json::from_str(ODD_KEY_ORDER).unwrap();
    let expected = json!({
        "type": "event",
        "topic": "orders",
        "message": {"id": id, "payload": payload},
        "seq": 1,
    });
    assert_eq!(without_ts(http_event.clone()), expected);

    // Without an id, the server makes up a UUID, a new one each time.
    let mut generated = BTreeSet::new();
    for seq in [2, 3] {
        let reply = post_message(server.addr, "orders", r#"{"payload":{"n":2}}"#).expect_json(201);
        assert_eq!(seq_field(&reply), seq, "{reply}");
        let id = reply["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            Uuid::parse_str(&id).is_ok(),
            "generated id not a UUID: {reply}"
        );
        assert!(generated.insert(id.clone()), "generated id reused: {reply}");
        assert_eq!(
            reply,
            json!({"status": "published", "topic": "orders", "id": id, "seq": seq})
        );
        let event = subscriber.recv_numbered_event("orders");
        assert_eq!(event["message"], json!({"id": id, "payload": {"n": 2}}));
        assert_eq!(seq_field(&event), seq);
    }

    // A WebSocket publish continues the same counter and gives an event of the same shape.
    let (_, seq) = WsClient::connect(server.addr).publish_numbered("orders", json!(4));
    assert_eq!(seq, 4);
    let ws_event = subscriber.recv_numbered_event("orders");
    let keys =
        |event: &Value| -> Vec<String> { event.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&ws_event), keys(&http_event));
    assert_eq!(keys(&ws_event["message"]), keys(&http_event["message"]));
    assert_eq!(publish_over_http(server.addr, "orders", "5"), 5);
    assert_eq!(seq_field(&subscriber.recv_numbered_event("orders")), 5);

    // Counted like any publish, before the reply.
    assert_eq!(stats(server.addr)["topics"]["orders"]["messages"], 5);
    subscriber.assert_nothing_pending();
}

#[test]
fn http_publish_accepts_any_json_payload() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    let payloads = [
        "null",
        "0",
        "-1.5",
        "true",
        r#""text""#,
        "[]",
        r#"[1,"a",{"b":null}]"#,
        "{}",
    ];
    for (seq, payload) in (1..).zip(payloads) {
        assert_eq!(publish_over_http(server.addr, "orders", payload), seq);
        let event = subscriber.recv_numbered_event("orders");
        let expected: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(event["message"]["payload"], expected, "{event}");
        assert_eq!(seq_field(&event), seq);
    }
}

#[test]
fn http_publish_refuses_bad_bodies_with_400_and_publishes_nothing() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    let id = Uuid::new_v4().to_string();
    let only_id = format!(r#"{{"id":"{id}"}}"#);
    let bad_bodies = [
        "",
        "   ",
        "{",
        r#"{"payload":1"#,
        r#"{"payload":}"#,
        "payload=1",
        "[]",
        r#"[{"payload":1}]"#,
        "null",
        "5",
        r#""text""#,
        "{}",
        r#"{"message":{"payload":1}}"#,
        &only_id,
        r#"{"payload":1,"id":"not-a-uuid"}"#,
        r#"{"payload":1,"id":""}"#,
        r#"{"payload":1,"id":5}"#,
        r#"{"payload":1,"id":["a"]}"#,
    ];
    for body in bad_bodies {
        let response = post_message(server.addr, "orders", body);
        assert_eq!(response.status, 400, "{body:?} answered {response:?}");
        response.expect_error(400, "BAD_REQUEST");
    }
    subscriber.assert_nothing_pending();
    assert_eq!(stats(server.addr)["topics"]["orders"]["messages"], 0);
    let empty = history(server.addr, "orders", "");
    assert_eq!(
        (history_seqs(&empty), seq_field(&empty)),
        (vec![], 0),
        "{empty}"
    );
}

#[test]
fn http_publish_to_an_unknown_topic_is_404() {
    let server = Server::start();
    post_message(server.addr, "ghost", r#"{"payload":1}"#).expect_error(404, "TOPIC_NOT_FOUND");
    create_topic(server.addr, "orders");
    delete(server.addr, "/topics/orders").expect_json(200);
    post_message(server.addr, "orders", r#"{"payload":1}"#).expect_error(404, "TOPIC_NOT_FOUND");
}

#[test]
fn http_publish_over_max_message_bytes_is_413_and_one_at_the_limit_is_published() {
    const LIMIT: usize = 1024;
    let (server, mut subscriber, _) = server_with_subscriber(&[("MAX_MESSAGE_BYTES", "1024")]);
    let envelope = r#"{"payload":""}"#;
    let text = "a".repeat(LIMIT - envelope.len());
    let at_limit = format!(r#"{{"payload":"{text}"}}"#);
    assert_eq!(at_limit.len(), LIMIT);
    let reply = post_message(server.addr, "orders", &at_limit).expect_json(201);
    assert_eq!(seq_field(&reply), 1);
    let event = subscriber.recv_numbered_event("orders");
    assert_eq!(event["message"]["payload"], text.as_str());

    let over_limit = format!(r#"{{"payload":"{text}a"}}"#);
    post_message(server.addr, "orders", &over_limit).expect_error(413, "PAYLOAD_TOO_LARGE");
    let far_over = format!(r#"{{"payload":"{}"}}"#, "a".repeat(100 * LIMIT));
    post_message(server.addr, "orders", &far_over).expect_error(413, "PAYLOAD_TOO_LARGE");
    subscriber.assert_nothing_pending();
    assert_eq!(stats(server.addr)["topics"]["orders"]["messages"], 1);
}

#[test]
fn other_methods_on_the_messages_route_are_405_allowing_get_head_and_post() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    for method in ["PUT", "DELETE", "PATCH"] {
        let response = http(
            server.addr,
            method,
            "/topics/orders/messages",
            &[],
            r#"{"payload":1}"#,
        );
        response.expect_error(405, "METHOD_NOT_ALLOWED");
        let allow = response
            .header("allow")
            .unwrap_or_else(|| panic!("no Allow: {response:?}"));
        let mut methods: Vec<&str> = allow.split(',').map(str::trim).collect();
        methods.sort_unstable();
        assert_eq!(methods, ["GET", "HEAD", "POST"], "{method}: {response:?}");
    }
    // The refused DELETE did not delete the topic, and nothing was published.
    subscriber.assert_nothing_pending();
    assert_eq!(stats(server.addr)["topics"]["orders"]["messages"], 0);
}
