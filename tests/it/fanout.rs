//! Delivery of published events: exactly once, in order, to every subscriber of the topic and
//! no other (docs/protocol.md, "Semantics": Subscriptions and Fan-out).

use std::thread;

use serde_json::{json, Value};
use tungstenite::Message;
use uuid::Uuid;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, health, subscriber_count};
use crate::ws_client::{assert_ack, assert_timestamp, publish_request, seq, WsClient};

/// A server with the given topics.
fn server_with_topics(topics: &[&str]) -> Server {
    // A roomy queue: these tests read one subscriber after another, and on a loaded machine
    // a writer may not get the CPU in time to move 100 events to its socket. Backpressure has
    // its own tests.
    let server = Server::start_with(&[("QUEUE_SIZE", "10000")]);
    for topic in topics {
        create_topic(server.addr, topic);
    }
    server
}

/// A client subscribed to each of `topics`.
fn subscriber(server: &Server, topics: &[&str]) -> WsClient {
    let mut client = WsClient::connect(server.addr);
    for topic in topics {
        client.subscribe(topic, None);
    }
    client
}

#[test]
fn every_subscriber_receives_every_event_once_in_order() {
    let server = server_with_topics(&["orders"]);
    let mut subscribers: Vec<WsClient> = (0..5).map(|_| subscriber(&server, &["orders"])).collect();
    WsClient::connect(server.addr).publish_sequence("orders", 0..30);
    for subscriber in &mut subscribers {
        assert_eq!(
            subscriber.recv_sequence("orders", 30),
            (0..30).collect::<Vec<_>>()
        );
        subscriber.assert_nothing_pending();
    }
}

#[test]
fn an_event_carries_the_published_id_and_payload_unchanged() {
    let server = server_with_topics(&["orders"]);
    let mut subscriber = subscriber(&server, &["orders"]);
    let mut publisher = WsClient::connect(server.addr);
    let payloads = [
        json!({"z": 1, "a": [3, {"y": null, "b": true}], "m": "caf\u{e9} \u{1F600} \"quoted\"\n"}),
        json!([1, 2.5, -3, 18446744073709551615u64, "x"]),
        json!("just a string"),
        json!(42),
        json!(null),
        json!(false),
    ];
    for payload in payloads {
        let id = publisher.publish("orders", payload.clone());
        let text = subscriber.recv_text();
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["type"], "event", "{text}");
        assert_eq!(event["topic"], "orders", "{text}");
        assert_eq!(
            event["message"],
            json!({"id": id, "payload": payload}),
            "{text}"
        );
        assert_timestamp(&event);
    }
    // Key order is part of "byte-for-byte re-serialized": check the raw text.
    let in_odd_key_order = r#"{"zeta":1,"alpha":{"k2":2,"k1":1}}"#;
    let id = Uuid::new_v4().to_string();
    let request = format!(
        r#"{{"type":"publish","topic":"orders","message":{{"id":"{id}","payload":{in_odd_key_order}}}}}"#
    );
    publisher.send_message(Message::text(request));
    assert_ack(&publisher.recv_json(), "orders");
    let text = subscriber.recv_text();
    assert!(
        text.contains(in_odd_key_order),
        "payload re-ordered or reformatted: {text}"
    );
}

#[test]
fn subscribers_see_concurrent_publishes_in_one_order() {
    const PER_PUBLISHER: u64 = 150;
    let server = server_with_topics(&["orders"]);
    let mut first = subscriber(&server, &["orders"]);
    let mut second = subscriber(&server, &["orders"]);
    let publishers: Vec<_> = (0..2)
        .map(|publisher_id| {
            let mut publisher = WsClient::connect(server.addr);
            thread::spawn(move || {
                for seq in 0..PER_PUBLISHER {
                    publisher.publish("orders", json!({"publisher": publisher_id, "seq": seq}));
                }
            })
        })
        .collect();
    let total = 2 * PER_PUBLISHER as usize;
    let seen_by_first = first.recv_payloads("orders", total);
    let seen_by_second = second.recv_payloads("orders", total);
    for publisher in publishers {
        publisher.join().unwrap();
    }
    assert_eq!(
        seen_by_first, seen_by_second,
        "subscribers disagree on the order"
    );
    for publisher_id in 0..2 {
        let from_publisher: Vec<u64> = seen_by_first
            .iter()
            .filter(|payload| payload["publisher"] == publisher_id)
            .map(seq)
            .collect();
        assert_eq!(from_publisher, (0..PER_PUBLISHER).collect::<Vec<_>>());
    }
    first.assert_nothing_pending();
    second.assert_nothing_pending();
}

#[test]
fn topics_are_isolated() {
    let server = server_with_topics(&["orders", "alerts"]);
    let mut orders = subscriber(&server, &["orders"]);
    let mut alerts = subscriber(&server, &["alerts"]);
    let mut publisher = WsClient::connect(server.addr);
    for seq in 0..10 {
        publisher.publish("orders", json!({"seq": seq}));
        publisher.publish("alerts", json!({"seq": 100 + seq}));
    }
    assert_eq!(
        orders.recv_sequence("orders", 10),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(
        alerts.recv_sequence("alerts", 10),
        (100..110).collect::<Vec<_>>()
    );
    orders.assert_nothing_pending();
    alerts.assert_nothing_pending();
}

#[test]
fn connections_sharing_a_client_id_each_receive_events() {
    let server = server_with_topics(&["orders"]);
    let mut connections: Vec<WsClient> = (0..3)
        .map(|_| {
            let mut connection = WsClient::connect_as(server.addr, "shared-id");
            connection.subscribe("orders", None);
            connection
        })
        .collect();
    assert_eq!(subscriber_count(server.addr, "orders"), 3);
    WsClient::connect(server.addr).publish_sequence("orders", 0..5);
    for connection in &mut connections {
        assert_eq!(
            connection.recv_sequence("orders", 5),
            (0..5).collect::<Vec<_>>()
        );
        connection.assert_nothing_pending();
    }
}

#[test]
fn subscribing_again_on_the_same_connection_changes_nothing() {
    let server = server_with_topics(&["orders"]);
    let mut publisher = WsClient::connect(server.addr);
    publisher.publish_sequence("orders", 0..3);
    let mut subscriber = subscriber(&server, &["orders"]);
    // Acked again, with no replay even though last_n asks for one.
    subscriber.subscribe("orders", Some(3));
    subscriber.assert_nothing_pending();
    assert_eq!(subscriber_count(server.addr, "orders"), 1);

    publisher.publish_sequence("orders", 3..5);
    assert_eq!(subscriber.recv_sequence("orders", 2), vec![3, 4]);
    subscriber.assert_nothing_pending();
}

#[test]
fn a_publisher_subscribed_to_the_topic_receives_its_own_event() {
    let server = server_with_topics(&["orders"]);
    let mut client = subscriber(&server, &["orders"]);
    let id = Uuid::new_v4().to_string();
    let mut request = publish_request("orders", &id, json!({"mine": true}));
    request["request_id"] = json!("own");
    client.send_json(&request);
    // What this test protects is that both arrive, once each; it takes them in either order.
    let replies = [client.recv_json(), client.recv_json()];
    let ack = replies.iter().find(|reply| reply["type"] == "ack");
    let event = replies.iter().find(|reply| reply["type"] == "event");
    assert_eq!(
        ack.map(|ack| &ack["request_id"]),
        Some(&json!("own")),
        "{replies:?}"
    );
    let expected = json!({"id": id, "payload": {"mine": true}});
    assert_eq!(
        event.map(|event| &event["message"]),
        Some(&expected),
        "{replies:?}"
    );
    client.assert_nothing_pending();
}

#[test]
fn unsubscribing_stops_delivery() {
    let server = server_with_topics(&["orders"]);
    let mut subscriber = subscriber(&server, &["orders"]);
    subscriber.unsubscribe("orders");
    assert_eq!(subscriber_count(server.addr, "orders"), 0);
    WsClient::connect(server.addr).publish_sequence("orders", 0..3);
    subscriber.assert_nothing_pending();
}

#[test]
fn one_connection_holds_many_topics() {
    let server = server_with_topics(&["orders", "alerts", "quiet"]);
    let mut subscriber = subscriber(&server, &["orders", "alerts"]);
    assert_eq!(health(server.addr)["subscribers"], 2);
    let mut publisher = WsClient::connect(server.addr);
    publisher.publish("orders", json!({"seq": 1}));
    publisher.publish("quiet", json!({"seq": 2}));
    publisher.publish("alerts", json!({"seq": 3}));
    assert_eq!(subscriber.recv_sequence("orders", 1), vec![1]);
    assert_eq!(subscriber.recv_sequence("alerts", 1), vec![3]);
    subscriber.unsubscribe("orders");
    publisher.publish("orders", json!({"seq": 4}));
    publisher.publish("alerts", json!({"seq": 5}));
    assert_eq!(subscriber.recv_sequence("alerts", 1), vec![5]);
    subscriber.assert_nothing_pending();
}

#[test]
fn closing_a_connection_removes_its_subscriptions() {
    let server = server_with_topics(&["orders", "alerts"]);
    let mut leaving = subscriber(&server, &["orders", "alerts"]);
    let mut staying = subscriber(&server, &["orders"]);
    assert_eq!(health(server.addr)["subscribers"], 3);
    leaving.close();
    wait_until("the closed connection's subscriptions are removed", || {
        health(server.addr)["subscribers"] == 1
    });
    drop(leaving);

    // Dropping the client closes the TCP connection without a close frame.
    drop(subscriber(&server, &["alerts"]));
    wait_until("a reset connection's subscription is removed", || {
        subscriber_count(server.addr, "alerts") == 0
    });
    WsClient::connect(server.addr).publish("orders", json!({"seq": 1}));
    assert_eq!(staying.recv_sequence("orders", 1), vec![1]);
}
