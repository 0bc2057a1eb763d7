//! Graceful shutdown on SIGTERM and SIGINT: queued events delivered, then
//! `info server_shutdown`, then close 1001, and exit 0 within `SHUTDOWN_GRACE_SEC`; at once
//! when idle, and no later than the grace period with a client that never reads. Under load
//! (WebSocket and HTTP publishers, readers), every message acked before SIGTERM reaches every
//! reader that kept reading, in order and without a gap.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;
use uuid::Uuid;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, read_until_closed};
use crate::ws_client::{publish_request, without_ts, WsClient};

/// How much longer than `SHUTDOWN_GRACE_SEC` the process may take to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(3);

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

/// `SHUTDOWN_GRACE_SEC` of the server under load, as configured and as a duration.
const LOAD_GRACE_SECS: &str = "3";
const LOAD_GRACE: Duration = Duration::from_secs(3);

/// The subscribers reading to the end, and the WebSocket publishers (one HTTP publisher too).
const READERS: usize = 4;
const WS_PUBLISHERS: usize = 3;

/// Messages acked before the signal is sent, so that shutdown surely meets load.
const ACKED_BEFORE_SIGNAL: u64 = 4000;

/// Bytes of filler in every payload, so that the queues hold some weight at shutdown.
const FILLER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                      0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                      0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                      0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// What one publisher had acked: its message number → the `seq` the ack gave it.
type Acked = BTreeMap<u64, u64>;

/// Publishes `{"p": name, "n": 0, 1, ...}` over a WebSocket, one at a time, until the server
/// refuses or goes; returns what was acked and how the connection ended.
fn ws_publisher(addr: SocketAddr, name: String, progress: Arc<AtomicU64>) -> (Acked, String) {
    let mut client = WsClient::connect(addr);
    let mut acked = Acked::new();
    for n in 0.. {
        let id = Uuid::new_v4().to_string();
        let mut request =
            publish_request("load", &id, json!({"p": name, "n": n, "filler": FILLER}));
        request["request_id"] = json!(n.to_string());
        client.send_json(&request);
        let reply = match client.try_recv_message() {
            Ok(Message::Text(text)) => serde_json::from_str::<Value>(text.as_str()).unwrap(),
            Ok(Message::Close(frame)) => return (acked, format!("closed: {frame:?}")),
            Ok(other) => panic!("{name}: unexpected {other:?}"),
            Err(error) => return (acked, format!("ended: {error}")),
        };
        match reply["type"].as_str() {
            Some("ack") => {
                assert_eq!(reply["request_id"], n.to_string(), "{reply}");
                acked.insert(n, reply["seq"].as_u64().expect("an ack without seq"));
                progress.fetch_add(1, Ordering::Relaxed);
            }
            // Refused (shutting down) or told: stop publishing, read to the end.
            Some("error") | Some("info") => {
                if reply["type"] == "error" {
                    assert_eq!(reply["error"]["code"], "INTERNAL", "{reply}");
                }
                return (acked, read_to_the_end(&mut client, &name));
            }
            _ => panic!("{name}: unexpected reply {reply}"),
        }
    }
    unreachable!()
}

/// Reads until the connection ends; returns the close code, or how it ended.
fn read_to_the_end(client: &mut WsClient, name: &str) -> String {
    loop {
        match client.try_recv_message() {
            Ok(Message::Close(Some(frame))) => return format!("close {}", u16::from(frame.code)),
            Ok(Message::Close(None)) => return "close without a code".into(),
            Ok(Message::Text(text)) => {
                let message: Value = serde_json::from_str(text.as_str()).unwrap();
                assert!(
                    matches!(message["type"].as_str(), Some("info" | "error")),
                    "{name}: {message}"
                );
            }
            Ok(_) => {}
            Err(error) => return format!("ended: {error}"),
        }
    }
}

/// Publishes over HTTP, one request per connection, until the server refuses or goes.
fn http_publisher(addr: SocketAddr, progress: Arc<AtomicU64>) -> (Acked, String) {
    let mut acked = Acked::new();
    for n in 0.. {
        let body = json!({"payload": {"p": "http", "n": n, "filler": FILLER}}).to_string();
        let request = format!(
            "POST /topics/load/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let Ok(mut stream) = TcpStream::connect(addr) else {
            return (acked, "connection refused".into());
        };
        let _ = stream.write_all(request.as_bytes());
        let outcome = read_until_closed(&mut stream, Duration::from_secs(10));
        let responses = outcome.responses();
        let Some(response) = responses.first() else {
            return (acked, "closed without an answer".into());
        };
        match response.status {
            201 => {
                acked.insert(n, response.json()["seq"].as_u64().unwrap());
                progress.fetch_add(1, Ordering::Relaxed);
            }
            503 => {
                response.expect_error(503, "INTERNAL");
                return (acked, "503".into());
            }
            other => panic!("an HTTP publish answered {other}: {response:?}"),
        }
    }
    unreachable!()
}

/// What a reader received: every event's `seq` and payload in order, then how it ended.
struct Received {
    events: Vec<(u64, Value)>,
    shutdown_info: bool,
    close: Option<CloseCode>,
}

fn reader(mut client: WsClient, start_reading: Arc<AtomicBool>) -> Received {
    // Not reading at first, so that events are queued for this reader when shutdown begins.
    while !start_reading.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(1));
    }
    let mut received = Received {
        events: Vec::new(),
        shutdown_info: false,
        close: None,
    };
    loop {
        match client.try_recv_message() {
            Ok(Message::Text(text)) => {
                let message: Value = serde_json::from_str(text.as_str()).unwrap();
                match message["type"].as_str() {
                    Some("event") => {
                        assert!(!received.shutdown_info, "an event after server_shutdown");
                        received.events.push((
                            message["seq"].as_u64().unwrap(),
                            message["message"]["payload"].clone(),
                        ));
                    }
                    Some("info") if message["msg"] == "server_shutdown" => {
                        received.shutdown_info = true
                    }
                    _ => panic!("a reader got {message}"),
                }
            }
            Ok(Message::Close(frame)) => {
                received.close = frame.map(|frame| frame.code);
                return received;
            }
            Ok(_) => {}
            Err(_) => return received,
        }
    }
}

#[test]
fn every_message_acked_before_sigterm_reaches_every_reader_and_the_process_exits_0() {
    let mut server = Server::start_with(&[
        ("SHUTDOWN_GRACE_SEC", LOAD_GRACE_SECS),
        ("QUEUE_SIZE", "100000"),
        ("LOG_LEVEL", "INFO"),
    ]);
    let addr = server.addr;
    create_topic(addr, "load");
    let start_reading = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let mut client = WsClient::connect(addr);
            client.subscribe("load", None);
            let start_reading = Arc::clone(&start_reading);
            thread::spawn(move || reader(client, start_reading))
        })
        .collect();
    let progress = Arc::new(AtomicU64::new(0));
    let mut publishers: Vec<_> = (0..WS_PUBLISHERS)
        .map(|p| {
            let progress = Arc::clone(&progress);
            let name = format!("ws{p}");
            thread::spawn(move || (name.clone(), ws_publisher(addr, name, progress)))
        })
        .collect();
    {
        let progress = Arc::clone(&progress);
        publishers.push(thread::spawn(move || {
            ("http".to_string(), http_publisher(addr, progress))
        }));
    }
    wait_until("the publishers have some messages acked", || {
        progress.load(Ordering::Relaxed) >= ACKED_BEFORE_SIGNAL / 2
    });
    start_reading.store(true, Ordering::Relaxed);
    wait_until("the publishers have more messages acked", || {
        progress.load(Ordering::Relaxed) >= ACKED_BEFORE_SIGNAL
    });

    server.sigterm();
    let signalled = Instant::now();
    let status = server
        .wait_exit(LOAD_GRACE + EXIT_MARGIN)
        .expect("the server did not exit within the grace period and a margin");
    let exit_after = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");

    // Every ack, by the seq it gave: what each reader must have at that seq.
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    let mut endings = Vec::new();
    for publisher in publishers {
        let (name, (acked, ending)) = publisher.join().unwrap();
        assert!(!acked.is_empty(), "{name} had nothing acked");
        // Acked in order, each with its own, increasing seq.
        let seqs: Vec<u64> = acked.values().copied().collect();
        assert!(
            seqs.windows(2).all(|pair| pair[0] < pair[1]),
            "{name}: {seqs:?}"
        );
        for (n, seq) in acked {
            let previous = by_seq.insert(seq, json!({"p": name, "n": n, "filler": FILLER}));
            assert_eq!(previous, None, "seq {seq} acked twice");
        }
        endings.push((name, ending));
    }
    let last_acked = *by_seq.keys().last().unwrap();
    for (index, reader) in readers.into_iter().enumerate() {
        let received = reader.join().unwrap();
        let seqs: Vec<u64> = received.events.iter().map(|(seq, _)| *seq).collect();
        // From seq 1, without a gap or a repeat, at least up to the last acked one.
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert!(
            seqs == expected,
            "reader {index}: seqs are not 1, 2, 3, ..."
        );
        assert!(
            seqs.len() as u64 >= last_acked,
            "reader {index} got {} events, the last acked seq is {last_acked}",
            seqs.len()
        );
        for (seq, payload) in &received.events {
            if let Some(acked_payload) = by_seq.get(seq) {
                assert_eq!(payload, acked_payload, "reader {index}, seq {seq}");
            }
        }
        assert!(received.shutdown_info, "reader {index}: no server_shutdown");
        assert_eq!(received.close, Some(CloseCode::Away), "reader {index}");
    }
    for (name, ending) in &endings {
        if name != "http" {
            assert_eq!(ending, "close 1001", "{name}");
        }
    }
    eprintln!(
        "{} acked messages checked at each of {READERS} readers ({} deliveries); exit 0 after \
         {exit_after:?}; publishers ended: {endings:?}",
        by_seq.len(),
        by_seq.len() * READERS
    );
}
