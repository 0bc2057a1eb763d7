//! Load generator for pubsub-backend: `cargo run --release --example loadgen -- SCENARIO ...`.
//!
//! Every scenario talks to a running server (`--url http://127.0.0.1:PORT`; only addresses in
//! 127.0.0.0/8 are accepted), stops by itself (each has a duration or a count, and an overall
//! `--deadline`), prints exactly one JSON line of results on stdout and its progress on stderr.
//! Topics get names unique to the run (`lg-RUNID-...`) and are deleted at the end.
//!
//! | scenario | what it measures | module |
//! |---|---|---|
//! | `fanout` | K topics, S subscribers, one publisher per topic: deliveries/s, end-to-end latency, gaps | [`fanout`], [`traffic`] |
//! | `pubs` | P publishers, one subscriber per topic: acks/s and ack latency | [`pubs`], [`traffic`] |
//! | `conns` | N idle subscribers, then one publish: broadcast latency, server RSS per connection | [`conns`] |
//! | `rest` | `GET /health` and `POST`/`DELETE /topics` over keep-alive connections | [`rest`] |
//! | `ready` | time from exec to the first `GET /health` answer, idle RSS (spawns the server) | [`ready`] |
//!
//! Shared pieces: [`net`] (loopback target, WebSocket and raw HTTP clients, topics), [`wire`]
//! (the protocol's messages, with a fast path for events and acks), [`stats`] (histograms,
//! sequence checks, `/proc` readings) and [`traffic`] (publishers and subscribers, the engine
//! behind `fanout` and `pubs`).
//!
//! Common options: `--url`, `--threads N` (runtime worker threads, default 1), `--server-pid PID`
//! (adds the server's CPU use over the measured window), `--deadline SEC`.
//!
//! One worker thread is the default: on the 2-core machine it shares with the server, a second
//! one measured lower throughput (`fanout 1x100`: about 70k instead of 100k-130k deliveries/s)
//! for more CPU, as every wake-up of an idle worker costs the server's writing thread too.

#[path = "loadgen/conns.rs"]
mod conns;
#[path = "loadgen/fanout.rs"]
mod fanout;
#[path = "loadgen/net.rs"]
mod net;
#[path = "loadgen/pubs.rs"]
mod pubs;
#[path = "loadgen/ready.rs"]
mod ready;
#[path = "loadgen/rest.rs"]
mod rest;
#[path = "loadgen/stats.rs"]
mod stats;
#[path = "loadgen/traffic.rs"]
mod traffic;
#[path = "loadgen/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use net::Target;

/// Errors are reported, never recovered from: a boxed error with a readable message is enough.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

const USAGE: &str = "\
usage: loadgen SCENARIO --url http://127.0.0.1:PORT [options]      (defaults in brackets)

  fanout  --topics K [1] --subscribers S [100] --rate R|max [max]
  pubs    --publishers P [50] --shared-topic [off: one topic per publisher] --rate R|max [max]
          both: --duration SEC [10] --window W [64] --pace acks|deliveries [acks]
                --payload-bytes B [64] --drain SEC [10]
                --concurrency C [200 subscribers connecting at once]
  conns   --connections N [1000] --server-pid PID (required) --sources S [8]
          --concurrency C [200] --settle SEC [1] --wait SEC [10]
  rest    --duration SEC [10] --connections C [8] --cycle-connections N [1]
  ready   --server-bin PATH --runs N [5]        (starts the server itself; no --url)

common: --threads N [1 tokio worker]  --server-pid PID  --deadline SEC [expected + 60]
Only 127.0.0.0/8 is ever connected to. Each scenario prints one JSON line on stdout;
progress goes to stderr.
";

/// The clock shared by publishers and subscribers: payload timestamps are nanoseconds since it.
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since [`EPOCH`].
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Processes this run started (the `ready` scenario's servers), killed if the deadline fires.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A progress line on stderr.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {{
        eprintln!("loadgen: {}", format_args!($($arg)*));
    }};
}

/// What every scenario gets: where the server is, a run id for topic names, the server's pid.
pub struct Ctx {
    pub target: Target,
    pub run_id: String,
    pub server_pid: Option<u32>,
}

impl Ctx {
    /// A topic name unique to this run.
    pub fn topic_name(&self, suffix: impl Display) -> String {
        format!("lg-{}-{suffix}", self.run_id)
    }
}

/// `--name value` options (`--flag` alone means `true`), taken one by one by the scenario that
/// knows them; whatever is left over is an error.
pub struct Args {
    scenario: String,
    values: BTreeMap<String, String>,
}

impl Args {
    fn parse(argv: impl IntoIterator<Item = String>) -> Result<Args> {
        let mut argv = argv.into_iter().peekable();
        let scenario = match argv.next() {
            Some(s) if !s.starts_with("--") => s,
            _ => return Err("no scenario given".into()),
        };
        let mut values = BTreeMap::new();
        while let Some(arg) = argv.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            let (name, value) = match name.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => {
                    let value = match argv.peek() {
                        Some(next) if !next.starts_with("--") => argv.next().unwrap_or_default(),
                        _ => "true".to_string(),
                    };
                    (name.to_string(), value)
                }
            };
            if values.insert(name.clone(), value).is_some() {
                return Err(format!("--{name} given twice").into());
            }
        }
        Ok(Args { scenario, values })
    }

    /// The option's value, if given.
    pub fn optional<T: FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: Display,
    {
        match self.values.remove(name) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|e| format!("invalid --{name} {text:?}: {e}").into()),
        }
    }

    pub fn get<T: FromStr>(&mut self, name: &str, default: T) -> Result<T>
    where
        T::Err: Display,
    {
        Ok(self.optional(name)?.unwrap_or(default))
    }

    pub fn required<T: FromStr>(&mut self, name: &str) -> Result<T>
    where
        T::Err: Display,
    {
        self.optional(name)?
            .ok_or_else(|| format!("{} needs --{name}", self.scenario).into())
    }

    /// A duration in (possibly fractional) seconds.
    pub fn seconds(&mut self, name: &str, default: f64) -> Result<Duration> {
        let secs: f64 = self.get(name, default)?;
        Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid --{name}: {e}").into())
    }

    fn finish(self) -> Result<()> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(name) => Err(format!("unknown option --{name} for {}", self.scenario).into()),
        }
    }
}

/// A parsed scenario with its options.
enum Scenario {
    Traffic(traffic::Traffic),
    Conns(conns::Options),
    Rest(rest::Options),
    Ready(ready::Options),
}

impl Scenario {
    fn parse(args: &mut Args) -> Result<Scenario> {
        Ok(match args.scenario.as_str() {
            "fanout" => Scenario::Traffic(fanout::parse(args)?),
            "pubs" => Scenario::Traffic(pubs::parse(args)?),
            "conns" => Scenario::Conns(conns::Options::parse(args)?),
            "rest" => Scenario::Rest(rest::Options::parse(args)?),
            "ready" => Scenario::Ready(ready::Options::parse(args)?),
            other => return Err(format!("unknown scenario {other:?}").into()),
        })
    }

    /// How long the scenario should take when all goes well; the default deadline adds slack.
    fn expected(&self) -> Duration {
        match self {
            Scenario::Traffic(o) => o.expected(),
            Scenario::Conns(o) => o.expected(),
            Scenario::Rest(o) => o.expected(),
            Scenario::Ready(o) => o.expected(),
        }
    }

    async fn run(self, ctx: &Ctx) -> Result<Value> {
        match self {
            Scenario::Traffic(o) => o.run(ctx).await,
            Scenario::Conns(o) => o.run(ctx).await,
            Scenario::Rest(o) => o.run(ctx).await,
            Scenario::Ready(_) => unreachable!("ready runs without a runtime"),
        }
    }
}

fn main() -> ExitCode {
    EPOCH.get_or_init(Instant::now);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || argv.iter().any(|a| a == "--help" || a == "help") {
        eprint!("{USAGE}");
        return if argv.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let name = argv[0].clone();
    match run(argv) {
        Ok(mut report) => {
            report["scenario"] = json!(name);
            print_line(&report);
            ExitCode::SUCCESS
        }
        Err(error) => {
            progress!("{name}: {error}");
            print_line(&json!({"scenario": name, "error": error.to_string()}));
            ExitCode::from(1)
        }
    }
}

fn print_line(report: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{report}");
    let _ = out.flush();
}

fn run(argv: Vec<String>) -> Result<Value> {
    let mut args = Args::parse(argv)?;
    let args_scenario = args.scenario.clone();
    let scenario = Scenario::parse(&mut args)?;
    let threads: usize = args.get("threads", 1)?;
    let server_pid: Option<u32> = args.optional("server-pid")?;
    let deadline = args.seconds(
        "deadline",
        (scenario.expected().as_secs_f64() + 60.0).ceil(),
    )?;
    let url: Option<String> = args.optional("url")?;
    args.finish()?;
    start_watchdog(&args_scenario, deadline);

    if let Scenario::Ready(options) = scenario {
        return options.run();
    }
    let target = Target::parse(&url.ok_or("--url is required")?)?;
    let ctx = Ctx {
        target,
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        server_pid,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(scenario.run(&ctx))?;
    report["run_id"] = json!(ctx.run_id);
    report["loadgen_threads"] = json!(threads);
    // Connections still open in tasks are dropped with the runtime, without waiting for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(report)
}

/// Ends the process, with an error line as its one JSON line, if the run overstays `deadline`.
fn start_watchdog(scenario: &str, deadline: Duration) {
    let scenario = scenario.to_string();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                ready::terminate(*pid);
            }
            let message = format!("deadline of {} s exceeded", deadline.as_secs_f64());
            progress!("{message}");
            print_line(&json!({"scenario": scenario, "error": message}));
            std::process::exit(3);
        });
    if let Err(error) = spawned {
        progress!("cannot start the watchdog: {error}");
        std::process::exit(2);
    }
}
