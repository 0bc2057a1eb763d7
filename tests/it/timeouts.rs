//! Deadlines for slow and silent clients: a slowloris that trickles its request
//! head, a client that connects and says nothing, and subscribers that never read. Each is cut
//! by its deadline (`HANDSHAKE_TIMEOUT_SEC`) or by the slow-consumer rule and `WRITE_TIMEOUT_SEC`,
//! while a normal client's round trips stay fast.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, get, health, subscriber_count};
use crate::ws_client::{assert_ack, publish_request, WsClient};

/// `HANDSHAKE_TIMEOUT_SEC` and `WRITE_TIMEOUT_SEC` of these servers.
const DEADLINE_SECS: &str = "1";
const DEADLINE: Duration = Duration::from_secs(1);

/// How late after its deadline a cut may come: timer granularity, scheduling on a busy 2-core
/// machine. Generous, since this is about being cut at all, not about precision.
const LATE: Duration = Duration::from_millis(1500);

/// How early before its deadline a cut may come (clock granularity).
const EARLY: Duration = Duration::from_millis(100);

/// The pace of a slowloris: one byte per this.
const TRICKLE: Duration = Duration::from_millis(200);

/// A slowloris gives up proving its point after this long uncut.
const TRICKLE_FOR: Duration = Duration::from_secs(4);

fn server() -> Server {
    Server::start_with(&[
        ("HANDSHAKE_TIMEOUT_SEC", DEADLINE_SECS),
        ("WRITE_TIMEOUT_SEC", DEADLINE_SECS),
    ])
}

/// The upgrade request of a WebSocket client.
const WS_HEAD: &str =
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       X-Padding: slowly-slowly-slowly-slowly\r\n\r\n";

/// A REST request.
const REST_HEAD: &str =
    "GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: slowly-slowly-slowly-slowly\r\n\
                         Connection: close\r\n\r\n";

/// Connects, sends `head[..at_once]` in one write, then the rest one byte per [`TRICKLE`].
/// Returns how long after connecting the server cut the connection, or `None` if it had not
/// after [`TRICKLE_FOR`] (or answered the head before cutting it).
fn trickle(addr: SocketAddr, head: &str, at_once: usize) -> Option<Duration> {
    let mut stream = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    stream.set_read_timeout(Some(TRICKLE)).unwrap();
    let _ = stream.write_all(&head.as_bytes()[..at_once]);
    let mut rest = head.as_bytes()[at_once..].iter();
    while started.elapsed() < TRICKLE_FOR {
        if let Some(byte) = rest.next() {
            if stream.write_all(&[*byte]).is_err() {
                return Some(started.elapsed());
            }
        }
        match stream.read(&mut [0; 1024]) {
            Ok(0) => return Some(started.elapsed()),
            // An answer before the cut: the server waited for the whole head after all.
            Ok(_) => return None,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Asserts that `cut` (from [`trickle`] or [`silent`]) came at the handshake deadline.
fn assert_cut_at_the_deadline(what: &str, cut: Option<Duration>) {
    let cut = cut.unwrap_or_else(|| panic!("{what}: not cut within {TRICKLE_FOR:?}"));
    assert!(
        cut + EARLY >= DEADLINE && cut <= DEADLINE + LATE,
        "{what}: cut after {cut:?}, the deadline is {DEADLINE:?}"
    );
}

/// Connects and says nothing; returns how long until the server closed the connection.
fn silent(addr: SocketAddr) -> Option<Duration> {
    let mut stream = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    stream.set_read_timeout(Some(TRICKLE_FOR)).unwrap();
    match stream.read(&mut [0; 64]) {
        Ok(0) => Some(started.elapsed()),
        Ok(_) => None,
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(started.elapsed()),
    }
}

#[test]
fn a_slowloris_request_line_is_cut_at_the_handshake_deadline() {
    let server = server();
    let addr = server.addr;
    let rest = thread::spawn(move || trickle(addr, REST_HEAD, 0));
    let ws = thread::spawn(move || trickle(addr, WS_HEAD, 0));
    assert_cut_at_the_deadline(
        "a REST request line, one byte per 200 ms",
        rest.join().unwrap(),
    );
    assert_cut_at_the_deadline(
        "a /ws request line, one byte per 200 ms",
        ws.join().unwrap(),
    );
    assert!(health(addr)["uptime_sec"].is_u64());
    WsClient::connect(addr).ping();
}

#[test]
fn a_silent_connection_is_cut_at_the_handshake_deadline() {
    let server = server();
    let addr = server.addr;
    let silents: Vec<_> = (0..5)
        .map(|_| thread::spawn(move || silent(addr)))
        .collect();
    for silent in silents {
        assert_cut_at_the_deadline("a client that says nothing", silent.join().unwrap());
    }
    assert!(health(addr)["uptime_sec"].is_u64());
    WsClient::connect(addr).ping();
}

#[test]
fn a_slowloris_websocket_head_is_cut_at_the_handshake_deadline() {
    let server = server();
    let request_line = WS_HEAD.find('\n').unwrap() + 1;
    assert_cut_at_the_deadline(
        "a /ws upgrade whose headers come one byte per 200 ms",
        trickle(server.addr, WS_HEAD, request_line),
    );
    WsClient::connect(server.addr).ping();
}

/// Regression test for a bug found here: HANDSHAKE_TIMEOUT_SEC bounds only the
/// request line; a REST request whose headers trickle in is only bounded by the 60 s idle
/// timeout per byte, so a slowloris holds its connection (and a MAX_CONNECTIONS slot) for ever.
#[test]
fn a_slowloris_rest_head_is_cut_at_the_handshake_deadline() {
    let server = server();
    let request_line = REST_HEAD.find('\n').unwrap() + 1;
    assert_cut_at_the_deadline(
        "a REST request whose headers come one byte per 200 ms",
        trickle(server.addr, REST_HEAD, request_line),
    );
    assert!(health(server.addr)["uptime_sec"].is_u64());
}

/// A client subscribed to `topic` that never reads again (as long as the caller keeps it).
fn never_reader(addr: SocketAddr, topic: &str) -> WsClient {
    let mut client = WsClient::connect(addr);
    client.subscribe(topic, None);
    client
}

/// The `pubsub_connections_open{kind="websocket"}` gauge from `/metrics`.
fn open_websockets(addr: SocketAddr) -> u64 {
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    metrics
        .body
        .lines()
        .find_map(|line| line.strip_prefix("pubsub_connections_open{kind=\"websocket\"} "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no websocket gauge in /metrics:\n{}", metrics.body)) as u64
}

#[test]
fn a_subscriber_that_never_reads_is_dropped_after_the_write_timeout() {
    // A queue so large it never overflows: only the write timeout can end this subscriber.
    let server = Server::start_with(&[
        ("WRITE_TIMEOUT_SEC", DEADLINE_SECS),
        ("QUEUE_SIZE", "100000"),
    ]);
    create_topic(server.addr, "flood");
    let _stuck = never_reader(server.addr, "flood");
    let mut publisher = WsClient::connect(server.addr);
    // 10 MiB: more than loopback's socket buffers hold, so the writer blocks (the kernel
    // still takes some of it slowly, so when exactly is not known: the bound is DEADLINE).
    let filler = "x".repeat(64 * 1024);
    for seq in 0..160 {
        publisher.publish("flood", json!({"seq": seq, "filler": filler}));
    }
    wait_until("the stuck subscriber is dropped", || {
        subscriber_count(server.addr, "flood") == 0
    });
    // Dropped by the write timeout (EAGAIN from a write blocked for WRITE_TIMEOUT_SEC), not by
    // the heartbeat (60 s away) or anything else.
    let writer_stopped = server
        .log_lines()
        .into_iter()
        .find(|line| line.contains("writer stopped"))
        .expect("no `writer stopped` line");
    assert!(
        writer_stopped.contains("os error 11") || writer_stopped.contains("timed out"),
        "{writer_stopped}"
    );
    assert_eq!(
        open_websockets(server.addr),
        1,
        "only the publisher is left"
    );
    publisher.ping();
}

/// Repeats `attack` on fresh connections until `stop` is set.
fn keep_attacking(stop: &Arc<AtomicBool>, attack: impl Fn() + Send + 'static) -> JoinHandle<()> {
    let stop = Arc::clone(stop);
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            attack();
        }
    })
}

#[test]
fn a_normal_clients_round_trips_stay_fast_while_slow_clients_are_cut() {
    /// Round trips measured: ping → pong, publish → ack on the never-readers' topic, and
    /// publish → own event, in turn.
    const ROUND_TRIPS: usize = 100;
    /// The bound on the 99th percentile: a correctness bound, far above a normal round trip
    /// (about a millisecond), far below what waiting on any slow client would cost (a second).
    const P99_BOUND: Duration = Duration::from_millis(500);
    let server = server();
    let addr = server.addr;
    create_topic(addr, "flood");
    create_topic(addr, "orders");

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..3 {
        attackers.push(keep_attacking(&stop, move || {
            trickle(addr, REST_HEAD, 0);
        }));
        attackers.push(keep_attacking(&stop, move || {
            trickle(addr, WS_HEAD, 0);
        }));
        attackers.push(keep_attacking(&stop, move || {
            silent(addr);
        }));
    }
    // Subscribers that never read, and a publisher filling their queues with 16 KiB events.
    let never_readers: Vec<WsClient> = (0..3).map(|_| never_reader(addr, "flood")).collect();
    let flood = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut publisher = WsClient::connect(addr);
            let filler = "f".repeat(16 * 1024);
            let mut published = 0u64;
            while !stop.load(Ordering::Relaxed) {
                publisher.publish("flood", json!({"n": published, "filler": filler}));
                published += 1;
            }
            published
        })
    };

    let mut normal = WsClient::connect(addr);
    normal.subscribe("orders", None);
    let mut latencies = Vec::with_capacity(ROUND_TRIPS);
    for n in 0..ROUND_TRIPS {
        let started = Instant::now();
        if n % 3 == 0 {
            normal.ping();
        } else if n % 3 == 1 {
            // A publish to the topic the never-readers hold: it must not wait for them.
            normal.publish("flood", json!({"n": n}));
        } else {
            let id = uuid::Uuid::new_v4().to_string();
            normal.send_json(&publish_request("orders", &id, json!({"n": n})));
            // Subscribed itself, it gets its own event first, then the ack.
            assert_eq!(normal.recv_event("orders")["id"], id);
            assert_ack(&normal.recv_json(), "orders");
        }
        latencies.push(started.elapsed());
        // Spread over about two seconds, so the measurement spans the cuts.
        thread::sleep(Duration::from_millis(20));
    }
    // The never-readers were cut while the normal client was measured.
    wait_until("the never-readers are cut", || {
        subscriber_count(addr, "flood") == 0
    });
    stop.store(true, Ordering::Relaxed);
    let published = flood.join().unwrap();
    for attacker in attackers {
        attacker.join().unwrap();
    }
    drop(never_readers);

    latencies.sort();
    let p50 = latencies[ROUND_TRIPS / 2];
    let p99 = latencies[ROUND_TRIPS * 99 / 100 - 1];
    let max = latencies[ROUND_TRIPS - 1];
    eprintln!(
        "round trips under attack: p50 {p50:?}, p99 {p99:?}, max {max:?}; {published} flood events"
    );
    assert!(p99 < P99_BOUND, "p99 {p99:?} (p50 {p50:?}, max {max:?})");
    assert_eq!(
        health(addr)["subscribers"],
        1,
        "only the normal client is subscribed"
    );
    normal.ping();
}
