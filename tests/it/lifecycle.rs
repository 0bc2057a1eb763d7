//! Topic deletion with subscribers attached, and graceful shutdown on SIGTERM and SIGINT
//! (SPEC section 4).

use std::time::Duration;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use crate::harness::Server;
use crate::http_client::{create_topic, delete, health, stats};
use crate::ws_client::{assert_error, publish_request, without_ts, WsClient};

/// How much longer than `SHUTDOWN_GRACE_SEC` the process may take to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(3);

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
fn sigterm_delivers_queued_events_then_shutdown_info_then_1001() {
    assert_graceful_shutdown("TERM");
}

#[test]
fn sigint_delivers_queued_events_then_shutdown_info_then_1001() {
    assert_graceful_shutdown("INT");
}

/// With subscribers that have not read yet, `signal` must still deliver every acked event, then
/// `info server_shutdown`, then close 1001 on every connection, and the process exits 0.
fn assert_graceful_shutdown(signal: &str) {
    const GRACE: Duration = Duration::from_secs(2);
    let mut server = Server::start_with(&[("SHUTDOWN_GRACE_SEC", "2")]);
    create_topic(server.addr, "orders");
    let mut subscribers: Vec<WsClient> = (0..2)
        .map(|_| {
            let mut subscriber = WsClient::connect(server.addr);
            subscriber.subscribe("orders", None);
            subscriber
        })
        .collect();
    let mut publisher = WsClient::connect(server.addr);
    publisher.publish_sequence("orders", 0..20);

    server.signal(signal);
    for subscriber in &mut subscribers {
        assert_eq!(
            subscriber.recv_sequence("orders", 20),
            (0..20).collect::<Vec<_>>()
        );
    }
    for client in subscribers.iter_mut().chain([&mut publisher]) {
        let expected = json!({"type": "info", "msg": "server_shutdown"});
        assert_eq!(without_ts(client.recv_json()), expected);
        assert_eq!(client.expect_close(), CloseCode::Away);
    }
    let status = server
        .wait_exit(GRACE + EXIT_MARGIN)
        .expect("the server did not exit");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn an_idle_server_exits_promptly_on_sigterm() {
    let mut server = Server::start_with(&[("SHUTDOWN_GRACE_SEC", "30")]);
    let _idle_client = WsClient::connect(server.addr);
    server.sigterm();
    let status = server
        .wait_exit(EXIT_MARGIN)
        .expect("nothing to flush, yet no prompt exit");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn shutdown_stops_flushing_a_stuck_client_after_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(1);
    let mut server = Server::start_with(&[
        ("SHUTDOWN_GRACE_SEC", "1"),
        ("QUEUE_SIZE", "100000"),
        ("WRITE_TIMEOUT_SEC", "60"),
    ]);
    create_topic(server.addr, "orders");
    // Subscribed, then never reads again: its socket buffers fill and its writer blocks.
    let mut stuck = WsClient::connect(server.addr);
    stuck.subscribe("orders", None);
    let mut publisher = WsClient::connect(server.addr);
    let filler = "x".repeat(64 * 1024);
    for seq in 0..200 {
        publisher.publish("orders", json!({"seq": seq, "filler": filler}));
    }

    server.sigterm();
    let status = server
        .wait_exit(GRACE + EXIT_MARGIN)
        .expect("shutdown outlasted the grace period");
    assert_eq!(status.code(), Some(0), "{status}");
}
