//! `conns`: N idle subscribers on one topic, connected from several loopback source addresses
//! (127.0.0.2 ..= 127.0.0.(1+sources)) with bounded concurrency; the server's RSS and threads
//! before and after; then one publish, and how long until each subscriber has it.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Ending, Target};
use crate::stats::{self, round, status_field, tally, CpuWindow, Latency, Tally};
use crate::wire::{self, Incoming};
use crate::{now_ns, progress, Args, Ctx, Result};

pub struct Options {
    connections: usize,
    sources: u8,
    concurrency: usize,
    /// Pause between the last connect and the RSS reading, so the server's threads settle.
    settle: Duration,
    /// Longest wait for the broadcast to reach everyone.
    wait: Duration,
}

impl Options {
    /// `--connections N` (1000) `--sources S` (8) `--concurrency C` (200) `--settle SEC` (1)
    /// `--wait SEC` (10); `--server-pid` is required for the RSS figures.
    pub fn parse(args: &mut Args) -> Result<Options> {
        let options = Options {
            connections: args.get("connections", 1000)?,
            sources: args.get("sources", 8)?,
            concurrency: args.get("concurrency", 200)?,
            settle: args.seconds("settle", 1.0)?,
            wait: args.seconds("wait", 10.0)?,
        };
        if !(1..=250).contains(&options.sources) || options.connections == 0 {
            return Err("--sources must be 1 to 250 and --connections at least 1".into());
        }
        Ok(options)
    }

    pub fn expected(&self) -> Duration {
        Duration::from_millis(5 * self.connections as u64) + self.settle + self.wait * 2
    }

    fn source(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(self.sources)) as u8)
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Value> {
        let pid = ctx
            .server_pid
            .ok_or("conns needs --server-pid for the server's RSS")?
            .to_string();
        let topic = ctx.topic_name("conns");
        net::create_topics(&ctx.target, std::slice::from_ref(&topic)).await?;
        let report = self.measure(ctx, &pid, &topic).await;
        net::delete_topics(&ctx.target, &[topic]).await;
        report
    }

    async fn measure(&self, ctx: &Ctx, pid: &str, topic: &str) -> Result<Value> {
        // The publisher connects first: a server that refuses connections past its limit would
        // otherwise refuse it once the subscribers are in.
        let mut publisher = net::connect_ws(&ctx.target, None).await?;
        let rss_before = status_field(pid, "VmRSS").ok_or("cannot read the server's VmRSS")?;
        let threads_before = status_field(pid, "Threads");
        let cpu = CpuWindow::start(ctx.server_pid);

        // Each subscriber writes the time its event arrived into its slot (0: not yet).
        let arrivals: Arc<Vec<AtomicU64>> =
            Arc::new((0..self.connections).map(|_| AtomicU64::new(0)).collect());
        let (stop, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let tasks: Vec<_> = (0..self.connections)
            .map(|index| {
                let idle = IdleSubscriber {
                    target: ctx.target.clone(),
                    source: self.source(index),
                    topic: topic.to_string(),
                    index,
                    arrivals: Arc::clone(&arrivals),
                    stop: stop_rx.clone(),
                };
                tokio::spawn(idle.run(Arc::clone(&limit), ready_tx.clone()))
            })
            .collect();
        drop(ready_tx);

        let (mut connected, mut failures) = (0usize, Tally::new());
        for done in 1..=self.connections {
            match ready_rx.recv().await {
                Some(Ok(())) => connected += 1,
                Some(Err(error)) => tally(&mut failures, error),
                None => return Err("idle subscriber tasks ended early".into()),
            }
            if done % 1000 == 0 {
                progress!("{connected} connected, {} failed", done - connected);
            }
        }
        let connect_secs = started.elapsed().as_secs_f64();
        progress!("{connected} idle subscribers in {connect_secs:.2} s");

        tokio::time::sleep(self.settle).await;
        let rss_after = status_field(pid, "VmRSS").unwrap_or(0);
        let threads_after = status_field(pid, "Threads");

        // One publish, and the time each subscriber took to get it.
        let sent = now_ns();
        let publish = wire::Publisher::new(topic.to_string(), 0, 64).publish(0, sent);
        let published = publisher.send(Message::text(publish)).await;
        let wait_until = Instant::now() + self.wait;
        let received = || arrivals.iter().filter(|a| a.load(Relaxed) != 0).count();
        while published.is_ok() && received() < connected && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut broadcast = Latency::default();
        for arrival in arrivals.iter().map(|a| a.load(Relaxed)).filter(|&a| a != 0) {
            broadcast.record_ns(arrival.saturating_sub(sent));
        }
        let cpu = cpu.finish();
        let server_exited = status_field(pid, "VmRSS").is_none();

        let _ = stop.send(true);
        let mut dropped = 0u64;
        for task in tasks {
            dropped += u64::from(task.await?);
        }
        let rss_per_conn = (rss_after.saturating_sub(rss_before)) as f64 / connected.max(1) as f64;
        let received = broadcast.count();
        let mut report = json!({
            "connections": self.connections,
            "connected": connected,
            "connect_failures": failures.values().sum::<u64>(),
            "failure_reasons": failures,
            "sources": self.sources,
            "connect_secs": round(connect_secs, 2),
            "connects_per_sec": round(connected as f64 / connect_secs, 1),
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "rss_per_conn_kb": round(rss_per_conn, 2),
            "threads_before": threads_before,
            "threads_after": threads_after,
            "received": received,
            "broadcast_us": broadcast.summary(),
            "loadgen_rss_kb": status_field("self", "VmRSS"),
            "dropped_by_server": dropped,
            "server_exited": server_exited,
            "broadcast_error": published.as_ref().err().map(|e| e.to_string()),
            "summary": format!(
                "{connected}/{} held{}, {received} got the event, {rss_per_conn:.1} KiB RSS/conn{}",
                self.connections,
                main_failure(&failures),
                if server_exited { " (SERVER EXITED)" } else { "" }
            ),
            "latency_summary": broadcast.p50_p99(),
        });
        stats::extend(&mut report, cpu);
        Ok(report)
    }
}

/// ` (N failed, most: REASON)` when connections failed, for the one-line summary.
fn main_failure(failures: &Tally) -> String {
    match failures.iter().max_by_key(|(_, n)| **n) {
        None => String::new(),
        Some((reason, _)) => format!(
            " ({} failed, most: {reason})",
            failures.values().sum::<u64>()
        ),
    }
}

/// One idle subscriber: it notes when the broadcast reaches it and holds its connection until
/// told to stop.
struct IdleSubscriber {
    target: Target,
    source: Ipv4Addr,
    topic: String,
    index: usize,
    /// Arrival time of the event (`now_ns`) per subscriber; 0 until it comes.
    arrivals: Arc<Vec<AtomicU64>>,
    stop: watch::Receiver<bool>,
}

impl IdleSubscriber {
    /// Connects within the concurrency `limit`, says on `ready` whether it could, then reads
    /// until stopped. Returns whether the server ended the connection first.
    async fn run(
        mut self,
        limit: Arc<Semaphore>,
        ready: mpsc::UnboundedSender<std::result::Result<(), String>>,
    ) -> bool {
        let connected = {
            let _permit = limit.acquire().await;
            let client_id = format!("lg-idle-{}", self.index);
            net::subscriber(&self.target, Some(self.source), &self.topic, &client_id).await
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(error) => {
                let _ = ready.send(Err(error.to_string()));
                return false;
            }
        };
        let _ = ready.send(Ok(()));
        let arrival = &self.arrivals[self.index];
        let ending = net::read_until_stopped(&mut ws, &mut self.stop, |text| {
            if let Incoming::Event { .. } = wire::classify(text) {
                let _ = arrival.compare_exchange(0, now_ns(), Relaxed, Relaxed);
            }
        })
        .await;
        !matches!(ending, Ending::Stopped)
    }
}
