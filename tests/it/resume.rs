//! Offsets and resume: every event, publish ack and subscribe ack carries its place in
//! the topic, and a `subscribe` with `since_seq` and `epoch` replays exactly what a client
//! missed, or says `recovered: false` when it cannot.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, delete, subscriber_count};
use crate::ws_client::{assert_error, epoch_field, seq_field, without_ts, WsClient};

/// A server with `overrides` and the empty topic `orders`.
fn server_with_orders(overrides: &[(&str, &str)]) -> Server {
    let server = Server::start_with(overrides);
    create_topic(server.addr, "orders");
    server
}

/// A new client subscribed to `orders` (no replay), with the epoch its ack gave.
fn subscriber(server: &Server) -> (WsClient, String) {
    let mut client = WsClient::connect(server.addr);
    let ack = client.subscribe("orders", None);
    (client, epoch_field(&ack))
}

/// Publishes `{"n": n}` to `orders` for every `n` in `range` from a new connection, checking
/// that each ack numbers the message `n` (the caller knows `range` continues the topic).
fn publish_numbered(server: &Server, range: RangeInclusive<u64>) {
    let mut publisher = WsClient::connect(server.addr);
    for n in range {
        let (_, seq) = publisher.publish_numbered("orders", json!({ "n": n }));
        assert_eq!(seq, n, "the publish ack of message {n} gives seq {seq}");
    }
}

/// The `seq` of the next `count` events of `orders`, each checked to be the number its payload
/// was published under.
fn recv_numbered(client: &mut WsClient, count: u64) -> Vec<u64> {
    (0..count)
        .map(|_| {
            let event = client.recv_numbered_event("orders");
            assert_eq!(
                event["seq"], event["message"]["payload"]["n"],
                "event numbered apart from its publish: {event}"
            );
            seq_field(&event)
        })
        .collect()
}

/// Where two sequences first differ, for a readable failure on long ones.
fn first_difference(got: &[u64], want: &[u64]) -> Option<usize> {
    (0..got.len().max(want.len())).find(|&index| got.get(index) != want.get(index))
}

#[test]
fn publish_acks_and_events_carry_consecutive_seqs_from_1() {
    let server = server_with_orders(&[]);
    let (mut subscriber, _) = subscriber(&server);
    let mut publisher = WsClient::connect(server.addr);
    for expected in 1..=5 {
        let (id, seq) = publisher.publish_numbered("orders", json!({ "n": expected }));
        assert_eq!(seq, expected, "publish ack seq");
        let event = subscriber.recv_numbered_event("orders");
        let expected_event = json!({
            "type": "event",
            "topic": "orders",
            "message": {"id": id, "payload": {"n": expected}},
            "seq": expected,
        });
        assert_eq!(without_ts(event), expected_event);
    }
    // The whole publish ack: `type`, `request_id`, `status` and `topic` (and `ts`), plus `seq`.
    publisher.send_json(&json!({
        "type": "publish",
        "request_id": "p6",
        "topic": "orders",
        "message": {"id": uuid::Uuid::new_v4().to_string(), "payload": {"n": 6}},
    }));
    let ack = without_ts(publisher.recv_json());
    let expected_ack =
        json!({"type": "ack", "request_id": "p6", "status": "ok", "topic": "orders", "seq": 6});
    assert_eq!(ack, expected_ack);
    assert_eq!(recv_numbered(&mut subscriber, 1), [6]);

    // Events replayed by `last_n` keep their numbers.
    let mut late = WsClient::connect(server.addr);
    late.subscribe("orders", Some(2));
    assert_eq!(recv_numbered(&mut late, 2), [5, 6]);
}

#[test]
fn subscribe_acks_carry_the_epoch_and_the_last_seq() {
    let server = server_with_orders(&[]);
    create_topic(server.addr, "alerts");
    let mut client = WsClient::connect(server.addr);
    let fresh = client.subscribe("orders", None);
    assert_eq!(seq_field(&fresh), 0, "no message published yet: {fresh}");
    let epoch = epoch_field(&fresh);

    publish_numbered(&server, 1..=3);
    assert_eq!(recv_numbered(&mut client, 3), [1, 2, 3]);
    let mut other = WsClient::connect(server.addr);
    let later = other.subscribe("orders", None);
    assert_eq!(seq_field(&later), 3, "{later}");
    assert_eq!(
        epoch_field(&later),
        epoch,
        "the epoch changed without a recreate"
    );
    let replaying = WsClient::connect(server.addr).subscribe("orders", Some(1));
    assert_eq!(seq_field(&replaying), 3, "{replaying}");
    assert_eq!(epoch_field(&replaying), epoch);
    // Subscribing again on the same connection is acked with the position too.
    let again = client.subscribe("orders", None);
    assert_eq!((epoch_field(&again), seq_field(&again)), (epoch.clone(), 3));

    let alerts = client.subscribe("alerts", None);
    assert_eq!(seq_field(&alerts), 0, "{alerts}");
    assert_ne!(
        epoch_field(&alerts),
        epoch,
        "two topics share an epoch: {alerts}"
    );
}

#[test]
fn a_recreated_topic_gets_a_new_epoch_and_numbers_from_1_again() {
    let server = server_with_orders(&[]);
    let mut epochs = Vec::new();
    for _ in 0..3 {
        let (mut subscriber, epoch) = subscriber(&server);
        assert!(
            !epochs.contains(&epoch),
            "epoch {epoch} reused after a recreate: {epochs:?}"
        );
        epochs.push(epoch);
        publish_numbered(&server, 1..=2);
        assert_eq!(recv_numbered(&mut subscriber, 2), [1, 2]);
        delete(server.addr, "/topics/orders").expect_json(200);
        create_topic(server.addr, "orders");
    }
}

#[test]
fn resume_replays_exactly_the_missed_events_as_sent_then_live_ones() {
    let server = server_with_orders(&[]);
    let (mut witness, epoch) = subscriber(&server);
    let (mut client, _) = subscriber(&server);
    publish_numbered(&server, 1..=3);
    assert_eq!(recv_numbered(&mut client, 3), [1, 2, 3]);
    drop(client);
    publish_numbered(&server, 4..=7);
    let sent_live: Vec<Value> = (0..7)
        .map(|_| witness.recv_numbered_event("orders"))
        .collect();

    let mut resumed = WsClient::connect(server.addr);
    let ack = resumed.subscribe_since("orders", 3, &epoch);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!((epoch_field(&ack), seq_field(&ack)), (epoch, 7), "{ack}");
    // The very frames sent live: same id, payload, accept time and seq.
    for expected in &sent_live[3..] {
        assert_eq!(resumed.recv_numbered_event("orders"), *expected);
    }
    resumed.assert_nothing_pending();

    publish_numbered(&server, 8..=8);
    assert_eq!(recv_numbered(&mut resumed, 1), [8]);
    assert_eq!(recv_numbered(&mut witness, 1), [8]);
}

#[test]
fn resume_from_the_last_seq_or_from_0_recovers() {
    let server = server_with_orders(&[]);
    let (_keep, epoch) = subscriber(&server);
    publish_numbered(&server, 1..=4);

    let mut up_to_date = WsClient::connect(server.addr);
    let ack = up_to_date.subscribe_since("orders", 4, &epoch);
    assert_eq!(ack["recovered"], true, "nothing was missed: {ack}");
    assert_eq!(seq_field(&ack), 4);
    up_to_date.assert_nothing_pending();

    let mut from_start = WsClient::connect(server.addr);
    let ack = from_start.subscribe_since("orders", 0, &epoch);
    assert_eq!(ack["recovered"], true, "the ring holds every event: {ack}");
    assert_eq!(recv_numbered(&mut from_start, 4), [1, 2, 3, 4]);
    from_start.assert_nothing_pending();

    publish_numbered(&server, 5..=5);
    assert_eq!(recv_numbered(&mut up_to_date, 1), [5]);
    assert_eq!(recv_numbered(&mut from_start, 1), [5]);
}

#[test]
fn resume_with_another_epoch_or_from_beyond_the_last_seq_is_not_recovered() {
    let server = server_with_orders(&[]);
    let (_keep, epoch) = subscriber(&server);
    publish_numbered(&server, 1..=4);

    let other_epoch = if epoch == "0000000000000000" {
        "1111111111111111"
    } else {
        "0000000000000000"
    };
    let positions = [
        (2, other_epoch),
        (0, other_epoch),
        (5, epoch.as_str()),
        (100, epoch.as_str()),
    ];
    let mut clients = Vec::new();
    for (since_seq, given_epoch) in positions {
        let mut client = WsClient::connect(server.addr);
        let ack = client.subscribe_since("orders", since_seq, given_epoch);
        assert_eq!(
            ack["recovered"], false,
            "since_seq {since_seq} of epoch {given_epoch} (topic at 4 of {epoch}): {ack}"
        );
        assert_eq!((epoch_field(&ack), seq_field(&ack)), (epoch.clone(), 4));
        client.assert_nothing_pending();
        clients.push(client);
    }
    // Not recovered, but subscribed: live events follow.
    publish_numbered(&server, 5..=5);
    for client in &mut clients {
        assert_eq!(recv_numbered(client, 1), [5]);
    }
}

#[test]
fn resume_after_the_ring_wrapped_is_not_recovered_and_live_events_follow() {
    let server = server_with_orders(&[("RING_SIZE", "5")]);
    let (mut client, epoch) = subscriber(&server);
    publish_numbered(&server, 1..=3);
    assert_eq!(recv_numbered(&mut client, 3), [1, 2, 3]);
    drop(client);
    // The ring now holds 9..=13: 4..=8 are gone.
    publish_numbered(&server, 4..=13);

    let mut clients = Vec::new();
    for since_seq in [3, 7, 0] {
        let mut client = WsClient::connect(server.addr);
        let ack = client.subscribe_since("orders", since_seq, &epoch);
        assert_eq!(
            ack["recovered"],
            false,
            "the ring no longer holds {}: {ack}",
            since_seq + 1
        );
        assert_eq!((epoch_field(&ack), seq_field(&ack)), (epoch.clone(), 13));
        client.assert_nothing_pending();
        clients.push(client);
    }
    // The boundary: the ring reaches back exactly to 9.
    let mut just_in_time = WsClient::connect(server.addr);
    let ack = just_in_time.subscribe_since("orders", 8, &epoch);
    assert_eq!(ack["recovered"], true, "the ring holds 9..=13: {ack}");
    assert_eq!(recv_numbered(&mut just_in_time, 5), [9, 10, 11, 12, 13]);
    just_in_time.assert_nothing_pending();
    clients.push(just_in_time);

    publish_numbered(&server, 14..=14);
    for client in &mut clients {
        assert_eq!(recv_numbered(client, 1), [14]);
    }
}

#[test]
fn resume_against_a_recreated_topic_is_not_recovered() {
    let server = server_with_orders(&[]);
    let (mut client, old_epoch) = subscriber(&server);
    publish_numbered(&server, 1..=2);
    assert_eq!(recv_numbered(&mut client, 2), [1, 2]);
    drop(client);
    delete(server.addr, "/topics/orders").expect_json(200);
    create_topic(server.addr, "orders");
    // The new topic's 3..=5 exist, but they are not the events the client missed.
    publish_numbered(&server, 1..=5);

    let mut resumed = WsClient::connect(server.addr);
    let ack = resumed.subscribe_since("orders", 2, &old_epoch);
    assert_eq!(ack["recovered"], false, "the epoch changed: {ack}");
    let new_epoch = epoch_field(&ack);
    assert_ne!(new_epoch, old_epoch, "a recreated topic kept its epoch");
    assert_eq!(seq_field(&ack), 5, "{ack}");
    resumed.assert_nothing_pending();
    publish_numbered(&server, 6..=6);
    assert_eq!(recv_numbered(&mut resumed, 1), [6]);
}

#[test]
/// A connection already subscribed that resumes again gets the events after its position that
/// came before its live delivery began, and never a second copy of a live one.
fn resuming_on_a_connection_already_subscribed_replays_only_what_came_before_it() {
    let server = server_with_orders(&[]);
    publish_numbered(&server, 1..=2);
    let (mut client, epoch) = subscriber(&server);
    publish_numbered(&server, 3..=3);
    assert_eq!(recv_numbered(&mut client, 1), [3]);

    // 1 and 2 came before the subscription: replayed; 3 came live: not again.
    let ack = client.subscribe_since("orders", 0, &epoch);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!((epoch_field(&ack), seq_field(&ack)), (epoch.clone(), 3));
    assert_eq!(recv_numbered(&mut client, 2), [1, 2]);
    client.assert_nothing_pending();
    // From a position at or after the start of live delivery: nothing to replay.
    let ack = client.subscribe_since("orders", 2, &epoch);
    assert_eq!(ack["recovered"], true, "{ack}");
    client.assert_nothing_pending();
    publish_numbered(&server, 4..=4);
    assert_eq!(recv_numbered(&mut client, 1), [4]);
    client.assert_nothing_pending();
}

#[test]
fn bad_resume_fields_get_bad_request_and_subscribe_nothing() {
    let server = server_with_orders(&[]);
    let mut client = WsClient::connect(server.addr);
    let epoch = epoch_field(&client.subscribe("orders", None));
    client.unsubscribe("orders");
    publish_numbered(&server, 1..=2);

    // (extra subscribe fields, a field the error message must name)
    let bad = [
        (
            json!({"last_n": 1, "since_seq": 0, "epoch": epoch}),
            "last_n",
        ),
        (
            json!({"last_n": 0, "since_seq": 1, "epoch": epoch}),
            "since_seq",
        ),
        (json!({"since_seq": 0}), "epoch"),
        (json!({"since_seq": 1}), "epoch"),
        (json!({"epoch": epoch}), "since_seq"),
        (json!({"last_n": 1, "epoch": epoch}), "epoch"),
        (json!({"since_seq": -1, "epoch": epoch}), "since_seq"),
        (json!({"since_seq": 1.5, "epoch": epoch}), "since_seq"),
        (json!({"since_seq": "1", "epoch": epoch}), "since_seq"),
        (json!({"since_seq": null, "epoch": epoch}), "since_seq"),
        (json!({"since_seq": 1, "epoch": 5}), "epoch"),
        (json!({"since_seq": 1, "epoch": null}), "epoch"),
        (json!({"since_seq": 1, "epoch": [epoch]}), "epoch"),
    ];
    for (fields, named) in bad {
        let mut request = json!({"type": "subscribe", "topic": "orders", "client_id": "c1"});
        for (key, value) in fields.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = client.request(request.clone());
        assert_error(&reply, "BAD_REQUEST");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(named),
            "the error to {request} does not name `{named}`: {reply}"
        );
        // Refused, so not subscribed, and nothing replayed.
        client.assert_nothing_pending();
        assert_eq!(subscriber_count(server.addr, "orders"), 0, "{request}");
    }

    // The connection stays usable: a well-formed resume works.
    let ack = client.subscribe_since("orders", 1, &epoch);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(recv_numbered(&mut client, 1), [2]);
    client.assert_nothing_pending();
}

#[test]
fn resume_across_a_reconnect_while_a_publisher_runs_delivers_every_seq_once_in_order() {
    /// Events the first connection reads before it drops.
    const READ_BEFORE_DROP: u64 = 300;
    /// Events published while the subscriber is away, at least.
    const MISSED_AT_LEAST: u64 = 300;
    /// Events the publisher goes on with after the resume ack, so live ones follow the replay.
    const AFTER_RESUME: u64 = 500;
    /// The publisher stops here whatever happens; the ring and queues hold this many.
    const MAX_PUBLISHED: u64 = 20_000;
    let sizes = MAX_PUBLISHED.to_string();
    let server = server_with_orders(&[("RING_SIZE", &sizes), ("QUEUE_SIZE", &sizes)]);
    let mut first = WsClient::connect(server.addr);
    let ack = first.subscribe("orders", None);
    assert_eq!(seq_field(&ack), 0);
    let epoch = epoch_field(&ack);

    let published = Arc::new(AtomicU64::new(0));
    let stop_at = Arc::new(AtomicU64::new(MAX_PUBLISHED));
    let publisher = {
        let mut publisher = WsClient::connect(server.addr);
        let (published, stop_at) = (Arc::clone(&published), Arc::clone(&stop_at));
        // As fast as acks allow, each ack checked to give the next seq.
        thread::spawn(move || {
            let mut n = 0;
            while n < stop_at.load(Ordering::SeqCst) {
                n += 1;
                let (_, seq) = publisher.publish_numbered("orders", json!({ "n": n }));
                assert_eq!(seq, n, "publish ack seq");
                published.store(n, Ordering::SeqCst);
            }
            n
        })
    };

    let mut received = recv_numbered(&mut first, READ_BEFORE_DROP);
    drop(first);
    let last_seen = *received.last().unwrap();
    wait_until(
        &format!("{MISSED_AT_LEAST} events are published after {last_seen}"),
        || published.load(Ordering::SeqCst) >= last_seen + MISSED_AT_LEAST,
    );
    let mut second = WsClient::connect(server.addr);
    let ack = second.subscribe_since("orders", last_seen, &epoch);
    let resumed_at = seq_field(&ack);
    stop_at.fetch_min(resumed_at + AFTER_RESUME, Ordering::SeqCst);
    assert_eq!(ack["recovered"], true, "resuming after {last_seen}: {ack}");
    assert_eq!(epoch_field(&ack), epoch);
    let total = publisher.join().unwrap();
    assert!(
        resumed_at >= last_seen + MISSED_AT_LEAST && resumed_at < total,
        "the resume (ack seq {resumed_at}) was not in the middle of the publishing \
         ({last_seen} seen, {total} published)"
    );

    received.extend(recv_numbered(&mut second, total - last_seen));
    let expected: Vec<u64> = (1..=total).collect();
    assert!(
        received == expected,
        "gap, duplicate or disorder across the reconnect at index {:?} (dropped after \
         {last_seen}, resumed at {resumed_at}, {total} published)",
        first_difference(&received, &expected)
    );
    second.assert_nothing_pending();
}

#[test]
fn a_slow_consumer_resumes_from_the_seq_its_error_carries() {
    /// Bytes of filler per event, so a few hundred events fill the kernel's socket buffers.
    const FILLER_BYTES: usize = 64 * 1024;
    /// Publishes beyond this many without a cut mean the server never cuts slow consumers.
    const MAX_EVENTS: u64 = 3000;
    /// Events published after the cut, which the resume must recover.
    const AFTER_CUT: u64 = 5;
    let server = server_with_orders(&[("QUEUE_SIZE", "8"), ("WRITE_TIMEOUT_SEC", "60")]);
    let (mut slow, epoch) = subscriber(&server);

    // Publish until /stats shows the slow subscriber gone.
    let mut publisher = WsClient::connect(server.addr);
    let filler = "x".repeat(FILLER_BYTES);
    let cut_at = (1..=MAX_EVENTS)
        .find(|&n| {
            let (_, seq) = publisher.publish_numbered("orders", json!({"n": n, "filler": filler}));
            assert_eq!(seq, n, "publish ack seq");
            subscriber_count(server.addr, "orders") == 0
        })
        .expect("the slow subscriber was never cut");
    let last = cut_at + AFTER_CUT;
    for n in cut_at + 1..=last {
        let (_, seq) = publisher.publish_numbered("orders", json!({ "n": n }));
        assert_eq!(seq, n, "publish ack seq");
    }

    // The slow client reads what was queued for it, then the error naming where to resume.
    let mut read_by_slow = Vec::new();
    let error = loop {
        let message = slow.recv_json();
        if message["type"] != "event" {
            break message;
        }
        assert_eq!(message["message"]["payload"]["n"], message["seq"]);
        read_by_slow.push(seq_field(&message));
    };
    assert_error(&error, "SLOW_CONSUMER");
    assert_eq!(error["topic"], "orders", "{error}");
    let cut_seq = seq_field(&error);
    assert_eq!(
        cut_seq,
        cut_at - 1,
        "event {cut_at} did not fit, so {} was the last queued: {error}",
        cut_at - 1
    );
    assert_eq!(read_by_slow, (1..=cut_seq).collect::<Vec<_>>());
    assert_eq!(slow.expect_close(), CloseCode::Policy);

    let mut resumed = WsClient::connect(server.addr);
    let ack = resumed.subscribe_since("orders", cut_seq, &epoch);
    assert_eq!(ack["recovered"], true, "resuming after {cut_seq}: {ack}");
    assert_eq!((epoch_field(&ack), seq_field(&ack)), (epoch, last));
    assert_eq!(
        recv_numbered(&mut resumed, last - cut_seq),
        (cut_seq + 1..=last).collect::<Vec<_>>()
    );
    resumed.assert_nothing_pending();
    publisher.publish_numbered("orders", json!({ "n": last + 1 }));
    assert_eq!(recv_numbered(&mut resumed, 1), [last + 1]);
}
