//! Heartbeats and the reaping of silent peers (docs/protocol.md, "Semantics": Heartbeat).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, subscriber_count};
use crate::ws_client::{assert_timestamp, WsClient};

/// The short heartbeat interval of these tests, as configured and as a duration: short, yet
/// long enough that a reading client's pong is never two intervals late on a loaded 2-core
/// machine running the whole suite in parallel.
const HEARTBEAT_SEC: &str = "1";
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A server beating every [`HEARTBEAT`], with the topic `orders` and one subscriber to it.
fn subscribed_client() -> (Server, WsClient) {
    let server = Server::start_with(&[("HEARTBEAT_SEC", HEARTBEAT_SEC)]);
    create_topic(server.addr, "orders");
    let mut client = WsClient::connect(server.addr);
    client.subscribe("orders", None);
    (server, client)
}

/// What a heartbeat consists of, as seen by a client.
#[derive(Debug, Default)]
struct HeartbeatsSeen {
    ping_frames: usize,
    info_pings: usize,
}

impl HeartbeatsSeen {
    /// Reads (answering pings, as tungstenite does) until `enough` holds; only heartbeat
    /// messages may arrive meanwhile.
    fn read_until(client: &mut WsClient, enough: impl Fn(&HeartbeatsSeen) -> bool) -> Self {
        let mut seen = HeartbeatsSeen::default();
        while !enough(&seen) {
            match client.recv_message() {
                Message::Ping(_) => seen.ping_frames += 1,
                Message::Text(text) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(
                        (&message["type"], &message["msg"]),
                        (&json!("info"), &json!("ping")),
                        "not a heartbeat: {message}"
                    );
                    assert_timestamp(&message);
                    seen.info_pings += 1;
                }
                other => panic!("unexpected frame between heartbeats: {other:?}"),
            }
        }
        seen
    }
}

#[test]
fn a_heartbeat_is_a_ping_frame_and_an_info_ping() {
    let (_server, mut client) = subscribed_client();
    HeartbeatsSeen::read_until(&mut client, |seen| {
        seen.ping_frames >= 1 && seen.info_pings >= 1
    });
}

#[test]
fn a_reading_client_survives_many_heartbeat_intervals() {
    let (server, mut client) = subscribed_client();
    let started = Instant::now();
    // Five info pings take at least four intervals, twice the reaping limit.
    let seen = HeartbeatsSeen::read_until(&mut client, |seen| seen.info_pings >= 5);
    assert!(
        started.elapsed() >= 4 * HEARTBEAT,
        "heartbeats too fast: {seen:?}"
    );
    assert!(seen.ping_frames >= 4, "{seen:?}");
    assert_eq!(subscriber_count(server.addr, "orders"), 1);
    WsClient::connect(server.addr).publish("orders", json!({"seq": 0}));
    loop {
        match client.recv_json() {
            event if event["type"] == "event" => break,
            heartbeat => assert_eq!(heartbeat["msg"], "ping", "{heartbeat}"),
        }
    }
}

#[test]
fn a_silent_peer_is_dropped_after_two_intervals() {
    let (server, mut client) = subscribed_client();
    let silent_since = Instant::now();
    // From here on the client never reads, so it never answers a ping.
    wait_until("the silent subscriber is removed", || {
        subscriber_count(server.addr, "orders") == 0
    });
    let silent_for = silent_since.elapsed();
    assert!(
        silent_for >= 2 * HEARTBEAT - Duration::from_millis(100),
        "dropped after {silent_for:?}, before two intervals"
    );
    client.expect_connection_ended();
}
