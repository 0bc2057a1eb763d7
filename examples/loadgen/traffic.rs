//! Publishers and subscribers over a set of topics: the engine behind `fanout` and `pubs`.
//!
//! 1. Subscribers connect (bounded concurrency) and subscribe; subscriber `i` takes topic
//!    `i % topics`, publisher `j` takes topic `j % topics`.
//! 2. Publishers start together and publish for the duration, at a rate or as fast as the
//!    window allows: at most `window` publishes not yet settled, where a publish settles with
//!    its ack (`--pace acks`, the default) or with its ack and its arrival at every subscriber
//!    of the topic (`--pace deliveries`).
//! 3. Once publishing stops, loadgen waits (bounded by `drain`) for the last acks, then for every
//!    acked event to reach every subscriber of its topic, then counts.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Ending, Target, Ws};
use crate::stats::{self, merge_tally, tally, CpuWindow, Latency, SeqTracker, Tally};
use crate::wire::{self, Incoming};
use crate::{now_ns, progress, Args, Ctx, Result};

/// Publishes per second and per publisher, or `max`: as fast as the window of acks allows.
#[derive(Clone, Copy, Debug)]
pub enum Rate {
    Max,
    PerSec(f64),
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Rate, String> {
        match text {
            "max" => Ok(Rate::Max),
            _ => match text.parse::<f64>() {
                Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSec(rate)),
                _ => Err("expected `max` or a positive number".into()),
            },
        }
    }
}

impl Rate {
    fn to_json(self) -> Value {
        match self {
            Rate::Max => json!("max"),
            Rate::PerSec(rate) => json!(rate),
        }
    }
}

/// What frees a place in a publisher's window: the ack alone (`acks`: the publisher runs as
/// fast as the server accepts, which may outrun delivery and get subscribers cut as slow
/// consumers), or the ack and the event's arrival at every subscriber of the topic
/// (`deliveries`: the fastest pace the subscribers sustain, for delivery capacity).
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    Acks,
    Deliveries,
}

impl FromStr for Pace {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Pace, String> {
        match text {
            "acks" => Ok(Pace::Acks),
            "deliveries" => Ok(Pace::Deliveries),
            _ => Err("expected `acks` or `deliveries`".into()),
        }
    }
}

/// How long without a new delivery before loadgen stops waiting for the missing ones.
const STALL: Duration = Duration::from_secs(2);

/// What to run.
pub struct Plan {
    pub topics: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub rate: Rate,
    pub window: usize,
    pub pace: Pace,
    pub duration: Duration,
    pub payload_bytes: usize,
    /// Longest wait for acks and deliveries once publishing stops.
    pub drain: Duration,
    /// Subscribers connecting at once.
    pub concurrency: usize,
}

impl Plan {
    /// A plan with the layout given and the options every traffic scenario shares:
    /// `--window` (64), `--pace acks|deliveries` (acks), `--duration` (10 s),
    /// `--payload-bytes` (64), `--drain` (10 s), `--concurrency` (200 subscribers connecting at
    /// once).
    pub fn from_args(
        args: &mut Args,
        topics: usize,
        subscribers: usize,
        publishers: usize,
        rate: Rate,
    ) -> Result<Plan> {
        let plan = Plan {
            topics,
            subscribers,
            publishers,
            rate,
            window: args.get("window", 64)?,
            pace: args.get("pace", Pace::Acks)?,
            duration: args.seconds("duration", 10.0)?,
            payload_bytes: args.get("payload-bytes", 64)?,
            drain: args.seconds("drain", 10.0)?,
            concurrency: args.get("concurrency", 200)?,
        };
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<()> {
        if self.topics == 0 || self.publishers == 0 || self.window == 0 {
            return Err("topics, publishers and window must be at least 1".into());
        }
        Ok(())
    }

    /// A generous estimate of the run's length, for the default deadline.
    pub fn expected(&self) -> Duration {
        let setup = Duration::from_millis(20 * (self.subscribers + self.publishers) as u64);
        self.duration + self.drain * 2 + setup + Duration::from_secs(5)
    }

    /// The plan's parameters, for the report.
    fn to_json(&self) -> Value {
        json!({
            "topics": self.topics,
            "subscribers": self.subscribers,
            "publishers": self.publishers,
            "rate": self.rate.to_json(),
            "window": self.window,
            "pace": format!("{:?}", self.pace).to_lowercase(),
            "duration_secs": self.duration.as_secs_f64(),
            "payload_bytes": self.payload_bytes,
        })
    }
}

/// What a run measured.
#[derive(Default)]
pub struct Outcome {
    pub published: u64,
    pub acked: u64,
    pub delivered: u64,
    pub expected: u64,
    /// Seconds from the start of publishing until the last delivery that was waited for.
    pub window_secs: f64,
    pub latency: Latency,
    pub ack_latency: Latency,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub wrong_topic: u64,
    pub slow_consumer_cuts: u64,
    /// Subscribers whose connection ended before the run did (cuts included).
    pub closed_early: u64,
    /// Error frames and malformed frames by code, subscribers and publishers together.
    pub errors: Tally,
    /// Publishers whose connection failed, by reason.
    pub publisher_failures: Tally,
    pub cpu: Value,
    plan: Value,
}

impl Outcome {
    /// The fields every traffic report shares.
    pub fn report(&self) -> Value {
        let per_sec = |n: u64| stats::round(n as f64 / self.window_secs.max(1e-9), 1);
        let mut report = json!({
            "published": self.published,
            "acked": self.acked,
            "delivered": self.delivered,
            "expected": self.expected,
            "missing": self.expected.saturating_sub(self.delivered),
            "deliveries_per_sec": per_sec(self.delivered),
            "acks_per_sec": per_sec(self.acked),
            "latency_us": self.latency.summary(),
            "ack_latency_us": self.ack_latency.summary(),
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "wrong_topic": self.wrong_topic,
            "errors": self.errors.values().sum::<u64>(),
            "error_codes": self.errors,
            "slow_consumer_cuts": self.slow_consumer_cuts,
            "closed_early": self.closed_early,
            "publisher_failures": self.publisher_failures,
        });
        stats::extend(&mut report, self.plan.clone());
        stats::extend(&mut report, self.cpu.clone());
        // What loadgen itself spends per message it receives (mostly the kernel's TCP receive
        // path): the part of the latency and CPU figures that is the load generator's.
        let received = (self.delivered + self.acked).max(1) as f64;
        if let Some(secs) = self.cpu["loadgen_cpu_secs"].as_f64() {
            report["loadgen_cpu_us_per_message"] = json!(stats::round(secs * 1e6 / received, 2));
        }
        report
    }

    /// `delivered/expected, gaps, dups, cuts` for the one-line summary.
    pub fn integrity(&self) -> String {
        format!(
            "{}/{} delivered, {} gaps, {} dups, {} cuts",
            self.delivered, self.expected, self.gaps, self.duplicates, self.slow_consumer_cuts
        )
    }
}

/// What a traffic scenario's one-line summary leads with.
pub enum Headline {
    /// Deliveries per second and end-to-end latency (`fanout`).
    Deliveries,
    /// Acks per second and ack latency (`pubs`).
    Acks,
}

/// A traffic scenario: `fanout` and `pubs` differ only in their layout and their headline.
pub struct Traffic {
    pub plan: Plan,
    pub headline: Headline,
}

impl Traffic {
    pub fn expected(&self) -> Duration {
        self.plan.expected()
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Value> {
        let outcome = run(ctx, &self.plan).await?;
        let mut report = outcome.report();
        let (field, unit, latency) = match self.headline {
            Headline::Deliveries => (
                "deliveries_per_sec",
                "deliveries/s",
                outcome.latency.p50_p99(),
            ),
            Headline::Acks => (
                "acks_per_sec",
                "acks/s",
                format!("ack {}", outcome.ack_latency.p50_p99()),
            ),
        };
        let rate = stats::thousands(report[field].as_f64().unwrap_or(0.0));
        report["summary"] = json!(format!("{rate} {unit}; {}", outcome.integrity()));
        report["latency_summary"] = json!(latency);
        Ok(report)
    }
}

/// Creates the topics, runs the plan, deletes the topics.
async fn run(ctx: &Ctx, plan: &Plan) -> Result<Outcome> {
    let names: Vec<String> = (0..plan.topics).map(|i| ctx.topic_name(i)).collect();
    net::create_topics(&ctx.target, &names).await?;
    let outcome = drive(ctx, plan, &names).await;
    net::delete_topics(&ctx.target, &names).await;
    outcome
}

async fn drive(ctx: &Ctx, plan: &Plan, names: &[String]) -> Result<Outcome> {
    // Dropping either sender (an early return) stops the tasks listening to it.
    let (stop_subscribers, subscriber_stop) = watch::channel(false);
    let (stop_publishers, publisher_stop) = watch::channel(false);

    let mut subscribers_per_topic = vec![0u64; plan.topics];
    for i in 0..plan.subscribers {
        subscribers_per_topic[i % plan.topics] += 1;
    }
    // Made first, so that subscribers can free window places under `--pace deliveries`.
    let shared: Arc<[Arc<PublisherShared>]> = (0..plan.publishers)
        .map(|j| {
            let settling = match plan.pace {
                Pace::Acks => 1,
                Pace::Deliveries => 1 + subscribers_per_topic[j % plan.topics] as u32,
            };
            Arc::new(PublisherShared::new(plan.window, settling))
        })
        .collect();
    let pacing = matches!(plan.pace, Pace::Deliveries).then(|| Arc::clone(&shared));
    let subscribers = connect_subscribers(ctx, plan, names, pacing, subscriber_stop).await?;

    let mut connections = Vec::with_capacity(plan.publishers);
    for _ in 0..plan.publishers {
        connections.push(net::connect_ws(&ctx.target, None).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + plan.duration;
    let mut publishers: Vec<PublisherHandles> = connections
        .into_iter()
        .enumerate()
        .map(|(j, ws)| {
            let topic = j % plan.topics;
            let writer = wire::Publisher::new(names[topic].clone(), j, plan.payload_bytes);
            let schedule = Schedule {
                rate: plan.rate,
                start,
                end,
            };
            let shared = Arc::clone(&shared[j]);
            PublisherHandles::spawn(ws, writer, topic, shared, schedule, publisher_stop.clone())
        })
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let cpu = CpuWindow::start(ctx.server_pid);
    progress!(
        "{} publishers publishing for {:?}",
        plan.publishers,
        plan.duration
    );

    let mut outcome = Outcome {
        plan: plan.to_json(),
        ..Outcome::default()
    };

    // Publishing ends by itself at `end`; then the last acks, bounded by the drain time.
    for publisher in &mut publishers {
        match (&mut publisher.writer).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tally(&mut outcome.publisher_failures, error.to_string()),
            Err(error) => tally(&mut outcome.publisher_failures, error.to_string()),
        }
    }
    let drain_deadline = Instant::now() + plan.drain;
    while Instant::now() < drain_deadline && publishers.iter().any(|p| !p.shared.all_answered()) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stop_publishers.send(true);
    for publisher in publishers {
        let acks = publisher.acks.await?;
        let acked = publisher.shared.acked.load(Relaxed);
        outcome.published += publisher.shared.published.load(Relaxed);
        outcome.acked += acked;
        outcome.expected += acked * subscribers_per_topic[publisher.topic];
        outcome.ack_latency.merge(&acks.latency);
        merge_tally(&mut outcome.errors, &acks.errors);
    }
    progress!(
        "published {}, acked {}; waiting for {} deliveries",
        outcome.published,
        outcome.acked,
        outcome.expected
    );

    // Deliveries: until all expected arrived, nothing new came for STALL, or the drain ends.
    let delivered = || -> u64 { subscribers.iter().map(|s| s.delivered.load(Relaxed)).sum() };
    let mut last = (delivered(), Instant::now());
    loop {
        let now = delivered();
        if now != last.0 {
            last = (now, Instant::now());
        }
        if now >= outcome.expected || last.1.elapsed() >= STALL || Instant::now() >= drain_deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    outcome.window_secs = (last.1.max(end) - start).as_secs_f64();
    outcome.cpu = cpu.finish();
    let _ = stop_subscribers.send(true);
    for subscriber in subscribers {
        outcome.add(subscriber.task.await?);
    }
    Ok(outcome)
}

// ---- subscribers ---------------------------------------------------------------------------

/// A running subscriber: its task and its delivery count, read while it runs.
struct SubscriberHandle {
    task: JoinHandle<Received>,
    delivered: Arc<AtomicU64>,
}

/// Starts every subscriber and returns once all are subscribed (or fails on the first that
/// cannot be).
async fn connect_subscribers(
    ctx: &Ctx,
    plan: &Plan,
    names: &[String],
    pacing: Option<Arc<[Arc<PublisherShared>]>>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<SubscriberHandle>> {
    let limit = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let handles: Vec<SubscriberHandle> = (0..plan.subscribers)
        .map(|i| {
            let delivered = Arc::new(AtomicU64::new(0));
            let subscriber = Subscriber {
                target: ctx.target.clone(),
                client_id: format!("lg-sub-{i}"),
                publishers: plan.publishers,
                stop: stop.clone(),
                feedback: Feedback {
                    topic: names[i % plan.topics].clone(),
                    delivered: Arc::clone(&delivered),
                    pacing: pacing.clone(),
                },
            };
            let task = tokio::spawn(subscriber.run(Arc::clone(&limit), ready_tx.clone()));
            SubscriberHandle { task, delivered }
        })
        .collect();
    drop(ready_tx);
    for n in 1..=plan.subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => return Err(format!("a subscriber failed: {error}").into()),
            None => return Err("subscriber tasks ended early".into()),
        }
        if n % 1000 == 0 {
            progress!("{n} subscribers ready");
        }
    }
    progress!(
        "{} subscribers on {} topics ready in {:.2} s",
        plan.subscribers,
        plan.topics,
        started.elapsed().as_secs_f64()
    );
    Ok(handles)
}

struct Subscriber {
    target: Target,
    client_id: String,
    publishers: usize,
    stop: watch::Receiver<bool>,
    feedback: Feedback,
}

/// What a subscriber checks events against and reports to while it runs.
struct Feedback {
    topic: String,
    /// Its delivery count, for the coordinator to see.
    delivered: Arc<AtomicU64>,
    /// The publishers, told of each delivery under `--pace deliveries`.
    pacing: Option<Arc<[Arc<PublisherShared>]>>,
}

/// What one subscriber saw.
#[derive(Default)]
struct Received {
    latency: Latency,
    /// One per publisher, indexed by the payload's `p`.
    sequences: Vec<SeqTracker>,
    delivered: u64,
    wrong_topic: u64,
    errors: Tally,
    cut: bool,
    closed_early: bool,
}

impl Subscriber {
    async fn run(
        mut self,
        limit: Arc<Semaphore>,
        ready: mpsc::UnboundedSender<std::result::Result<(), String>>,
    ) -> Received {
        let connected = {
            let _permit = limit.acquire().await;
            let topic = &self.feedback.topic;
            net::subscriber(&self.target, None, topic, &self.client_id).await
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(error) => {
                let _ = ready.send(Err(error.to_string()));
                return Received::default();
            }
        };
        let _ = ready.send(Ok(()));
        let mut received = Received {
            sequences: (0..self.publishers)
                .map(|_| SeqTracker::default())
                .collect(),
            ..Received::default()
        };
        let ending = net::read_until_stopped(&mut ws, &mut self.stop, |text| {
            received.on_text(text, &self.feedback)
        })
        .await;
        match ending {
            Ending::Stopped => {}
            Ending::Closed(code) => {
                received.closed_early = true;
                received.cut |= code == Some(1008);
            }
            Ending::Failed(error) => {
                received.closed_early = true;
                tally(&mut received.errors, format!("websocket: {error}"));
            }
        }
        received
    }
}

impl Received {
    fn on_text(&mut self, text: &str, feedback: &Feedback) {
        match wire::classify(text) {
            Incoming::Event {
                topic: event_topic,
                publisher,
                seq,
                sent_ns,
            } => {
                if event_topic != feedback.topic {
                    self.wrong_topic += 1;
                    return;
                }
                self.latency.record_ns(now_ns().saturating_sub(sent_ns));
                match self.sequences.get_mut(publisher as usize) {
                    Some(sequence) => sequence.observe(seq),
                    None => tally(&mut self.errors, "event from an unknown publisher"),
                }
                if let Some(publisher) = feedback
                    .pacing
                    .as_ref()
                    .and_then(|p| p.get(publisher as usize))
                {
                    publisher.settle(seq, 1);
                }
                self.delivered += 1;
                feedback.delivered.store(self.delivered, Relaxed);
            }
            Incoming::Error { code, .. } => {
                self.cut |= code == "SLOW_CONSUMER";
                tally(&mut self.errors, code);
            }
            Incoming::Malformed => tally(&mut self.errors, "malformed frame"),
            Incoming::Ack { .. } | Incoming::Other => {}
        }
    }
}

impl Outcome {
    fn add(&mut self, received: Received) {
        self.delivered += received.delivered;
        self.latency.merge(&received.latency);
        for sequence in &received.sequences {
            self.gaps += sequence.gaps();
            self.duplicates += sequence.duplicates;
            self.out_of_order += sequence.out_of_order;
        }
        self.wrong_topic += received.wrong_topic;
        self.slow_consumer_cuts += u64::from(received.cut);
        self.closed_early += u64::from(received.closed_early);
        merge_tally(&mut self.errors, &received.errors);
    }
}

// ---- publishers ----------------------------------------------------------------------------

/// State a publisher's writer and ack reader (and under `--pace deliveries` its topic's
/// subscribers) share.
struct PublisherShared {
    /// Publishes that may still be sent before the oldest one settles.
    window: Semaphore,
    /// Per window place (`seq % window`): how many of the events that settle request `seq`
    /// happened; it settles at `settling` (1: the answer; under `--pace deliveries` also one
    /// arrival per subscriber of the topic).
    settled: Vec<AtomicU32>,
    settling: u32,
    /// Send time of request `seq`, at `seq % window` (at most `window` are unanswered, and the
    /// server answers one connection's requests in order).
    sent_at: Vec<AtomicU64>,
    published: AtomicU64,
    answered: AtomicU64,
    acked: AtomicU64,
}

impl PublisherShared {
    fn new(window: usize, settling: u32) -> PublisherShared {
        PublisherShared {
            window: Semaphore::new(window),
            settled: (0..window).map(|_| AtomicU32::new(0)).collect(),
            settling,
            sent_at: (0..window).map(|_| AtomicU64::new(0)).collect(),
            published: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
        }
    }

    /// Counts `n` of the events that settle request `seq`; the last one frees its window place.
    /// (Request `seq + window` cannot be sent before that, so a place is never shared.)
    fn settle(&self, seq: u64, n: u32) {
        let place = &self.settled[(seq % self.settled.len() as u64) as usize];
        if place.fetch_add(n, Relaxed) + n >= self.settling {
            place.store(0, Relaxed);
            self.window.add_permits(1);
        }
    }

    fn all_answered(&self) -> bool {
        self.answered.load(Relaxed) >= self.published.load(Relaxed)
    }
}

struct PublisherHandles {
    topic: usize,
    shared: Arc<PublisherShared>,
    writer: JoinHandle<Result<()>>,
    acks: JoinHandle<Acks>,
}

impl PublisherHandles {
    fn spawn(
        ws: Ws,
        writer: wire::Publisher,
        topic: usize,
        shared: Arc<PublisherShared>,
        schedule: Schedule,
        stop: watch::Receiver<bool>,
    ) -> PublisherHandles {
        let (sink, stream) = ws.split();
        PublisherHandles {
            topic,
            writer: tokio::spawn(publish(sink, writer, Arc::clone(&shared), schedule)),
            acks: tokio::spawn(read_acks(stream, Arc::clone(&shared), stop)),
            shared,
        }
    }
}

struct Schedule {
    rate: Rate,
    start: Instant,
    end: Instant,
}

/// Sends publishes from `start` to `end`: at the rate (catching up in bursts when late), or as
/// fast as the window allows. Frames are flushed whenever the writer is about to wait.
async fn publish(
    mut sink: SplitSink<Ws, Message>,
    mut writer: wire::Publisher,
    shared: Arc<PublisherShared>,
    schedule: Schedule,
) -> Result<()> {
    let interval = match schedule.rate {
        Rate::Max => None,
        Rate::PerSec(rate) => Some(1.0 / rate),
    };
    let window = shared.sent_at.len() as u64;
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if let Some(interval) = interval {
            let due = schedule.start + Duration::from_secs_f64(interval * seq as f64);
            if due >= schedule.end {
                break;
            }
            if now < due {
                sink.flush().await?;
                tokio::time::sleep_until(due.into()).await;
            }
        } else if now >= schedule.end {
            break;
        }
        match shared.window.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                sink.flush().await?;
                let end = schedule.end.into();
                match tokio::time::timeout_at(end, shared.window.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
            }
        }
        let sent = now_ns();
        shared.sent_at[(seq % window) as usize].store(sent, Relaxed);
        sink.feed(Message::text(writer.publish(seq, sent))).await?;
        seq += 1;
        shared.published.store(seq, Relaxed);
    }
    sink.flush().await?;
    Ok(())
}

/// What a publisher's ack reader saw.
#[derive(Default)]
struct Acks {
    latency: Latency,
    errors: Tally,
}

/// Counts the answers to one publisher's requests until told to stop.
async fn read_acks(
    mut stream: SplitStream<Ws>,
    shared: Arc<PublisherShared>,
    mut stop: watch::Receiver<bool>,
) -> Acks {
    let mut acks = Acks::default();
    let window = shared.sent_at.len() as u64;
    let (mut answered, mut acked) = (0u64, 0u64);
    let ending = net::read_until_stopped(&mut stream, &mut stop, |text| {
        let (request_id, error) = match wire::classify(text) {
            Incoming::Ack {
                request_id: Some(id),
            } => (id, None),
            Incoming::Error {
                code,
                request_id: Some(id),
            } => (id, Some(code)),
            Incoming::Error { code, .. } => return tally(&mut acks.errors, code),
            Incoming::Malformed => return tally(&mut acks.errors, "malformed frame"),
            _ => return,
        };
        match error {
            Some(code) => {
                tally(&mut acks.errors, code);
                // A refused publish is never delivered: it settles at once.
                shared.settle(request_id, shared.settling);
            }
            None => {
                let sent = shared.sent_at[(request_id % window) as usize].load(Relaxed);
                acks.latency.record_ns(now_ns().saturating_sub(sent));
                acked += 1;
                shared.acked.store(acked, Relaxed);
                shared.settle(request_id, 1);
            }
        }
        answered += 1;
        shared.answered.store(answered, Relaxed);
    })
    .await;
    match ending {
        Ending::Stopped => {}
        Ending::Closed(code) => tally(&mut acks.errors, format!("publisher closed: {code:?}")),
        Ending::Failed(error) => tally(&mut acks.errors, format!("publisher websocket: {error}")),
    }
    acks
}
