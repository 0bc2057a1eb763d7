//! `GET /metrics`: the Prometheus text exposition format, and every counter moving by exactly
//! what a test did. `promtool check metrics` of a real scrape is in
//! test.sh; here the scrape is parsed into `name{labels} -> value` and read number by number.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;

use serde_json::json;

use crate::harness::{wait_until, Server};
use crate::http_client::{create_topic, delete, http, post, subscriber_count, try_http_raw};
use crate::ws_client::{assert_error, WsClient};

/// The content type of the Prometheus text format (the `charset` parameter may follow).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Topics shown one by one in a scrape (README, "Monitoring").
const MAX_TOPIC_SERIES: usize = 100;

/// Every family a scrape must declare, with its type.
const FAMILIES: [(&str, &str); 15] = [
    ("pubsub_uptime_seconds", "gauge"),
    ("pubsub_connections_open", "gauge"),
    ("pubsub_connections_refused_total", "counter"),
    ("pubsub_topics", "gauge"),
    ("pubsub_subscriptions", "gauge"),
    ("pubsub_messages_published_total", "counter"),
    ("pubsub_events_delivered_total", "counter"),
    ("pubsub_topic_subscriptions", "gauge"),
    ("pubsub_topic_messages_published_total", "counter"),
    ("pubsub_topic_events_delivered_total", "counter"),
    ("pubsub_metrics_topics_omitted", "gauge"),
    ("pubsub_slow_consumer_disconnects_total", "counter"),
    ("pubsub_heartbeat_reaps_total", "counter"),
    ("pubsub_rest_requests_total", "counter"),
    ("pubsub_publish_to_write_seconds", "histogram"),
];

/// The per-topic families, each capped at [`MAX_TOPIC_SERIES`] series.
const PER_TOPIC: [&str; 3] = [
    "pubsub_topic_subscriptions",
    "pubsub_topic_messages_published_total",
    "pubsub_topic_events_delivered_total",
];

const HISTOGRAM: &str = "pubsub_publish_to_write_seconds";

/// One scrape, parsed: every sample under its series key `name{a="x",b="y"}` (labels sorted by
/// name; no braces without labels) and every family's `# TYPE`.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    /// Parses the exposition text, failing on any line that is not a comment or a well-formed
    /// sample of a family declared above it.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            samples: BTreeMap::new(),
            types: BTreeMap::new(),
            text: text.to_owned(),
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
                let previous = scrape.types.insert(name.to_owned(), kind.to_owned());
                assert!(previous.is_none(), "family {name} declared twice");
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name, labels, value) = parse_sample(line);
            let family = scrape.family_of(&name);
            assert!(
                family.is_some(),
                "sample {line:?} before (or without) its # TYPE line"
            );
            let key = series(&name, &labels);
            let previous = scrape.samples.insert(key, value);
            assert!(previous.is_none(), "series repeated: {line:?}");
        }
        scrape
    }

    /// The declared family a sample name belongs to (histograms add suffixes).
    fn family_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.types.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| {
                self.types
                    .get(*base)
                    .is_some_and(|kind| kind == "histogram")
            })
    }

    /// The value of one series; panics, showing the scrape, if it is absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(
            name,
            &labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        );
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("no series {key} in the scrape:\n{}", self.text))
    }

    /// The value of a series that must be a whole number.
    fn int(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let value = self.value(name, labels);
        assert!(
            value >= 0.0 && value.fract() == 0.0,
            "{name} {labels:?} is {value}, not a whole number"
        );
        value as u64
    }

    /// Every sample of `name` (exactly that name) as (labels, value).
    fn series_of(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter_map(|(key, value)| {
                let (_, labels, _) = parse_sample(&format!("{key} {value}"));
                let sample_name = key.split('{').next().unwrap();
                (sample_name == name).then(|| (labels.into_iter().collect(), *value))
            })
            .collect()
    }

    /// The `topic` label of every series of `name`, in order.
    fn topics_of(&self, name: &str) -> Vec<String> {
        self.series_of(name)
            .into_iter()
            .map(|(labels, _)| labels.get("topic").cloned().expect("no topic label"))
            .collect()
    }

    /// `pubsub_rest_requests_total{route,status}` as a map.
    fn rest_requests(&self) -> BTreeMap<(String, String), u64> {
        self.series_of("pubsub_rest_requests_total")
            .into_iter()
            .map(|(labels, value)| {
                let route = labels.get("route").cloned().expect("no route label");
                let status = labels.get("status").cloned().expect("no status label");
                ((route, status), value as u64)
            })
            .collect()
    }

    /// The histogram's buckets as (upper bound, cumulative count), in the order of their bounds.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let mut buckets: Vec<(f64, u64)> = self
            .series_of(&format!("{HISTOGRAM}_bucket"))
            .into_iter()
            .map(|(labels, count)| {
                let le = labels.get("le").expect("bucket without le");
                (parse_value(le), count as u64)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

/// `name{a="x",b="y"} value` → (name, labels sorted by name, value). Label values may hold
/// `\\`, `\"` and `\n` escapes.
fn parse_sample(line: &str) -> (String, Vec<(String, String)>, f64) {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
    let name = &line[..name_end];
    let well_named = name.bytes().enumerate().all(|(i, b)| {
        b.is_ascii_alphabetic() || b == b'_' || b == b':' || (i > 0 && b.is_ascii_digit())
    });
    assert!(
        !name.is_empty() && well_named,
        "bad metric name in {line:?}"
    );
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut label = String::new();
        loop {
            let (i, c) = chars
                .next()
                .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' if label.is_empty() => continue,
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(escaped @ ('\\' | '"')) => value.push(escaped),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            },
                            Some(c) => value.push(c),
                            None => panic!("unclosed label value: {line:?}"),
                        }
                    }
                    labels.push((std::mem::take(&mut label), value));
                }
                c if c.is_ascii_alphanumeric() || c == '_' => label.push(c),
                _ => panic!("bad label syntax in {line:?}"),
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before the value: {line:?}"));
    labels.sort();
    (name.to_owned(), labels, parse_value(value))
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {text:?}")),
    }
}

/// The series key of `name` with `labels`, labels sorted by name.
fn series(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut labels = labels.to_vec();
    labels.sort();
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// `GET /metrics` with `headers`, checked to be a 200 in the Prometheus text format.
fn scrape_with(addr: SocketAddr, headers: &[(&str, &str)]) -> Scrape {
    let response = http(addr, "GET", "/metrics", headers, "");
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with(PROMETHEUS_TEXT),
        "Content-Type {content_type:?} is not {PROMETHEUS_TEXT}"
    );
    Scrape::parse(&response.body)
}

fn scrape(addr: SocketAddr) -> Scrape {
    scrape_with(addr, &[])
}

/// `POST /topics/{topic}/messages`, asserting the publish.
fn publish_over_http(addr: SocketAddr, topic: &str, payload: serde_json::Value) {
    let body = json!({ "payload": payload }).to_string();
    let response = post(addr, &format!("/topics/{topic}/messages"), &body);
    assert_eq!(response.expect_json(201)["status"], "published");
}

#[test]
fn a_fresh_server_declares_every_family_in_the_prometheus_text_format() {
    let server = Server::start();
    let scrape = scrape(server.addr);
    for (family, kind) in FAMILIES {
        assert_eq!(
            scrape.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}:\n{}",
            scrape.text
        );
        assert!(
            scrape.text.contains(&format!("# HELP {family} ")),
            "no # HELP for {family}"
        );
    }
    for counter in [
        "pubsub_connections_refused_total",
        "pubsub_topics",
        "pubsub_subscriptions",
        "pubsub_messages_published_total",
        "pubsub_events_delivered_total",
        "pubsub_metrics_topics_omitted",
        "pubsub_slow_consumer_disconnects_total",
        "pubsub_heartbeat_reaps_total",
    ] {
        assert_eq!(scrape.int(counter, &[]), 0, "{counter} on a fresh server");
    }
    for family in PER_TOPIC {
        assert!(
            scrape.series_of(family).is_empty(),
            "{family} without topics"
        );
    }
    assert_eq!(scrape.int(&format!("{HISTOGRAM}_count"), &[]), 0);
    assert_eq!(scrape.value(&format!("{HISTOGRAM}_sum"), &[]), 0.0);
    assert!(scrape.int("pubsub_uptime_seconds", &[]) < 60);
}

#[test]
fn connections_open_counts_websockets_and_http_connections() {
    let server = Server::start();
    let open = |kind: &str| scrape(server.addr).int("pubsub_connections_open", &[("kind", kind)]);
    // The scrape itself is the one open HTTP connection.
    wait_until("only the scrape is open", || {
        open("http") == 1 && open("websocket") == 0
    });
    let mut clients: Vec<WsClient> = (0..3).map(|_| WsClient::connect(server.addr)).collect();
    // A connection that has not finished its request line counts as HTTP (not yet routed).
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.write_all(b"GET /hea").unwrap();
    wait_until("3 WebSockets and 2 HTTP connections are open", || {
        open("websocket") == 3 && open("http") == 2
    });
    clients.pop().unwrap().close();
    drop(idle);
    wait_until("2 WebSockets and the scrape are open", || {
        open("websocket") == 2 && open("http") == 1
    });
    for client in &mut clients {
        client.ping();
    }
}

#[test]
fn totals_and_per_topic_counters_move_by_exactly_what_was_done() {
    let server = Server::start();
    create_topic(server.addr, "alpha");
    create_topic(server.addr, "beta");
    let mut alpha_1 = WsClient::connect(server.addr);
    let mut alpha_2 = WsClient::connect(server.addr);
    let mut beta_1 = WsClient::connect(server.addr);
    alpha_1.subscribe("alpha", None);
    alpha_2.subscribe("alpha", None);
    beta_1.subscribe("beta", None);
    let mut publisher = WsClient::connect(server.addr);
    publisher.publish_sequence("alpha", 0..3);
    publish_over_http(server.addr, "beta", json!({"seq": 0}));
    publish_over_http(server.addr, "beta", json!({"seq": 1}));
    assert_eq!(alpha_1.recv_sequence("alpha", 3), [0, 1, 2]);
    assert_eq!(alpha_2.recv_sequence("alpha", 3), [0, 1, 2]);
    assert_eq!(beta_1.recv_sequence("beta", 2), [0, 1]);

    let scrape = scrape(server.addr);
    let totals = [
        ("pubsub_topics", 2),
        ("pubsub_subscriptions", 3),
        ("pubsub_messages_published_total", 5),
        ("pubsub_events_delivered_total", 3 * 2 + 2),
    ];
    for (name, expected) in totals {
        assert_eq!(scrape.int(name, &[]), expected, "{name}");
    }
    let per_topic = [
        ("alpha", [2, 3, 6]),
        // One subscriber, two messages published over HTTP, two events.
        ("beta", [1, 2, 2]),
    ];
    for (topic, expected) in per_topic {
        for (family, expected) in PER_TOPIC.into_iter().zip(expected) {
            assert_eq!(
                scrape.int(family, &[("topic", topic)]),
                expected,
                "{family} {topic}"
            );
        }
    }
    for family in PER_TOPIC {
        assert_eq!(scrape.topics_of(family), ["alpha", "beta"], "{family}");
    }

    // Deleting a topic removes its series and its subscription; the totals keep what it did.
    delete(server.addr, "/topics/beta").expect_json(200);
    alpha_1.unsubscribe("alpha");
    let scrape = self::scrape(server.addr);
    let totals = [
        ("pubsub_topics", 1),
        ("pubsub_subscriptions", 1),
        ("pubsub_messages_published_total", 5),
        ("pubsub_events_delivered_total", 8),
    ];
    for (name, expected) in totals {
        assert_eq!(scrape.int(name, &[]), expected, "{name} after the delete");
    }
    for family in PER_TOPIC {
        assert_eq!(scrape.topics_of(family), ["alpha"], "{family}");
    }
    assert_eq!(
        scrape.int("pubsub_topic_subscriptions", &[("topic", "alpha")]),
        1
    );
}

#[test]
fn rest_requests_are_counted_by_route_and_status_without_raw_names() {
    let server = Server::start();
    // A scrape is counted once it has been answered, so this one shows no request yet.
    let first = scrape(server.addr);
    assert!(
        first.rest_requests().is_empty(),
        "{:?}",
        first.rest_requests()
    );

    create_topic(server.addr, "orders");
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_error(409, "TOPIC_EXISTS");
    delete(server.addr, "/topics/secret-topic-name").expect_json(404);
    http(server.addr, "GET", "/no/such/secret-path", &[], "").expect_error(404, "NOT_FOUND");
    http(server.addr, "GET", "/health", &[], "").expect_json(200);
    http(server.addr, "GET", "/health", &[], "").expect_json(200);
    http(server.addr, "PUT", "/topics", &[], "{}").expect_error(405, "METHOD_NOT_ALLOWED");
    publish_over_http(server.addr, "orders", json!(1));
    // WebSocket upgrades are not REST requests.
    WsClient::connect(server.addr).ping();

    let requests = scrape(server.addr).rest_requests();
    let expect = [
        ("/metrics", "200", 1),
        ("/topics", "201", 1),
        ("/topics", "409", 1),
        ("/topics", "405", 1),
        ("/topics/{name}", "404", 1),
        ("/health", "200", 2),
        ("/topics/{name}/messages", "201", 1),
    ];
    for (route, status, count) in expect {
        assert_eq!(
            requests.get(&(route.to_owned(), status.to_owned())),
            Some(&count),
            "route={route} status={status} in {requests:?}"
        );
    }
    let total: u64 = requests.values().sum();
    assert_eq!(total, 9, "every request counted once: {requests:?}");
    let not_found: u64 = requests
        .iter()
        .filter(|((_, status), _)| status == "404")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(not_found, 2, "{requests:?}");
    for (route, _) in requests.keys() {
        assert!(
            !route.contains("secret"),
            "a raw path became a label: {route}"
        );
    }
}

#[test]
fn per_topic_series_stop_at_the_first_100_topics_by_name() {
    let server = Server::start();
    // Created in reverse, so that "first" must mean first by name, not by age.
    let names: Vec<String> = (0..105).map(|n| format!("t{n:03}")).collect();
    for name in names.iter().rev() {
        create_topic(server.addr, name);
    }
    let last = &names[104];
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe(last, None);
    publish_over_http(server.addr, last, json!("beyond the cap"));
    subscriber.recv_event(last);

    let scrape = scrape(server.addr);
    assert_eq!(scrape.int("pubsub_topics", &[]), 105);
    assert_eq!(scrape.int("pubsub_metrics_topics_omitted", &[]), 5);
    for family in PER_TOPIC {
        assert_eq!(
            scrape.topics_of(family),
            names[..MAX_TOPIC_SERIES],
            "{family}"
        );
    }
    // The totals still cover the topics without series of their own.
    assert_eq!(scrape.int("pubsub_subscriptions", &[]), 1);
    assert_eq!(scrape.int("pubsub_messages_published_total", &[]), 1);
    assert_eq!(scrape.int("pubsub_events_delivered_total", &[]), 1);

    delete(server.addr, "/topics/t000").expect_json(200);
    let scrape = self::scrape(server.addr);
    assert_eq!(scrape.int("pubsub_metrics_topics_omitted", &[]), 4);
    for family in PER_TOPIC {
        assert_eq!(
            scrape.topics_of(family),
            names[1..=MAX_TOPIC_SERIES],
            "{family}"
        );
    }
}

/// One `GET /health` on a new connection: its status, or `None` if the server closed it
/// without an answer.
fn health_status(addr: SocketAddr) -> Option<u16> {
    let request = b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    try_http_raw(addr, request).map(|response| response.status)
}

#[test]
fn connections_refused_at_max_connections_are_counted() {
    let server = Server::start_with(&[("MAX_CONNECTIONS", "2")]);
    let mut held: Vec<WsClient> = (0..2).map(|_| WsClient::connect(server.addr)).collect();
    for client in &mut held {
        client.ping();
    }
    for _ in 0..3 {
        let request = b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        let response = try_http_raw(server.addr, request).expect("refused without a 503");
        let body = response.expect_json(503);
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    let mut refused = 3;
    held.pop().unwrap().close();
    // Until the closed connection's place is free, attempts are refused too: count them.
    wait_until("a connection is admitted again", || {
        match health_status(server.addr) {
            Some(200) => true,
            Some(503) | None => {
                refused += 1;
                false
            }
            Some(other) => panic!("GET /health answered {other}"),
        }
    });
    let scrape = loop {
        let request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        match try_http_raw(server.addr, request) {
            Some(response) if response.status == 200 => break Scrape::parse(&response.body),
            _ => refused += 1,
        }
    };
    assert_eq!(scrape.int("pubsub_connections_refused_total", &[]), refused);
    assert_eq!(
        scrape.int("pubsub_connections_open", &[("kind", "websocket")]),
        1
    );
}

/// Bytes of filler per event, so a few hundred events fill the kernel's socket buffers.
const FILLER_BYTES: usize = 64 * 1024;

/// Publishes beyond this many without a cut mean the server never cuts slow consumers.
const MAX_EVENTS: u64 = 3000;

/// Publishes large events to `topic` until its one subscriber is cut as a slow consumer.
fn publish_until_cut(server: &Server, topic: &str) {
    let mut publisher = WsClient::connect(server.addr);
    let filler = "x".repeat(FILLER_BYTES);
    (0..MAX_EVENTS)
        .find(|&seq| {
            publisher.publish(topic, json!({"seq": seq, "filler": filler}));
            subscriber_count(server.addr, topic) == 0
        })
        .expect("the slow subscriber was never cut");
}

#[test]
fn a_slow_consumer_cut_is_counted() {
    let server = Server::start_with(&[("QUEUE_SIZE", "8"), ("WRITE_TIMEOUT_SEC", "60")]);
    create_topic(server.addr, "orders");
    let mut slow = WsClient::connect(server.addr);
    slow.subscribe("orders", None);
    let mut healthy = WsClient::connect(server.addr);
    healthy.subscribe("orders", None);
    // The healthy subscriber reads everything, so only the slow one is cut.
    let healthy = thread::spawn(move || {
        healthy.recv_sequence_until_last("orders");
        healthy
    });
    let mut publisher = WsClient::connect(server.addr);
    let filler = "x".repeat(FILLER_BYTES);
    let cut_at = (0..MAX_EVENTS)
        .find(|&seq| {
            publisher.publish("orders", json!({"seq": seq, "filler": filler}));
            subscriber_count(server.addr, "orders") == 1
        })
        .expect("the slow subscriber was never cut");
    publisher.publish("orders", json!({"seq": cut_at + 1, "last": true}));
    let mut healthy = healthy.join().unwrap();
    // The slow client reads now: its events, then the error.
    let error = loop {
        let message = slow.recv_json();
        if message["type"] != "event" {
            break message;
        }
    };
    assert_error(&error, "SLOW_CONSUMER");
    let scrape = scrape(server.addr);
    assert_eq!(scrape.int("pubsub_slow_consumer_disconnects_total", &[]), 1);
    assert_eq!(scrape.int("pubsub_subscriptions", &[]), 1);
    healthy.ping();
}

#[test]
fn a_slow_consumer_that_never_reads_again_is_counted_too() {
    // The usual slow consumer is stuck for good: the server cuts it and, its socket full,
    // drops it at WRITE_TIMEOUT_SEC. That is a slow-consumer disconnect all the same.
    let server = Server::start_with(&[("QUEUE_SIZE", "8"), ("WRITE_TIMEOUT_SEC", "3")]);
    create_topic(server.addr, "orders");
    let mut stuck = WsClient::connect(server.addr);
    stuck.subscribe("orders", None);
    publish_until_cut(&server, "orders");
    wait_until("the stuck consumer's disconnect is counted", || {
        scrape(server.addr).int("pubsub_slow_consumer_disconnects_total", &[]) == 1
    });
    drop(stuck);
}

#[test]
fn a_heartbeat_reap_is_counted_and_a_clean_close_is_not() {
    let server = Server::start_with(&[("HEARTBEAT_SEC", "0.5")]);
    create_topic(server.addr, "orders");
    let mut closing = WsClient::connect(server.addr);
    closing.subscribe("orders", None);
    closing.close();
    let mut silent = WsClient::connect(server.addr);
    silent.subscribe("orders", None);
    // From here on `silent` never reads, so it never answers a ping.
    wait_until("the silent subscriber is removed", || {
        subscriber_count(server.addr, "orders") == 0
    });
    wait_until("the reap is counted", || {
        scrape(server.addr).int("pubsub_heartbeat_reaps_total", &[]) >= 1
    });
    assert_eq!(
        scrape(server.addr).int("pubsub_heartbeat_reaps_total", &[]),
        1
    );
    silent.expect_connection_ended();
}

#[test]
fn the_latency_histogram_counts_every_event_written_once() {
    const SUBSCRIBERS: usize = 3;
    const MESSAGES: u64 = 20;
    let expected = SUBSCRIBERS as u64 * MESSAGES;
    let server = Server::start();
    create_topic(server.addr, "orders");
    let mut subscribers: Vec<WsClient> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut client = WsClient::connect(server.addr);
            client.subscribe("orders", None);
            client
        })
        .collect();
    let mut publisher = WsClient::connect(server.addr);
    publisher.publish_sequence("orders", 0..MESSAGES / 2);
    for seq in MESSAGES / 2..MESSAGES {
        publish_over_http(server.addr, "orders", json!({ "seq": seq }));
    }
    for subscriber in &mut subscribers {
        assert_eq!(
            subscriber.recv_sequence("orders", MESSAGES as usize),
            (0..MESSAGES).collect::<Vec<_>>()
        );
    }
    // A writer records its events right after its flush, which the reader may beat.
    let count_name = format!("{HISTOGRAM}_count");
    wait_until("every written event is in the histogram", || {
        let count = scrape(server.addr).int(&count_name, &[]);
        assert!(
            count <= expected,
            "{count} events counted, {expected} written"
        );
        count == expected
    });

    let scrape = scrape(server.addr);
    assert_eq!(scrape.int(&count_name, &[]), expected);
    let buckets = scrape.buckets();
    assert_eq!(buckets.len(), 15, "14 bounds and +Inf: {buckets:?}");
    assert_eq!(buckets[0].0, 0.00005, "the first bound is 50 µs");
    assert_eq!(buckets[13].0, 5.0, "the last finite bound is 5 s");
    assert_eq!(buckets[14], (f64::INFINITY, expected));
    assert!(
        buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "buckets are not cumulative: {buckets:?}"
    );
    let sum = scrape.value(&format!("{HISTOGRAM}_sum"), &[]);
    assert!(
        sum > 0.0 && sum < expected as f64 * 5.0,
        "sum {sum} s for {expected} events on loopback"
    );
    // Replies that are not live events (acks, pongs) add nothing.
    publisher.ping();
    subscribers[0].ping();
    assert_eq!(self::scrape(server.addr).int(&count_name, &[]), expected);
}

/// The key the servers of the key tests are started with.
const KEY: &str = "metrics-k3y-0b9e";

#[test]
fn metrics_need_the_api_key_as_x_api_key_or_bearer_token() {
    let server = Server::start_with(&[("API_KEY", KEY)]);
    let bearer = format!("Bearer {KEY}");
    let wrong_bearer = format!("Bearer {KEY}x");
    let refused: [&[(&str, &str)]; 5] = [
        &[],
        &[("X-API-Key", "wrong")],
        &[("Authorization", &wrong_bearer)],
        // The key without the scheme, and under another scheme, are not bearer tokens.
        &[("Authorization", KEY)],
        &[("Authorization", "Basic bWV0cmljczprM3k=")],
    ];
    for headers in refused {
        http(server.addr, "GET", "/metrics", headers, "").expect_error(401, "UNAUTHORIZED");
    }
    scrape_with(server.addr, &[("X-API-Key", KEY)]);
    let scrape = scrape_with(server.addr, &[("Authorization", &bearer)]);
    let requests = scrape.rest_requests();
    let metrics = |status: &str| {
        requests
            .get(&("/metrics".to_owned(), status.to_owned()))
            .copied()
    };
    assert_eq!(
        (metrics("401"), metrics("200")),
        (Some(5), Some(1)),
        "{requests:?}"
    );
}
