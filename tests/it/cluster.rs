//! Cluster mode (`REDIS_URL`): several instances on one Redis of the test's own share topics,
//! numbering, history and resume; an event published on any instance reaches every subscriber
//! on every instance exactly once, in `seq` order; and losing Redis, or only the instance's
//! pub/sub link to it, loses nothing that was acked.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{wait_until, Server};
use crate::http_client::{delete, get, post};
use crate::redis::Redis;
use crate::ws_client::{epoch_field, seq_field, WsClient};

/// An instance of the cluster on `redis`, with `overrides`.
fn instance(redis: &Redis, overrides: &[(&str, &str)]) -> Server {
    let url = redis.url();
    let mut settings = vec![("REDIS_URL", url.as_str()), ("LOG_LEVEL", "INFO")];
    settings.extend_from_slice(overrides);
    Server::start_with(&settings)
}

/// Publishes `payload` over HTTP and returns the `seq` of the answer, which must be 201.
fn publish_http(server: &Server, topic: &str, payload: Value) -> u64 {
    let body = json!({ "payload": payload }).to_string();
    let answer = post(server.addr, &format!("/topics/{topic}/messages"), &body).expect_json(201);
    answer["seq"].as_u64().expect("a seq")
}

/// The next `count` events of `topic`, whole.
fn events(client: &mut WsClient, topic: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|_| client.recv_numbered_event(topic))
        .collect()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(seq_field).collect()
}

#[test]
fn publishers_on_two_instances_reach_every_subscriber_once_in_order() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (instance(&redis, &[]), instance(&redis, &[]));
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    const EACH: u64 = 1000;
    let subscribers: Vec<_> = [a.addr, a.addr, b.addr, b.addr]
        .into_iter()
        .map(|addr| {
            let mut client = WsClient::connect(addr);
            client.subscribe("orders", None);
            thread::spawn(move || events(&mut client, "orders", 2 * EACH as usize))
        })
        .collect();
    let publishers: Vec<_> = [a.addr, b.addr]
        .into_iter()
        .enumerate()
        .map(|(n, addr)| {
            thread::spawn(move || {
                let mut client = WsClient::connect(addr);
                (0..EACH)
                    .map(|i| {
                        let (id, seq) = client.publish_numbered("orders", json!({"p": n, "i": i}));
                        (seq, id)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: HashMap<u64, String> = HashMap::new();
    for publisher in publishers {
        for (seq, id) in publisher.join().expect("a publisher failed") {
            assert!(acked.insert(seq, id).is_none(), "seq {seq} acked twice");
        }
    }
    let mut numbers: Vec<u64> = acked.keys().copied().collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=2 * EACH).collect::<Vec<_>>(),
        "the acks' seqs"
    );
    for (n, subscriber) in subscribers.into_iter().enumerate() {
        let received = subscriber.join().expect("a subscriber failed");
        assert_eq!(
            seqs(&received),
            (1..=2 * EACH).collect::<Vec<_>>(),
            "subscriber {n}: every seq once, in order"
        );
        for event in &received {
            let seq = seq_field(event);
            assert_eq!(
                event["message"]["id"], acked[&seq],
                "subscriber {n}: seq {seq} is not the message acked with it"
            );
        }
    }
}

#[test]
fn topics_are_created_and_deleted_cluster_wide() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (instance(&redis, &[]), instance(&redis, &[]));
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    post(b.addr, "/topics", r#"{"name":"orders"}"#).expect_error(409, "TOPIC_EXISTS");
    let listed = get(b.addr, "/topics").expect_json(200);
    assert_eq!(listed["topics"][0]["name"], "orders", "{listed}");

    let mut on_a = WsClient::connect(a.addr);
    let old_epoch = epoch_field(&on_a.subscribe("orders", None));
    publish_http(&b, "orders", json!(1));
    assert_eq!(seq_field(&on_a.recv_numbered_event("orders")), 1);

    delete(b.addr, "/topics/orders").expect_json(200);
    let notice = on_a.recv_json();
    assert_eq!(notice["type"], "info", "{notice}");
    assert_eq!(notice["msg"], "topic_deleted", "{notice}");
    assert_eq!(notice["topic"], "orders", "{notice}");
    delete(a.addr, "/topics/orders").expect_error(404, "TOPIC_NOT_FOUND");

    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let mut on_b = WsClient::connect(b.addr);
    let resumed = on_b.subscribe_since("orders", 1, &old_epoch);
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_ne!(
        epoch_field(&resumed),
        old_epoch,
        "a recreated topic keeps its epoch"
    );
}

#[test]
fn a_resume_on_another_instance_recovers_exactly_what_was_missed() {
    let Some(redis) = Redis::start() else { return };
    const RING: u64 = 20;
    let ring = RING.to_string();
    let a = instance(&redis, &[("RING_SIZE", &ring)]);
    let b = instance(&redis, &[("RING_SIZE", &ring)]);
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let mut reader = WsClient::connect(a.addr);
    let epoch = epoch_field(&reader.subscribe("orders", None));
    let k = 5;
    for n in 1..=k {
        publish_http(&a, "orders", json!(n));
    }
    assert_eq!(
        seqs(&events(&mut reader, "orders", k as usize)),
        (1..=k).collect::<Vec<_>>()
    );
    reader.close();

    let m = 10;
    for n in 1..=m {
        publish_http(&b, "orders", json!(k + n));
    }
    let mut resumed = WsClient::connect(b.addr);
    let ack = resumed.subscribe_since("orders", k, &epoch);
    assert_eq!(ack["recovered"], true, "{ack}");
    let missed = events(&mut resumed, "orders", m as usize);
    assert_eq!(seqs(&missed), (k + 1..=k + m).collect::<Vec<_>>());
    resumed.assert_nothing_pending();

    for n in 1..=RING {
        publish_http(&a, "orders", json!(k + m + n));
    }
    let mut too_late = WsClient::connect(b.addr);
    let ack = too_late.subscribe_since("orders", k, &epoch);
    assert_eq!(ack["recovered"], false, "past RING_SIZE: {ack}");
}

#[test]
fn subscribing_on_one_instance_while_another_publishes_has_no_gap_at_the_hand_over() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (instance(&redis, &[]), instance(&redis, &[]));
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let publisher_addr = a.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = std::sync::Arc::clone(&stop);
        thread::spawn(move || {
            let mut client = WsClient::connect(publisher_addr);
            let mut published = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                client.publish("orders", json!(published));
                published += 1;
            }
            published
        })
    };
    for round in 0..20 {
        let mut client = WsClient::connect(b.addr);
        let ack = client.subscribe("orders", Some(5));
        let at = seq_field(&ack);
        let received = seqs(&events(&mut client, "orders", 15));
        let first = received[0];
        assert!(
            first <= at + 1,
            "round {round}: ack at {at}, first event {first}"
        );
        assert_eq!(
            received,
            (first..first + 15).collect::<Vec<_>>(),
            "round {round}: a gap or a repeat around the ack at seq {at}"
        );
        assert_eq!(
            first,
            at.saturating_sub(4).max(1),
            "round {round}: replay of last_n 5 before {at}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(publisher.join().expect("the publisher failed") > 0);
}

#[test]
fn a_killed_pub_sub_link_is_caught_up_without_loss() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (instance(&redis, &[]), instance(&redis, &[]));
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    const COUNT: usize = 1000;
    let mut subscriber = WsClient::connect(a.addr);
    subscriber.subscribe("orders", None);
    let publisher_addr = b.addr;
    let publisher = thread::spawn(move || {
        let mut client = WsClient::connect(publisher_addr);
        (0..COUNT)
            .map(|n| client.publish_numbered("orders", json!(n)).1)
            .collect::<Vec<_>>()
    });
    let mut received = events(&mut subscriber, "orders", COUNT / 5);
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(
        killed.parse::<u32>().is_ok_and(|n| n >= 2),
        "CLIENT KILL answered {killed}"
    );
    received.extend(events(&mut subscriber, "orders", COUNT - COUNT / 5));
    let acked = publisher.join().expect("the publisher failed");
    assert_eq!(acked, (1..=COUNT as u64).collect::<Vec<_>>());
    assert_eq!(seqs(&received), acked, "every acked event, once, in order");
    wait_until("both instances are linked again", || {
        [&a, &b]
            .iter()
            .all(|server| get(server.addr, "/health").status == 200)
    });
    for server in [&a, &b] {
        let lines = server.log_lines();
        assert!(
            lines.iter().any(|line| line.contains("link lost")),
            "the kill went unnoticed: {lines:?}"
        );
    }
}

#[test]
fn without_redis_writes_fail_at_once_reads_go_on_and_an_empty_redis_means_no_topics() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = instance(&redis, &[]);
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    publish_http(&a, "orders", json!(1));
    let mut subscriber = WsClient::connect(a.addr);
    subscriber.subscribe("orders", None);
    let health = get(a.addr, "/health").expect_json(200);
    assert_eq!(health["backplane"]["up"], true, "{health}");

    redis.kill();
    wait_until("/health says the backplane is down", || {
        get(a.addr, "/health").status == 503
    });
    let health = get(a.addr, "/health").json();
    assert_eq!(health["backplane"]["up"], false, "{health}");
    assert!(
        !health["backplane"]["redis"].as_str().unwrap().contains('@'),
        "{health}"
    );
    for attempt in 0..3 {
        let started = Instant::now();
        let body = json!({"payload": attempt}).to_string();
        let answer = post(a.addr, "/topics/orders/messages", &body);
        answer.expect_error(503, "INTERNAL");
        assert!(answer.body.contains("backplane"), "{}", answer.body);
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "took {:?}",
            started.elapsed()
        );
    }
    post(a.addr, "/topics", r#"{"name":"other"}"#).expect_error(503, "INTERNAL");
    delete(a.addr, "/topics/orders").expect_error(503, "INTERNAL");
    // What this instance mirrors stays readable.
    let history = get(a.addr, "/topics/orders/messages").expect_json(200);
    assert_eq!(history["seq"], 1, "{history}");
    let mut late = WsClient::connect(a.addr);
    let ack = late.subscribe("orders", Some(1));
    assert_eq!(seq_field(&late.recv_numbered_event("orders")), 1, "{ack}");

    redis.restart();
    wait_until("/health is 200 again", || {
        get(a.addr, "/health").status == 200
    });
    let notice = subscriber.recv_json();
    assert_eq!(
        notice["msg"], "topic_deleted",
        "an empty Redis has no topics: {notice}"
    );
    let topics = get(a.addr, "/topics").expect_json(200);
    assert_eq!(topics["topics"], json!([]), "{topics}");
}

#[test]
fn a_redis_that_comes_back_older_gives_the_topic_a_new_epoch() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = instance(&redis, &[]);
    post(a.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let mut subscriber = WsClient::connect(a.addr);
    let epoch = epoch_field(&subscriber.subscribe("orders", None));
    for n in 1..=3 {
        publish_http(&a, "orders", json!(n));
    }
    assert_eq!(redis.command(&["SAVE"]), "OK");
    for n in 4..=6 {
        publish_http(&a, "orders", json!(n));
    }
    assert_eq!(
        seqs(&events(&mut subscriber, "orders", 6)),
        (1..=6).collect::<Vec<_>>()
    );

    // Restarted from the snapshot, Redis is at seq 3 of an epoch whose 4 to 6 were seen.
    redis.restart();
    let cut = subscriber.recv_json();
    assert_eq!(cut["type"], "error", "{cut}");
    assert_eq!(cut["error"]["code"], "SUBSCRIPTION_GAP", "{cut}");
    assert_eq!(cut["topic"], "orders", "{cut}");
    assert_eq!(
        cut["seq"], 6,
        "the last seq this subscriber was sent: {cut}"
    );
    let ack = subscriber.subscribe_since("orders", 6, &epoch);
    assert_eq!(ack["recovered"], false, "{ack}");
    let fresh = epoch_field(&ack);
    assert_ne!(fresh, epoch, "no new epoch: seqs 4 to 6 would be reused");
    let seq = publish_http(&a, "orders", json!(7));
    let event = subscriber.recv_numbered_event("orders");
    assert_eq!(seq_field(&event), seq);
    let history = get(a.addr, "/topics/orders/messages").expect_json(200);
    assert_eq!(history["epoch"], fresh.as_str(), "{history}");
}

#[test]
fn without_redis_url_the_server_opens_no_backplane() {
    let server = Server::start();
    let health = get(server.addr, "/health").expect_json(200);
    assert!(health.get("backplane").is_none(), "{health}");
}
