//! HTTP publish and history: `POST /topics/{name}/messages` publishes exactly like the
//! WebSocket `publish`, and `GET /topics/{name}/messages` reads the topic's ring.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, delete, get, http, post, stats, Response};
use crate::ws_client::{assert_timestamp, epoch_field, seq_field, without_ts, WsClient};

/// A payload whose key order a parse into a sorted map would lose.
const ODD_KEY_ORDER: &str = r#"{"zeta":1,"alpha":{"k2":2,"k1":[true,null,1.5]}}"#;

/// `POST /topics/{topic}/messages` with `body`.
fn post_message(addr: SocketAddr, topic: &str, body: &str) -> Response {
    post(addr, &format!("/topics/{topic}/messages"), body)
}

/// Publishes `payload` (JSON text) over HTTP under a fresh id; checks the whole 201 reply and
/// returns the `seq` it gave.
fn publish_over_http(addr: SocketAddr, topic: &str, payload: &str) -> u64 {
    let id = Uuid::new_v4().to_string();
    let body = format!(r#"{{"id":"{id}","payload":{payload}}}"#);
    let reply = post_message(addr, topic, &body).expect_json(201);
    let seq = seq_field(&reply);
    let expected = json!({"status": "published", "topic": topic, "id": id, "seq": seq});
    assert_eq!(reply, expected);
    seq
}

/// `GET /topics/{topic}/messages{query}`, checked to be a 200.
fn history(addr: SocketAddr, topic: &str, query: &str) -> Value {
    get(addr, &format!("/topics/{topic}/messages{query}")).expect_json(200)
}

/// The history entry an event should appear as: its id, payload, seq and accept time.
fn as_history_entry(event: &Value) -> Value {
    json!({
        "id": event["message"]["id"],
        "payload": event["message"]["payload"],
        "seq": event["seq"],
        "ts": event["ts"],
    })
}

/// The `seq`s of a history reply's messages.
fn seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no `messages` array: {history}"))
        .iter()
        .map(seq_field)
        .collect()
}

/// A server with `overrides`, the topic `orders`, and a client subscribed to it with the
/// topic's epoch.
fn server_with_subscriber(overrides: &[(&str, &str)]) -> (Server, WsClient, String) {
    let server = Server::start_with(overrides);
    create_topic(server.addr, "orders");
    let mut subscriber = WsClient::connect(server.addr);
    let epoch = epoch_field(&subscriber.subscribe("orders", None));
    (server, subscriber, epoch)
}

/// Publishes `{"n": n}` for `n` in `1..=count` to `orders`, odd ones over HTTP and even ones
/// over WebSocket, and returns the events `subscriber` received for them.
fn publish_mixed(server: &Server, subscriber: &mut WsClient, count: u64) -> Vec<Value> {
    let mut publisher = WsClient::connect(server.addr);
    (1..=count)
        .map(|n| {
            let payload = json!({ "n": n });
            let seq = if n % 2 == 1 {
                publish_over_http(server.addr, "orders", &payload.to_string())
            } else {
                publisher.publish_numbered("orders", payload).1
            };
            assert_eq!(seq, n, "HTTP and WebSocket publishes share one counter");
            let event = subscriber.recv_numbered_event("orders");
            assert_eq!(seq_field(&event), n, "{event}");
            event
        })
        .collect()
}

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
    assert_eq!((seqs(&empty), seq_field(&empty)), (vec![], 0), "{empty}");
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

#[test]
fn both_messages_routes_need_the_api_key() {
    const KEY: &str = "k3y-history-secret";
    let server = Server::start_with(&[("API_KEY", KEY)]);
    let with_key = [("X-API-Key", KEY)];
    http(
        server.addr,
        "POST",
        "/topics",
        &with_key,
        r#"{"name":"orders"}"#,
    )
    .expect_json(201);
    let path = "/topics/orders/messages";
    let body = r#"{"payload":1}"#;
    for headers in [&[][..], &[("X-API-Key", "wrong")][..]] {
        http(server.addr, "POST", path, headers, body).expect_error(401, "UNAUTHORIZED");
        http(server.addr, "GET", path, headers, "").expect_error(401, "UNAUTHORIZED");
    }
    let published = http(server.addr, "POST", path, &with_key, body).expect_json(201);
    assert_eq!(seq_field(&published), 1, "an unauthorized POST published");
    let history = http(server.addr, "GET", path, &with_key, "").expect_json(200);
    assert_eq!(seqs(&history), [1]);
}

#[test]
fn history_returns_what_the_ring_holds_oldest_first_as_it_was_sent() {
    let (server, mut subscriber, epoch) = server_with_subscriber(&[("RING_SIZE", "5")]);
    let events = publish_mixed(&server, &mut subscriber, 8);
    let expected_messages: Vec<Value> = events[3..].iter().map(as_history_entry).collect();
    let expected = json!({"topic": "orders", "epoch": epoch, "seq": 8, "first_seq": 4,
        "messages": expected_messages});
    assert_eq!(history(server.addr, "orders", ""), expected);
}

#[test]
fn history_keeps_payloads_byte_for_byte() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    publish_over_http(server.addr, "orders", ODD_KEY_ORDER);
    let id = Uuid::new_v4().to_string();
    let ws_payload = r#"{"b":[2,1],"a":"x"}"#;
    let request = format!(
        r#"{{"type":"publish","topic":"orders","message":{{"id":"{id}","payload":{ws_payload}}}}}"#
    );
    let mut publisher = WsClient::connect(server.addr);
    publisher.send_message(tungstenite::Message::text(request));
    assert_eq!(seq_field(&publisher.recv_json()), 2);
    let events: Vec<Value> = (0..2)
        .map(|_| subscriber.recv_numbered_event("orders"))
        .collect();

    let response = get(server.addr, "/topics/orders/messages");
    for payload in [ODD_KEY_ORDER, ws_payload] {
        assert!(
            response.body.contains(&format!(r#""payload":{payload}"#)),
            "payload {payload} re-ordered or reformatted: {}",
            response.body
        );
    }
    let messages = response.expect_json(200)["messages"].clone();
    let expected: Vec<Value> = events.iter().map(as_history_entry).collect();
    assert_eq!(messages, json!(expected));
}

/// Checks each `(query, seqs, recovered)`: the history of `orders` (8 events published,
/// `events`, the ring holding 4 to 8) is exactly those events, oldest first, and with
/// `since_seq` says whether it holds every event after it.
fn assert_history_cases(
    server: &Server,
    events: &[Value],
    epoch: &str,
    cases: &[(&str, &[u64], Option<bool>)],
) {
    for &(query, expected_seqs, recovered) in cases {
        let reply = history(server.addr, "orders", query);
        let expected_messages: Vec<Value> = expected_seqs
            .iter()
            .map(|&seq| as_history_entry(&events[seq as usize - 1]))
            .collect();
        let mut expected = json!({"topic": "orders", "epoch": epoch, "seq": 8, "first_seq": 4,
            "messages": expected_messages});
        if let Some(recovered) = recovered {
            expected["recovered"] = json!(recovered);
        }
        assert_eq!(reply, expected, "{query}");
    }
}

#[test]
fn history_last_n_returns_the_newest_n_oldest_first() {
    let (server, mut subscriber, epoch) = server_with_subscriber(&[("RING_SIZE", "5")]);
    let events = publish_mixed(&server, &mut subscriber, 8);
    let cases: [(&str, &[u64], Option<bool>); 6] = [
        ("?last_n=3", &[6, 7, 8], None),
        ("?last_n=1", &[8], None),
        ("?last_n=0", &[], None),
        ("?last_n=5", &[4, 5, 6, 7, 8], None),
        ("?last_n=6", &[4, 5, 6, 7, 8], None),
        ("?last_n=1000", &[4, 5, 6, 7, 8], None),
    ];
    assert_history_cases(&server, &events, &epoch, &cases);
}

#[test]
fn history_since_seq_returns_the_ring_events_after_it() {
    let (server, mut subscriber, epoch) = server_with_subscriber(&[("RING_SIZE", "5")]);
    let events = publish_mixed(&server, &mut subscriber, 8);
    let cases: [(&str, &[u64], Option<bool>); 7] = [
        ("?since_seq=6", &[7, 8], Some(true)),
        ("?since_seq=7", &[8], Some(true)),
        ("?since_seq=8", &[], Some(true)),
        // Ahead of the topic: a position of another life of it, nothing to trust.
        ("?since_seq=100", &[], Some(false)),
        ("?since_seq=3", &[4, 5, 6, 7, 8], Some(true)),
        // The ring starts at 4: what it holds after 1, and `recovered: false` for the gap.
        ("?since_seq=1", &[4, 5, 6, 7, 8], Some(false)),
        ("?since_seq=0", &[4, 5, 6, 7, 8], Some(false)),
    ];
    assert_history_cases(&server, &events, &epoch, &cases);
}

#[test]
fn history_of_an_empty_or_recreated_topic_is_empty_under_its_epoch() {
    let (server, mut subscriber, epoch) = server_with_subscriber(&[]);
    let mut empty =
        json!({"topic": "orders", "epoch": epoch, "seq": 0, "first_seq": 1, "messages": []});
    assert_eq!(history(server.addr, "orders", ""), empty);
    assert_eq!(history(server.addr, "orders", "?last_n=5"), empty);
    empty["recovered"] = json!(true);
    assert_eq!(history(server.addr, "orders", "?since_seq=0"), empty);

    publish_mixed(&server, &mut subscriber, 2);
    delete(server.addr, "/topics/orders").expect_json(200);
    create_topic(server.addr, "orders");
    let recreated = history(server.addr, "orders", "");
    assert_eq!(seqs(&recreated), Vec::<u64>::new(), "{recreated}");
    assert_eq!(seq_field(&recreated), 0, "{recreated}");
    let new_epoch = recreated["epoch"].as_str().unwrap_or_default();
    assert!(
        !new_epoch.is_empty() && new_epoch != epoch,
        "a recreated topic needs a new epoch: {recreated}"
    );
    let resubscribed = WsClient::connect(server.addr).subscribe("orders", None);
    assert_eq!(epoch_field(&resubscribed), new_epoch);
}

#[test]
fn history_refuses_bad_queries_with_400_and_unknown_topics_with_404() {
    let (server, mut subscriber, _) = server_with_subscriber(&[]);
    publish_mixed(&server, &mut subscriber, 2);
    let bad_queries = [
        "?last_n=1&since_seq=0",
        "?since_seq=0&last_n=1",
        "?last_n=abc",
        "?last_n=-1",
        "?last_n=1.5",
        "?last_n=",
        "?last_n",
        "?since_seq=x",
        "?since_seq=-2",
        "?since_seq=0x1",
        "?since_seq=",
    ];
    for query in bad_queries {
        let response = get(server.addr, &format!("/topics/orders/messages{query}"));
        assert_eq!(response.status, 400, "{query} answered {response:?}");
        response.expect_error(400, "BAD_REQUEST");
    }
    for path in [
        "/topics/ghost/messages",
        "/topics/ghost/messages?last_n=1",
        "/topics/ghost/messages?since_seq=0",
    ] {
        get(server.addr, path).expect_error(404, "TOPIC_NOT_FOUND");
    }
}
