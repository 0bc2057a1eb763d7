//! Replay of the latest events on subscribe (`last_n`) and its hand-over to live events
//! (docs/protocol.md, "Semantics": Replay).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use serde_json::json;

use crate::harness::{wait_until, Server};
use crate::http_client::create_topic;
use crate::ws_client::WsClient;

/// A server with `overrides` and the topic `orders` holding events `{"seq": 0..published}`.
fn server_with_history(overrides: &[(&str, &str)], published: u64) -> Server {
    let server = Server::start_with(overrides);
    create_topic(server.addr, "orders");
    WsClient::connect(server.addr).publish_sequence("orders", 0..published);
    server
}

/// Subscribes a new client with `last_n` and returns it with the `seq` of the `expected`
/// number of replayed events, checked to be all that was replayed.
fn replayed(server: &Server, last_n: Option<u64>, expected: usize) -> (WsClient, Vec<u64>) {
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", last_n);
    let sequence = subscriber.recv_sequence("orders", expected);
    subscriber.assert_nothing_pending();
    (subscriber, sequence)
}

#[test]
fn no_last_n_or_zero_replays_nothing() {
    let server = server_with_history(&[], 5);
    assert_eq!(replayed(&server, None, 0).1, Vec::<u64>::new());
    assert_eq!(replayed(&server, Some(0), 0).1, Vec::<u64>::new());
}

#[test]
fn last_n_replays_the_latest_events_oldest_first_then_live_ones() {
    let server = server_with_history(&[], 10);
    let (mut subscriber, sequence) = replayed(&server, Some(3), 3);
    assert_eq!(sequence, vec![7, 8, 9]);
    WsClient::connect(server.addr).publish_sequence("orders", 10..12);
    assert_eq!(subscriber.recv_sequence("orders", 2), vec![10, 11]);
}

#[test]
fn last_n_beyond_what_the_topic_holds_replays_all_it_holds() {
    let server = server_with_history(&[], 3);
    assert_eq!(replayed(&server, Some(50), 3).1, vec![0, 1, 2]);
}

#[test]
fn replay_is_capped_at_ring_size() {
    let server = server_with_history(&[("RING_SIZE", "5")], 12);
    assert_eq!(replayed(&server, Some(100), 5).1, vec![7, 8, 9, 10, 11]);
    assert_eq!(replayed(&server, Some(5), 5).1, vec![7, 8, 9, 10, 11]);
    assert_eq!(replayed(&server, Some(2), 2).1, vec![10, 11]);
}

#[test]
fn a_full_ring_replays_with_the_default_sizes() {
    // RING_SIZE and QUEUE_SIZE both default to 100: the ack plus a full replay of 100 events
    // must reach a reading client.
    let server = server_with_history(&[], 150);
    assert_eq!(
        replayed(&server, Some(100), 100).1,
        (50..150).collect::<Vec<_>>()
    );
}

#[test]
fn replayed_events_keep_their_id_and_accept_time() {
    let server = Server::start();
    create_topic(server.addr, "orders");
    let mut live = WsClient::connect(server.addr);
    live.subscribe("orders", None);
    WsClient::connect(server.addr).publish("orders", json!({"seq": 0}));
    let live_event = live.recv_json();

    let mut late = WsClient::connect(server.addr);
    late.subscribe("orders", Some(1));
    let replayed_event = late.recv_json();
    assert_eq!(replayed_event, live_event);
}

#[test]
fn replay_hands_over_to_live_events_without_gap_or_duplicate() {
    // Subscribers join at these points of a running publisher; each asks for the whole history.
    const JOIN_AFTER: [u64; 3] = [100, 1000, 2000];
    const MIN_PUBLISHED: u64 = 3000;
    let server = Server::start_with(&[("RING_SIZE", "100000"), ("QUEUE_SIZE", "100000")]);
    create_topic(server.addr, "orders");

    let published = Arc::new(AtomicU64::new(0));
    let all_joined = Arc::new(AtomicBool::new(false));
    let publisher = {
        let mut publisher = WsClient::connect(server.addr);
        let (published, all_joined) = (Arc::clone(&published), Arc::clone(&all_joined));
        thread::spawn(move || {
            let mut seq = 0;
            // Keeps publishing until every subscriber has joined, so each joins mid-stream.
            while seq < MIN_PUBLISHED || !all_joined.load(Ordering::SeqCst) {
                publisher.publish("orders", json!({ "seq": seq }));
                seq += 1;
                published.store(seq, Ordering::SeqCst);
            }
            publisher.publish("orders", json!({"seq": seq, "last": true}));
        })
    };

    let readers: Vec<_> = JOIN_AFTER
        .into_iter()
        .map(|join_after| {
            wait_until(&format!("{join_after} events are published"), || {
                published.load(Ordering::SeqCst) >= join_after
            });
            let mut subscriber = WsClient::connect(server.addr);
            subscriber.subscribe("orders", Some(100_000));
            thread::spawn(move || subscriber.recv_sequence_until_last("orders"))
        })
        .collect();
    all_joined.store(true, Ordering::SeqCst);
    publisher.join().unwrap();

    for (reader, join_after) in readers.into_iter().zip(JOIN_AFTER) {
        let sequence = reader.join().unwrap();
        let expected: Vec<u64> = (0..sequence.len() as u64).collect();
        assert!(
            sequence == expected,
            "subscriber joining after {join_after}: gap, duplicate or disorder near index {:?}",
            sequence
                .iter()
                .zip(&expected)
                .position(|(got, want)| got != want)
        );
    }
}
