//! `rest`: C keep-alive connections sending `GET /health` back to back, and alongside them
//! `--cycle-connections` connections creating and deleting topics (`POST /topics` then
//! `DELETE /topics/{name}`), each kind with its own rate and latency.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::net::HttpConn;
use crate::stats::{self, thousands, CpuWindow, Latency};
use crate::wire;
use crate::{progress, Args, Ctx, Result};

pub struct Options {
    duration: Duration,
    connections: usize,
    cycle_connections: usize,
}

impl Options {
    /// `--duration SEC` (10) `--connections C` (8) `--cycle-connections N` (1).
    pub fn parse(args: &mut Args) -> Result<Options> {
        Ok(Options {
            duration: args.seconds("duration", 10.0)?,
            connections: args.get("connections", 8)?,
            cycle_connections: args.get("cycle-connections", 1)?,
        })
    }

    pub fn expected(&self) -> Duration {
        self.duration + Duration::from_secs(10)
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Value> {
        let end = Instant::now() + self.duration;
        let cpu = CpuWindow::start(ctx.server_pid);
        let health: Vec<_> = (0..self.connections)
            .map(|_| {
                let mut http = HttpConn::new(&ctx.target);
                tokio::spawn(async move {
                    let mut kind = Kind::default();
                    while Instant::now() < end {
                        kind.time(http.request("GET", "/health", None), 200).await;
                    }
                    kind.reconnects = http.reconnects;
                    kind
                })
            })
            .collect();
        let cycles: Vec<_> = (0..self.cycle_connections)
            .map(|c| {
                let mut http = HttpConn::new(&ctx.target);
                let prefix = ctx.topic_name(format!("rest-{c}"));
                tokio::spawn(async move {
                    let (mut create, mut delete) = (Kind::default(), Kind::default());
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let name = format!("{prefix}-{n}");
                        let body = wire::topic_body(&name);
                        create
                            .time(http.request("POST", "/topics", Some(&body)), 201)
                            .await;
                        let path = format!("/topics/{name}");
                        delete.time(http.request("DELETE", &path, None), 200).await;
                        n += 1;
                    }
                    create.reconnects = http.reconnects;
                    (create, delete)
                })
            })
            .collect();

        let (mut get, mut create, mut delete) = (Kind::default(), Kind::default(), Kind::default());
        for task in health {
            get.merge(task.await?);
        }
        for task in cycles {
            let (c, d) = task.await?;
            create.merge(c);
            delete.merge(d);
        }
        let cpu = cpu.finish();
        let secs = cpu["window_secs"].as_f64().unwrap_or(1.0);
        progress!(
            "{} health requests, {} create/delete cycles",
            get.requests(),
            create.requests()
        );
        let mut report = json!({
            "duration_secs": self.duration.as_secs_f64(),
            "connections": self.connections,
            "cycle_connections": self.cycle_connections,
            "health": get.report(secs),
            "create": create.report(secs),
            "delete": delete.report(secs),
            "requests_per_sec": stats::round(
                (get.requests() + create.requests() + delete.requests()) as f64 / secs,
                1
            ),
            "summary": format!(
                "GET /health {}/s; POST+DELETE {} cycles/s",
                thousands(get.requests() as f64 / secs),
                thousands(delete.requests() as f64 / secs)
            ),
            "latency_summary": format!("health {}", get.latency.p50_p99()),
        });
        stats::extend(&mut report, cpu);
        Ok(report)
    }
}

/// Requests of one kind: their latency, failures and reconnections.
#[derive(Default)]
struct Kind {
    latency: Latency,
    errors: u64,
    reconnects: u64,
}

impl Kind {
    /// Times one request; a transport error or another status than `expect` is an error.
    async fn time(
        &mut self,
        request: impl std::future::Future<Output = Result<(u16, Vec<u8>)>>,
        expect: u16,
    ) {
        let started = Instant::now();
        let result = request.await;
        self.latency.record(started.elapsed());
        match result {
            Ok((status, _)) if status == expect => {}
            Ok((status, body)) => {
                self.errors += 1;
                if self.errors <= 3 {
                    progress!("unexpected {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Err(error) => {
                self.errors += 1;
                if self.errors <= 3 {
                    progress!("request failed: {error}");
                }
            }
        }
    }

    fn requests(&self) -> u64 {
        self.latency.count()
    }

    fn merge(&mut self, other: Kind) {
        self.latency.merge(&other.latency);
        self.errors += other.errors;
        self.reconnects += other.reconnects;
    }

    fn report(&self, secs: f64) -> Value {
        json!({
            "requests": self.requests(),
            "requests_per_sec": stats::round(self.requests() as f64 / secs, 1),
            "latency_us": self.latency.summary(),
            "errors": self.errors,
            "reconnects": self.reconnects,
        })
    }
}
