//! Measurements: latency histograms, per-publisher sequence checks, and readings from `/proc`
//! (CPU time, RSS, threads) of loadgen itself and of the server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latencies in nanoseconds, 3 significant digits, from 1 µs up to 60 s (longer ones count as
/// 60 s).
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds"))
    }
}

impl Latency {
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1_000));
    }

    pub fn record(&mut self, elapsed: Duration) {
        self.record_ns(elapsed.as_nanos().min(u64::MAX as u128) as u64);
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0.add(&other.0).expect("same bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    fn quantile_us(&self, q: f64) -> f64 {
        round(self.0.value_at_quantile(q) as f64 / 1_000.0, 1)
    }

    /// `{"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"mean":..,"count":..}` in microseconds.
    pub fn summary(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0});
        }
        json!({
            "p50": self.quantile_us(0.5),
            "p90": self.quantile_us(0.9),
            "p99": self.quantile_us(0.99),
            "p999": self.quantile_us(0.999),
            "max": round(self.0.max() as f64 / 1_000.0, 1),
            "mean": round(self.0.mean() / 1_000.0, 1),
            "count": self.0.len(),
        })
    }

    /// `p50 X / p99 Y` with units, for the one-line summary.
    pub fn p50_p99(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        format!(
            "{} / {}",
            human_us(self.quantile_us(0.5)),
            human_us(self.quantile_us(0.99))
        )
    }
}

/// `x` rounded to `decimals` places, for readable JSON.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

fn human_us(us: f64) -> String {
    if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// `1234567.8` → `"1,234,568"`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Checks that one publisher's sequence numbers arrive once each and in order.
#[derive(Default)]
pub struct SeqTracker {
    next: u64,
    /// Numbers skipped over and not (yet) seen: holes, or late arrivals to come.
    missing: BTreeSet<u64>,
    /// Holes too many to list one by one.
    untracked: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

/// Skipped numbers listed per tracker before they are only counted.
const MAX_LISTED_MISSING: usize = 100_000;

impl SeqTracker {
    pub fn observe(&mut self, seq: u64) {
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            let skipped = seq - self.next;
            if self.missing.len() as u64 + skipped <= MAX_LISTED_MISSING as u64 {
                self.missing.extend(self.next..seq);
            } else {
                self.untracked += skipped;
            }
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.out_of_order += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// Numbers below the highest seen that never arrived.
    pub fn gaps(&self) -> u64 {
        self.missing.len() as u64 + self.untracked
    }
}

/// Counts by name (error codes, failure reasons).
pub type Tally = BTreeMap<String, u64>;

pub fn tally(counts: &mut Tally, key: impl Into<String>) {
    *counts.entry(key.into()).or_default() += 1;
}

pub fn merge_tally(into: &mut Tally, from: &Tally) {
    for (key, n) in from {
        *into.entry(key.clone()).or_default() += n;
    }
}

/// `utime + stime` of a process (`"self"` or a pid), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with field 3, `state`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`): 100 on every Linux build that matters here.
const TICKS_PER_SEC: f64 = 100.0;

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`) or as a count (`Threads`).
pub fn status_field(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Busy time of the whole machine, all cores, in clock ticks: the first line of `/proc/stat`
/// less idle and iowait.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some(ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?)
}

/// CPU ticks of loadgen, the server and the machine at one moment.
#[derive(Clone, Copy)]
struct CpuReading {
    own: Option<u64>,
    server: Option<u64>,
    machine: Option<u64>,
}

/// CPU use over a measured window, as % of one core (the machine has two): loadgen's, the
/// server's, and what everything else on the machine used meanwhile (`other_cpu_pct`, which
/// should be near 0 for numbers worth keeping).
pub struct CpuWindow {
    started: Instant,
    server_pid: Option<String>,
    at_start: CpuReading,
}

impl CpuWindow {
    pub fn start(server_pid: Option<u32>) -> CpuWindow {
        let server_pid = server_pid.map(|pid| pid.to_string());
        CpuWindow {
            started: Instant::now(),
            at_start: read_cpu(server_pid.as_deref()),
            server_pid,
        }
    }

    /// `{"window_secs", "loadgen_cpu_pct", "loadgen_cpu_secs", "server_cpu_pct",
    /// "other_cpu_pct"}` since [`CpuWindow::start`] (a figure that cannot be read is null).
    pub fn finish(&self) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let now = read_cpu(self.server_pid.as_deref());
        let used = |before: Option<u64>, after: Option<u64>| {
            Some(after?.saturating_sub(before?) as f64 / TICKS_PER_SEC)
        };
        let own = used(self.at_start.own, now.own);
        let server = used(self.at_start.server, now.server);
        let machine = used(self.at_start.machine, now.machine);
        let other = match (machine, own, server) {
            (Some(m), Some(o), Some(s)) => Some((m - o - s).max(0.0)),
            _ => None,
        };
        let pct = |cpu_secs: Option<f64>| cpu_secs.map(|c| round(c / secs * 100.0, 1));
        json!({
            "window_secs": round(secs, 3),
            "loadgen_cpu_pct": pct(own),
            "loadgen_cpu_secs": own.map(|c| round(c, 2)),
            "server_cpu_pct": pct(server),
            "other_cpu_pct": pct(other),
        })
    }
}

fn read_cpu(server_pid: Option<&str>) -> CpuReading {
    CpuReading {
        own: cpu_ticks("self"),
        server: server_pid.and_then(cpu_ticks),
        machine: machine_busy_ticks(),
    }
}

/// Puts every field of `extra` (an object) into `report` (an object).
pub fn extend(report: &mut Value, extra: Value) {
    if let (Some(report), Value::Object(extra)) = (report.as_object_mut(), extra) {
        report.extend(extra);
    }
}
