//! Health: `GET /health` (uptime, topic and subscription counts), and
//! `pubsub-backend healthcheck`, the probe the Docker image's `HEALTHCHECK` runs: exit 0 when
//! `/health` answers 200, else a non-zero exit with one line on stderr, within Docker's timeout.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;

use crate::harness::{run_to_exit, wait_until, Finished, Server};
use crate::http_client::{create_topic, health};
use crate::ws_client::WsClient;

/// The key of the server the probe checks: `/health` needs none, so neither does the probe.
const KEY: &str = "health-k3y-5d2a";

#[test]
fn health_counts_topics_and_subscriptions_and_uptime_grows() {
    let server = Server::start();
    let initial = health(server.addr);
    assert_eq!(initial["topics"], 0, "{initial}");
    assert_eq!(initial["subscribers"], 0, "{initial}");
    assert!(
        initial["uptime_sec"].is_u64(),
        "uptime_sec not an integer: {initial}"
    );

    create_topic(server.addr, "orders");
    create_topic(server.addr, "alerts");
    let mut subscriber = WsClient::connect(server.addr);
    subscriber.subscribe("orders", None);
    subscriber.subscribe("alerts", None);
    let mut other_subscriber = WsClient::connect(server.addr);
    other_subscriber.subscribe("orders", None);
    let busy = health(server.addr);
    assert_eq!(busy["topics"], 2, "{busy}");
    assert_eq!(busy["subscribers"], 3, "one per subscription: {busy}");

    wait_until("uptime_sec reaches 1", || {
        health(server.addr)["uptime_sec"].as_u64() >= Some(1)
    });
}

/// `pubsub-backend healthcheck` against port `port` of 127.0.0.1.
fn healthcheck(port: u16, overrides: &[(&str, &str)]) -> Finished {
    let port = port.to_string();
    let mut env = vec![("PORT", port.as_str())];
    env.extend_from_slice(overrides);
    run_to_exit(&["healthcheck"], &env)
}

#[test]
fn healthcheck_exits_0_when_the_server_answers() {
    let server = Server::start_with(&[("API_KEY", KEY)]);
    let port = server.addr.port();
    // /health needs no key, so neither does the probe; HOST=0.0.0.0 (a container's) means
    // this machine's loopback.
    for host in ["127.0.0.1", "0.0.0.0"] {
        let run = healthcheck(port, &[("HOST", host)]);
        assert_eq!(run.code, Some(0), "HOST={host}: {run:?}");
        assert_eq!(run.stderr, "", "{run:?}");
    }
    // The flag overrides the environment, as for the server.
    let flag = run_to_exit(
        &["healthcheck", "--port", &port.to_string()],
        &[("PORT", "1")],
    );
    assert_eq!(flag.code, Some(0), "{flag:?}");
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts a failed probe: non-zero exit and one line on stderr.
fn assert_unhealthy(run: &Finished, mentions: &str) {
    assert!(
        matches!(run.code, Some(code) if code != 0),
        "exit code {:?}: {run:?}",
        run.code
    );
    let lines: Vec<&str> = run.stderr.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one stderr line: {run:?}");
    assert!(lines[0].contains(mentions), "{run:?}");
}

#[test]
fn healthcheck_fails_with_one_line_when_nothing_listens() {
    let port = free_port();
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, &port.to_string());
}

/// Serves one connection with `answer` (after reading the request), or with silence.
fn fake_server(answer: Option<&'static str>) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // The whole request head first, however many writes it came in.
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|window| window == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        match answer {
            Some(answer) => {
                let _ = stream.write_all(answer.as_bytes());
            }
            // Hold the connection until the probe gives up and closes it.
            None => while stream.read(&mut chunk).is_ok_and(|n| n > 0) {},
        }
    });
    (port, handle)
}

#[test]
fn healthcheck_fails_when_health_is_not_200() {
    let answer =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (port, server) = fake_server(Some(answer));
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, "503");
    server.join().unwrap();
}

#[test]
fn healthcheck_gives_up_on_a_server_that_never_answers() {
    // run_to_exit allows 5 s: within Docker's --timeout=5s of the image's HEALTHCHECK.
    let (port, server) = fake_server(None);
    let run = healthcheck(port, &[]);
    assert_unhealthy(&run, &port.to_string());
    server.join().unwrap();
}
