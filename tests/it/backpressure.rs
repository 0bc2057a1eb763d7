//! The slow consumer: a subscriber whose queue overflows is cut, told why, and closed, while
//! everyone else carries on (docs/protocol.md, "Backpressure: the slow-consumer policy").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, health, subscriber_count};
use crate::ws_client::{assert_error, seq, WsClient};

/// Bytes of filler per event, so a few hundred events fill the kernel's socket buffers.
const FILLER_BYTES: usize = 64 * 1024;

/// How far the publisher may run ahead of the reading subscriber: well within what its queue
/// (QUEUE_SIZE=8) and socket buffers hold.
const READER_WINDOW: u64 = 4;

/// Publishes beyond this many without a cut mean the server never cuts slow consumers.
const MAX_EVENTS: u64 = 3000;

#[test]
fn a_slow_consumer_gets_slow_consumer_then_1008_while_others_carry_on() {
    let server = Server::start_with(&[("QUEUE_SIZE", "8"), ("WRITE_TIMEOUT_SEC", "60")]);
    create_topic(server.addr, "orders");
    let mut slow = WsClient::connect(server.addr);
    slow.subscribe("orders", None);
    let mut reader = WsClient::connect(server.addr);
    reader.subscribe("orders", None);
    // The reading subscriber reports its progress, and the publisher stays at most
    // READER_WINDOW events ahead of it: on a loaded machine its thread may be starved for a
    // while, and it must not become a slow consumer itself. The slow one never reads at all.
    let read_so_far = Arc::new(AtomicU64::new(0));
    let reader = {
        let read_so_far = Arc::clone(&read_so_far);
        thread::spawn(move || {
            let mut received = Vec::new();
            loop {
                let payload = reader.recv_event("orders")["payload"].clone();
                received.push(seq(&payload));
                read_so_far.store(received.len() as u64, Ordering::SeqCst);
                if payload["last"] == true {
                    return received;
                }
            }
        })
    };

    // Publish until /stats shows the slow subscriber gone; every publish must still be acked.
    let mut publisher = WsClient::connect(server.addr);
    let filler = "x".repeat(FILLER_BYTES);
    let cut_at = (0..MAX_EVENTS)
        .find(|&seq| {
            wait_until("the reading subscriber keeps up", || {
                read_so_far.load(Ordering::SeqCst) + READER_WINDOW >= seq
            });
            publisher.publish("orders", json!({"seq": seq, "filler": filler}));
            subscriber_count(server.addr, "orders") == 1
        })
        .expect("the slow subscriber was never cut");
    assert_eq!(health(server.addr)["subscribers"], 1);
    publisher.publish("orders", json!({"seq": cut_at + 1, "last": true}));

    let read_by_reader = reader.join().unwrap();
    assert_eq!(read_by_reader, (0..=cut_at + 1).collect::<Vec<_>>());

    // Now the slow client reads: a prefix of the events without gaps, the error, the close.
    let mut read_by_slow = Vec::new();
    let error = loop {
        let message = slow.recv_json();
        if message["type"] != "event" {
            break message;
        }
        read_by_slow.push(seq(&message["message"]["payload"]));
    };
    assert_error(&error, "SLOW_CONSUMER");
    assert_eq!(
        read_by_slow,
        (0..read_by_slow.len() as u64).collect::<Vec<_>>()
    );
    assert!(
        (read_by_slow.len() as u64) <= cut_at,
        "event {cut_at}, which did not fit, was delivered"
    );
    assert_eq!(slow.expect_close(), CloseCode::Policy);
}
