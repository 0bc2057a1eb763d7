//! `ready`: starts the server binary itself (`HOST=127.0.0.1`, a free port, `LOG_LEVEL=WARN`)
//! and measures the time from exec to the first `200` on `GET /health`, its RSS and threads
//! right then, and how long it takes to exit after SIGTERM. Repeated `--runs` times.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::stats::{round, status_field};
use crate::{progress, Args, Result, CHILDREN};

/// Longest wait for the server to answer, and for it to exit after SIGTERM.
const START_DEADLINE: Duration = Duration::from_secs(5);
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

pub struct Options {
    server_bin: PathBuf,
    runs: usize,
}

/// One start of the server.
struct Sample {
    ready_ms: f64,
    rss_kb: u64,
    threads: u64,
    exit_ms: f64,
}

impl Options {
    /// `--server-bin PATH` (required) `--runs N` (5).
    pub fn parse(args: &mut Args) -> Result<Options> {
        Ok(Options {
            server_bin: args.required("server-bin")?,
            runs: args.get::<usize>("runs", 5)?.max(1),
        })
    }

    pub fn expected(&self) -> Duration {
        (START_DEADLINE + EXIT_DEADLINE) * self.runs as u32
    }

    pub fn run(self) -> Result<Value> {
        let samples = (0..self.runs)
            .map(|_| self.start_once())
            .collect::<Result<Vec<_>>>()?;
        let median = |f: fn(&Sample) -> f64| {
            let mut values: Vec<f64> = samples.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let ready_ms = median(|s| s.ready_ms);
        let rss_kb = median(|s| s.rss_kb as f64);
        Ok(json!({
            "runs": self.runs,
            "ready_ms": {
                "median": ready_ms,
                "min": samples.iter().map(|s| s.ready_ms).fold(f64::INFINITY, f64::min),
                "max": samples.iter().map(|s| s.ready_ms).fold(0.0, f64::max),
            },
            "idle_rss_kb": rss_kb,
            "threads": median(|s| s.threads as f64),
            "exit_after_sigterm_ms": median(|s| s.exit_ms),
            "summary": format!("ready in {ready_ms:.2} ms (median of {}), idle RSS {rss_kb} KiB", self.runs),
            "latency_summary": "-",
        }))
    }

    fn start_once(&self) -> Result<Sample> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = Instant::now();
        let child = Command::new(&self.server_bin)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("LOG_LEVEL", "WARN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.server_bin.display()))?;
        let mut server = Server::track(child);
        while !health_answers(addr) {
            if let Some(status) = server.child.try_wait()? {
                return Err(format!("the server exited before it answered: {status}").into());
            }
            if started.elapsed() > START_DEADLINE {
                return Err("the server did not answer GET /health in time".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let ready_ms = started.elapsed().as_secs_f64() * 1_000.0;
        let pid = server.child.id().to_string();
        let rss_kb = status_field(&pid, "VmRSS").unwrap_or(0);
        let threads = status_field(&pid, "Threads").unwrap_or(0);
        let stopping = Instant::now();
        terminate(server.child.id());
        while server.child.try_wait()?.is_none() {
            if stopping.elapsed() > EXIT_DEADLINE {
                return Err("the server did not exit after SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let exit_ms = stopping.elapsed().as_secs_f64() * 1_000.0;
        progress!("ready in {ready_ms:.2} ms, RSS {rss_kb} KiB, {threads} threads, exit in {exit_ms:.1} ms");
        Ok(Sample {
            ready_ms: round(ready_ms, 2),
            rss_kb,
            threads,
            exit_ms: round(exit_ms, 1),
        })
    }
}

/// A started server, killed if it is still running when dropped (an error on the way).
struct Server {
    child: Child,
}

impl Server {
    fn track(child: Child) -> Server {
        lock_children().push(child.id());
        Server { child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        lock_children().retain(|&pid| pid != self.child.id());
    }
}

fn lock_children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends SIGTERM (through kill(1): loadgen has no unsafe code).
pub fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Whether `GET /health` gets a `200` on a fresh connection.
fn health_answers(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(100))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        // The status line is enough: no need to wait for the body or the close.
        let mut response = [0u8; 12];
        stream.read_exact(&mut response)?;
        Ok(&response == b"HTTP/1.1 200")
    };
    attempt().unwrap_or(false)
}
