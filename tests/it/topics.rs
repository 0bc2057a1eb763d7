//! Topics over REST: creating (`201`, `409`, the name rules, any `Content-Type`), listing
//! sorted with subscriber counts, deleting (`200`, then `404`) and what a deletion tells the
//! topic's subscribers, and the per-topic counts of `GET /stats`.

use serde_json::json;
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, delete, get, health, http, post, stats};
use crate::ws_client::{assert_error, publish_request, without_ts, WsClient};

/// The only characters a topic name may hold (docs/protocol.md, "REST API").
const ALLOWED_NAME_CHARACTERS: &str =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:";

#[test]
fn creating_a_topic_returns_201_and_a_second_time_409() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_error(409, "TOPIC_EXISTS");
}

#[test]
fn create_accepts_the_body_whatever_its_content_type() {
    let server = Server::start();
    let content_types = [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
    ];
    for (index, content_type) in content_types.into_iter().enumerate() {
        let name = format!("topic-{index}");
        let body = json!({ "name": name }).to_string();
        let response = http(
            server.addr,
            "POST",
            "/topics",
            &[("Content-Type", content_type)],
            &body,
        );
        assert_eq!(
            response.expect_json(201)["topic"],
            name.as_str(),
            "{content_type}"
        );
    }
}

#[test]
fn create_rejects_bad_bodies_with_400() {
    let server = Server::start();
    let too_long = format!(r#"{{"name":"{}"}}"#, "a".repeat(129));
    let bad_bodies = [
        "",
        "   ",
        "{",
        "name=orders",
        r#"{"name":"orders""#,
        "[]",
        "null",
        r#""orders""#,
        "{}",
        r#"{"topic":"orders"}"#,
        r#"{"name":null}"#,
        r#"{"name":5}"#,
        r#"{"name":["orders"]}"#,
        r#"{"name":""}"#,
        r#"{"name":"has space"}"#,
        r#"{"name":"a/b"}"#,
        r#"{"name":"a?b"}"#,
        r#"{"name":"caf\u00e9"}"#,
        r#"{"name":"tab\there"}"#,
        &too_long,
    ];
    for body in bad_bodies {
        post(server.addr, "/topics", body).expect_error(400, "BAD_REQUEST");
    }
    let listed = get(server.addr, "/topics").expect_json(200);
    assert_eq!(
        listed,
        json!({"topics": []}),
        "a bad request created a topic"
    );
}

#[test]
fn a_name_of_128_allowed_characters_is_accepted_and_deletable() {
    let server = Server::start();
    let name: String = ALLOWED_NAME_CHARACTERS.chars().cycle().take(128).collect();
    create_topic(server.addr, &name);
    let deleted = delete(server.addr, &format!("/topics/{name}")).expect_json(200);
    assert_eq!(deleted, json!({"status": "deleted", "topic": name}));
}

#[test]
fn topics_are_listed_sorted_by_name_with_subscriber_counts() {
    let server = Server::start();
    assert_eq!(
        get(server.addr, "/topics").expect_json(200),
        json!({"topics": []})
    );
    for name in ["orders", "alerts", "Zebra", "metrics.cpu"] {
        create_topic(server.addr, name);
    }
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    subscriber.subscribe("alerts", None);
    let mut other_subscriber = WsClient::connect(server.addr);
    other_subscriber.subscribe("orders", None);

    let listed = get(server.addr, "/topics").expect_json(200);
    let expected = json!({"topics": [
        {"name": "Zebra", "subscribers": 0},
        {"name": "alerts", "subscribers": 1},
        {"name": "metrics.cpu", "subscribers": 0},
        {"name": "orders", "subscribers": 2},
    ]});
    assert_eq!(listed, expected);
}

#[test]
fn deleting_a_topic_returns_200_then_404() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    let deleted = delete(server.addr, "/topics/orders").expect_json(200);
    assert_eq!(deleted, json!({"status": "deleted", "topic": "orders"}));
    delete(server.addr, "/topics/orders").expect_error(404, "TOPIC_NOT_FOUND");
    delete(server.addr, "/topics/never-created").expect_error(404, "TOPIC_NOT_FOUND");
    assert_eq!(
        get(server.addr, "/topics").expect_json(200),
        json!({"topics": []})
    );
}

#[test]
fn deleting_a_topic_tells_its_subscribers_and_keeps_their_connections() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    create_topic(server.addr, "alerts");
    let mut subscribers: Vec<WsClient> = (0..2)
        .map(|_| {
            let mut subscriber = WsClient::connect(server.addr);
            subscriber.subscribe("orders", None);
            subscriber.subscribe("alerts", None);
            subscriber
        })
        .collect();

    delete(server.addr, "/topics/orders").expect_json(200);
    for subscriber in &mut subscribers {
        let expected = json!({"type": "info", "topic": "orders", "msg": "topic_deleted"});
        assert_eq!(without_ts(subscriber.recv_json()), expected);
        subscriber.ping();
    }
    assert_eq!(stats(server.addr)["topics"].get("orders"), None);
    assert_eq!(
        health(server.addr)["subscribers"],
        2,
        "only the alerts subscriptions remain"
    );

    let mut publisher = WsClient::connect(server.addr);
    let id = Uuid::new_v4().to_string();
    assert_error(
        &publisher.request(publish_request("orders", &id, json!(1))),
        "TOPIC_NOT_FOUND",
    );
    // A topic created again under the old name starts without the old subscribers.
    create_topic(server.addr, "orders");
    publisher.publish("orders", json!({"seq": 0}));
    publisher.publish("alerts", json!({"seq": 1}));
    for subscriber in &mut subscribers {
        assert_eq!(subscriber.recv_sequence("alerts", 1), vec![1]);
        subscriber.assert_nothing_pending();
    }
}

#[test]
fn stats_count_every_publish_even_beyond_the_ring() {
    let server = Server::start_with(&[("RING_SIZE", "5")]);
    create_topic(server.addr, "orders");
    create_topic(server.addr, "idle");
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    WsClient::connect(server.addr).publish_sequence("orders", 0..8);

    let expected = json!({"topics": {
        "orders": {"messages": 8, "subscribers": 1},
        "idle": {"messages": 0, "subscribers": 0},
    }});
    assert_eq!(stats(server.addr), expected);

    delete(server.addr, "/topics/idle").expect_json(200);
    assert_eq!(stats(server.addr)["topics"].get("idle"), None);
}
