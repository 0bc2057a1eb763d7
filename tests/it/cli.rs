//! The binary as a client: `pubsub-backend sub`, `pub`, `topics`, `create`, `delete` and
//! `history`, run as child processes against a real server, exactly as a shell script would.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;

use serde_json::Value;

use crate::harness::{wait_until, Server, DEADLINE};
use crate::http_client::{get, post};
use crate::redis::Redis;

/// The client with `args`, pointed at `server`, in an empty environment but for `env`.
fn client(server: &Server, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pubsub-backend"));
    command
        .args(args)
        .env_clear()
        .env("PUBSUB_URL", format!("http://{}", server.addr))
        .envs(env.iter().copied());
    command
}

/// Runs the client to its end with `stdin` as its standard input.
fn run(server: &Server, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = client(server, args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the client");
    // Written from a thread of its own: the client's output is read only at its end, so a
    // long input written here could wait on a client waiting for its output to be read.
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    thread::spawn(move || input.write_all(stdin.as_bytes()));
    wait_for_output(child)
}

fn wait_for_output(child: Child) -> Output {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(child.wait_with_output()));
    rx.recv_timeout(DEADLINE * 3)
        .expect("the client did not finish in time")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running `sub`, whose standard output is read line by line.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn start(server: &Server, args: &[&str]) -> Sub {
        let (resume, paused) = mpsc::channel();
        resume.send(()).unwrap();
        Sub::start_paused(server, args, paused)
    }

    /// A `sub` whose output is not read until `resume` sends: meanwhile its pipe fills and it
    /// blocks writing, as a consumer that cannot keep up.
    fn start_paused(server: &Server, args: &[&str], resume: mpsc::Receiver<()>) -> Sub {
        let mut child = client(server, args, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start sub");
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            if resume.recv().is_err() {
                return;
            }
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Sub { child, lines }
    }

    /// The next `count` events it prints, each checked to be one JSON event per line.
    fn events(&self, count: usize) -> Vec<Value> {
        (0..count)
            .map(|n| {
                let line = self
                    .lines
                    .recv_timeout(DEADLINE)
                    .unwrap_or_else(|_| panic!("sub printed {n} of {count} events"));
                let event: Value = serde_json::from_str(&line).expect("a JSON line");
                assert_eq!(event["type"], "event", "{line}");
                event
            })
            .collect()
    }

    /// SIGTERM, then its exit status and standard error.
    fn stop(self) -> (i32, String) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let output = wait_for_output(self.child);
        (output.status.code().unwrap_or(-1), text(&output.stderr))
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn lines(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("{{\"n\":{i}}}\n"))
        .collect()
}

#[test]
fn sub_prints_every_event_of_a_pub_stream_in_order() {
    let server = Server::start();
    let created = run(&server, &["create", "orders"], &[], "");
    assert!(created.status.success(), "{}", text(&created.stderr));
    assert_eq!(
        serde_json::from_slice::<Value>(&created.stdout).unwrap()["status"],
        "created"
    );
    let sub = Sub::start(&server, &["sub", "orders"]);
    wait_until("sub has subscribed", || {
        get(server.addr, "/topics").json()["topics"][0]["subscribers"] == 1
    });
    let published = run(&server, &["pub", "orders"], &[], &lines(200, 1));
    assert!(published.status.success(), "{}", text(&published.stderr));
    let acks: Vec<u64> = text(&published.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(acks, (1..=200).collect::<Vec<_>>(), "one seq per line");
    let events = sub.events(200);
    assert_eq!(seqs(&events), acks);
    let payloads: Vec<u64> = events
        .iter()
        .map(|e| e["message"]["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(payloads, (1..=200).collect::<Vec<_>>());
    let (code, stderr) = sub.stop();
    assert_eq!(code, 0, "SIGTERM ends sub with 0: {stderr}");

    let count = run(
        &server,
        &["sub", "orders", "--last-n", "5", "--count", "5"],
        &[],
        "",
    );
    assert!(count.status.success(), "{}", text(&count.stderr));
    let replayed: Vec<u64> = text(&count.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        replayed,
        (196..=200).collect::<Vec<_>>(),
        "--last-n 5 --count 5"
    );
    let history = run(&server, &["history", "orders", "--since", "198"], &[], "");
    let history: Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "{history}"
    );
}

#[test]
fn pub_stops_at_a_bad_line_naming_it_after_publishing_the_lines_before() {
    let server = Server::start();
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let output = run(
        &server,
        &["pub", "orders"],
        &[],
        "{\"ok\":1}\n[2]\n{not json}\n\"4\"\n",
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("invalid JSON"),
        "{stderr}"
    );
    assert_eq!(text(&output.stdout), "1\n2\n", "the acks of lines 1 and 2");
    let history = get(server.addr, "/topics/orders/messages").expect_json(200);
    let payloads: Vec<&Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["payload"])
        .collect();
    assert_eq!(
        payloads,
        [&serde_json::json!({"ok": 1}), &serde_json::json!([2])]
    );

    let missing = run(&server, &["pub", "nope", "1"], &[], "");
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("TOPIC_NOT_FOUND"),
        "{}",
        text(&missing.stderr)
    );
    let usage = run(&server, &["pub"], &[], "");
    assert_eq!(usage.status.code(), Some(2), "a usage error");
}

#[test]
fn sub_says_what_a_resume_could_not_recover_and_goes_on_live() {
    let server = Server::start_with(&[("RING_SIZE", "5")]);
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let epoch = get(server.addr, "/topics/orders/messages").expect_json(200)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let published = run(&server, &["pub", "orders"], &[], &lines(20, 1));
    assert!(published.status.success());
    let sub = Sub::start(
        &server,
        &["sub", "orders", "--since", "2", "--epoch", &epoch],
    );
    wait_until("sub has subscribed", || {
        get(server.addr, "/topics").json()["topics"][0]["subscribers"] == 1
    });
    run(&server, &["pub", "orders", "{\"n\":21}"], &[], "");
    assert_eq!(
        seqs(&sub.events(1)),
        [21],
        "live after the loss, nothing replayed"
    );
    let (code, stderr) = sub.stop();
    assert_eq!(code, 0);
    assert!(
        stderr.contains("recovered false") && stderr.contains("after seq 2 up to seq 20"),
        "{stderr}"
    );
}

#[test]
fn sub_resumes_without_a_gap_across_a_server_restart() {
    // In cluster mode the topic and its history outlive the instance, as they would across a
    // rolling restart behind a load balancer.
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let server = Server::start_with(&[("REDIS_URL", &url)]);
    let port = server.addr.port().to_string();
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let sub = Sub::start(&server, &["sub", "orders"]);
    wait_until("sub has subscribed", || {
        get(server.addr, "/topics").json()["topics"][0]["subscribers"] == 1
    });
    run(&server, &["pub", "orders"], &[], &lines(10, 1));
    assert_eq!(seqs(&sub.events(10)), (1..=10).collect::<Vec<_>>());

    let mut server = server;
    server.sigterm();
    assert!(
        server.wait_exit(DEADLINE).is_some(),
        "the server did not stop"
    );
    // Published while the instance is down, through another one.
    let other = Server::start_with(&[("REDIS_URL", &url)]);
    run(&other, &["pub", "orders"], &[], &lines(5, 11));
    let restarted = Server::start_with(&[("REDIS_URL", &url), ("PORT", &port)]);
    run(&restarted, &["pub", "orders"], &[], &lines(5, 16));
    assert_eq!(
        seqs(&sub.events(10)),
        (11..=20).collect::<Vec<_>>(),
        "resumed after seq 10, nothing lost or repeated"
    );
    let (code, stderr) = sub.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(!stderr.contains("recovered false"), "{stderr}");
}

#[test]
fn sub_resumes_after_a_slow_consumer_cut() {
    // Nobody reads sub's output for a while: its pipe, then its socket, then its queue at the
    // server fill up, and the server cuts it. Once read again, it resumes from the ring.
    let server = Server::start_with(&[("QUEUE_SIZE", "8"), ("RING_SIZE", "100000")]);
    post(server.addr, "/topics", r#"{"name":"orders"}"#).expect_json(201);
    let (resume, paused) = mpsc::channel();
    let sub = Sub::start_paused(&server, &["sub", "orders"], paused);
    wait_until("sub has subscribed", || {
        get(server.addr, "/topics").json()["topics"][0]["subscribers"] == 1
    });
    const COUNT: usize = 20_000;
    let padding = "x".repeat(1000);
    let stream: String = (1..=COUNT)
        .map(|n| format!("{{\"n\":{n},\"pad\":\"{padding}\"}}\n"))
        .collect();
    let published = run(&server, &["pub", "orders"], &[], &stream);
    assert!(published.status.success(), "{}", text(&published.stderr));
    // At least once: a sub starved of CPU on a busy machine can be cut before its pipe is
    // full, read the error, resume, and be cut again once it is.
    wait_until("the server has cut sub", || {
        let metrics = get(server.addr, "/metrics").body;
        metrics
            .lines()
            .filter_map(|line| line.strip_prefix("pubsub_slow_consumer_disconnects_total "))
            .any(|cuts| cuts.parse::<u64>().is_ok_and(|cuts| cuts >= 1))
    });
    resume.send(()).unwrap();
    let events = sub.events(COUNT);
    assert_eq!(seqs(&events), (1..=COUNT as u64).collect::<Vec<_>>());
    let (code, stderr) = sub.stop();
    assert_eq!(code, 0);
    assert!(stderr.contains("slow consumer"), "{stderr}");
}

#[test]
fn the_client_presents_the_api_key() {
    let server = Server::start_with(&[("API_KEY", "s3cret")]);
    let refused = run(&server, &["create", "orders"], &[], "");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("401"),
        "{}",
        text(&refused.stderr)
    );
    let created = run(
        &server,
        &["create", "orders", "--api-key", "s3cret"],
        &[],
        "",
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let key = [("API_KEY", "s3cret")];
    let published = run(&server, &["pub", "orders", "[1]"], &key, "");
    assert!(published.status.success(), "{}", text(&published.stderr));
    assert_eq!(text(&published.stdout), "1\n");
    let refused = run(&server, &["pub", "orders", "[2]"], &[], "");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("401"),
        "{}",
        text(&refused.stderr)
    );
    let sub = run(
        &server,
        &["sub", "orders", "--last-n", "1", "--count", "1"],
        &key,
        "",
    );
    assert!(sub.status.success(), "{}", text(&sub.stderr));
    let event: Value = serde_json::from_slice(&sub.stdout).unwrap();
    assert_eq!(event["message"]["payload"], serde_json::json!([1]));
    let wrong = run(&server, &["sub", "orders"], &[("API_KEY", "wrong")], "");
    assert!(
        !wrong.status.success(),
        "sub gives up on a wrong key instead of retrying"
    );
}
