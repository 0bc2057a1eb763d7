//! A panic in one connection's thread: with the debug-build test hook
//! `PUBSUB_BACKEND_TEST_PANIC_TOPIC=boom`, publishing to `boom` panics while holding the broker
//! lock. The poisoned lock is recovered: the panicking connection is closed (1011) and its
//! subscriptions are gone, everyone else carries on, and the process lives. Over HTTP publish,
//! the request gets a 500 error and the REST workers live on.
//!
//! A release build has no such hook, so this module is compiled only with debug assertions
//! (`cargo test`, not `cargo test --release`).

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::Server;
use crate::http_client::{create_topic, delete, health, post, stats};
use crate::ws_client::{publish_request, WsClient};

/// The topic whose publishes panic.
const BOOM: &str = "boom";

/// Connections allowed at once: few, so that a connection slot not freed by a panic shows.
const MAX_CONNECTIONS: &str = "4";

/// Panics provoked, more than [`MAX_CONNECTIONS`].
const PANICS: usize = 6;

#[test]
fn a_panic_under_the_broker_lock_closes_only_its_connection() {
    let server = Server::start_with(&[
        ("PUBSUB_BACKEND_TEST_PANIC_TOPIC", BOOM),
        ("MAX_CONNECTIONS", MAX_CONNECTIONS),
    ]);
    let addr = server.addr;
    create_topic(addr, BOOM);
    create_topic(addr, "orders");
    let mut bystander = WsClient::connect(addr);
    bystander.subscribe("orders", None);
    bystander.subscribe(BOOM, None);

    for round in 0..PANICS {
        let mut victim = WsClient::connect(addr);
        victim.subscribe("orders", None);
        victim.subscribe(BOOM, None);
        assert_eq!(stats(addr)["topics"][BOOM]["subscribers"], 2);
        let id = uuid::Uuid::new_v4().to_string();
        victim.send_json(&publish_request(BOOM, &id, json!({"round": round})));
        // The victim's connection ends with 1011 (internal error); nothing was published.
        loop {
            match victim.try_recv_message() {
                Ok(tungstenite::Message::Close(frame)) => {
                    let code = frame.as_ref().map(|frame| frame.code);
                    assert_eq!(code, Some(CloseCode::Error), "round {round}: {frame:?}");
                    break;
                }
                Ok(tungstenite::Message::Text(text)) => panic!("the victim got {text}"),
                Ok(_) => continue,
                Err(error) => panic!("round {round}: no close 1011 but {error}"),
            }
        }

        // The broker works: its counts dropped the victim, and everyone else is served.
        let topics = stats(addr)["topics"].clone();
        assert_eq!(topics[BOOM]["subscribers"], 1, "round {round}: {topics}");
        assert_eq!(
            topics["orders"]["subscribers"], 1,
            "round {round}: {topics}"
        );
        assert_eq!(topics[BOOM]["messages"], 0, "round {round}: {topics}");
        let mut publisher = WsClient::connect(addr);
        publisher.publish("orders", json!({"round": round}));
        assert_eq!(
            bystander.recv_event("orders")["payload"],
            json!({"round": round})
        );
        bystander.assert_nothing_pending();
        publisher.close();
    }

    // Every other operation still works on the recovered lock.
    let mut client = WsClient::connect(addr);
    client.subscribe("orders", Some(10));
    for round in 0..PANICS {
        assert_eq!(
            client.recv_event("orders")["payload"],
            json!({"round": round}),
            "the replay after the panics"
        );
    }
    client.unsubscribe("orders");
    create_topic(addr, "after");
    delete(addr, "/topics/after").expect_json(200);
    delete(addr, &format!("/topics/{BOOM}")).expect_json(200);
    assert_eq!(
        bystander.recv_json()["msg"],
        "topic_deleted",
        "the bystander is told {BOOM} was deleted"
    );
    assert_eq!(health(addr)["subscribers"], 1);

    assert_each_panic_logged_once(&server, "panicked");
}

/// The same panic reached over HTTP publish: each request gets a 500 error, and the REST workers
/// (two) live on to serve every request after it.
#[test]
fn a_panic_in_a_rest_handler_answers_500_and_rest_keeps_working() {
    let server = Server::start_with(&[("PUBSUB_BACKEND_TEST_PANIC_TOPIC", BOOM)]);
    let addr = server.addr;
    create_topic(addr, BOOM);
    create_topic(addr, "orders");
    let path = format!("/topics/{BOOM}/messages");
    for round in 0..PANICS {
        let answer = post(addr, &path, &format!(r#"{{"payload":{round}}}"#));
        answer.expect_error(500, "INTERNAL");
        let published = post(addr, "/topics/orders/messages", r#"{"payload":1}"#);
        assert_eq!(published.expect_json(201)["seq"], round + 1);
    }
    let topics = stats(addr)["topics"].clone();
    assert_eq!(topics[BOOM]["messages"], 0, "{topics}");
    assert_eq!(topics["orders"]["messages"], PANICS, "{topics}");
    assert_each_panic_logged_once(&server, "REST handler panicked");
}

fn assert_each_panic_logged_once(server: &Server, text: &str) {
    let panics = server
        .log_lines()
        .iter()
        .filter(|line| line.contains(" ERROR ") && line.contains(text))
        .count();
    assert_eq!(panics, PANICS, "each panic is logged once");
}
