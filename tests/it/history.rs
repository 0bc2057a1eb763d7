//! History, `GET /topics/{name}/messages`: what the topic's ring holds, oldest first and byte
//! for byte as published (over HTTP or WebSocket alike), the newest N with `last_n`, those after
//! a position with `since_seq` (and whether that is all of them), a new epoch for a recreated
//! topic, and `400`/`404` for bad queries and unknown topics.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, delete, get, history, history_seqs, publish_over_http};
use crate::ws_client::{epoch_field, seq_field, WsClient};

/// A payload whose key order a parse into a sorted map would lose.
const ODD_KEY_ORDER: &str = r#"{"zeta":1,"alpha":{"k2":2,"k1":[true,null,1.5]}}"#;

/// The history entry an event should appear as: its id, payload, seq and accept time.
fn as_history_entry(event: &Value) -> Value {
    json!({
        "id": event["message"]["id"],
        "payload": event["message"]["payload"],
        "seq": event["seq"],
        "ts": event["ts"],
    })
}

/// A server with `overrides`, the topic `orders`, and a client subscribed to it with the
/// topic's epoch. Also for the tests of HTTP publish.
pub(crate) fn server_with_subscriber(overrides: &[(&str, &str)]) -> (Server, WsClient, String) {
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
    assert_eq!(history_seqs(&recreated), Vec::<u64>::new(), "{recreated}");
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
