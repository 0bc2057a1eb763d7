//! # pubsub-backend
//!
//! A real-time publish/subscribe server. Clients speak JSON over one WebSocket endpoint (`/ws`:
//! subscribe, unsubscribe, publish, ping) and manage topics over REST (`/topics`, `/health`,
//! `/stats`, `/metrics`, history and HTTP publish under `/topics/{name}/messages`, a live console
//! at `/`), all on one TCP port. Every topic numbers its events (`seq`, within an `epoch`) and
//! keeps a ring of the last `RING_SIZE` for replay and resume; every WebSocket connection has
//! one bounded outbound queue, and a connection whose queue overflows is cut (`SLOW_CONSUMER`)
//! instead of slowing anyone else down. docs/protocol.md is the contract: the protocol, its
//! semantics and its limits.
//!
//! ## Modules, in the order data flows
//! | module | owns |
//! |---|---|
//! | this file's top | `main`, `run` (start-up and shutdown), `healthcheck` |
//! | [`config`] | the settings table, `--help`, the logger |
//! | [`protocol`] | wire types, request parsing, [`ErrorCode`](protocol::ErrorCode), every error body ([`Failure`](protocol::Failure)) |
//! | [`queue`] | what travels on a session's outbound queue ([`Outgoing`](queue::Outgoing)) |
//! | [`broker`] | topics, rings, subscriptions, numbering; no I/O |
//! | [`state`] | what every thread shares: [`Shared`], open connections, metrics |
//! | [`auth`] | finding and checking the API key a request presents |
//! | [`dispatch`] | accept, admission, the peek at the request line, routing |
//! | [`ws`] | a WebSocket session: handshake, reader, writer |
//! | [`rest_proxy`] | the checked hand-off of REST requests to tiny_http |
//! | [`rest`] | the REST routes and their handlers, `/metrics` |
//! | [`console`] | the page at `GET /` |
//!
//! ## To change …, look in …
//! | to change | look in |
//! |---|---|
//! | a setting, its default or `--help` | `config::SETTINGS` (README's table is checked against it) |
//! | what a request may hold, an error message or code | `protocol` |
//! | numbering, replay, resume, retention, slow-consumer cuts | `broker` |
//! | how many connections are served, refusals | `state::Connections`, `dispatch` |
//! | what the API key protects | `auth`, and its callers in `ws` and `rest` |
//! | heartbeats, write batching, closing codes | `ws::Writer` |
//! | HTTP framing limits, request smuggling defences | `rest_proxy::RequestPump` |
//! | a REST route or its answer, a metric | `rest` |
//!
//! ## Threads
//! | thread | owns | blocks in | exits when |
//! |---|---|---|---|
//! | `main` | start-up, shutdown | waiting for SIGTERM/SIGINT | after shutdown |
//! | `acceptor` | the listening socket; refusals | `accept` | shutdown flag, woken by a self-connect |
//! | `conn-N` | one new client socket: peek, then the WebSocket handshake, or REST requests relayed to tiny_http one by one | socket read | the handshake is done (or failed); for REST, peer closes, idle timeout, or `TcpStream::shutdown` at shutdown |
//! | `ws-reader-N` | one WebSocket after its handshake: reads and executes requests | socket read; after a publish, up to 50 ms for a subscriber's writer that is behind | peer closes, two heartbeats of silence, or `TcpStream::shutdown` from the writer or shutdown |
//! | `ws-writer-N` | the only writer of one WebSocket | a park on its empty queue until whoever queues wakes it (also the heartbeat tick), a subscribe's reply slot, socket write, a linger after a batch | the session closes; a write blocked for `WRITE_TIMEOUT_SEC` in all |
//! | `rest-worker-N` | nothing; serves tiny_http requests | `Server::recv` | `Server::unblock` at shutdown |
//! | tiny_http's own | its accept loop, and a parser for each pooled connection of [`rest_proxy`] | unix socket reads | process exit |
//!
//! ## Invariants
//! - The broker does no I/O, never blocks on a queue (`try_send` only), and serializes nothing
//!   under its lock (it appends numbers to frames serialized beforehand).
//! - Exactly one thread writes to a WebSocket after its handshake: that session's writer. The
//!   reader's automatic pong and close replies go to a sink and are re-sent through the writer.
//! - No lock is held across I/O or a blocking send. The broker wakes the writers it queued
//!   events for after releasing its lock.
//! - A connection is subscribed to a topic if and only if the broker holds its queue for it; a
//!   connection cut as a slow consumer is removed from every topic under the same lock.
//! - A subscribe ack and its replay are one item, built under the lock that registers the
//!   subscription and written in a place of the queue taken before it, so no live event can come
//!   between them and none can be missed or repeated.
//! - A session's writer acts on its ending (slow consumer, shutdown) only after it has seen the
//!   ending and then emptied the queue with the reader idle: every event queued before the
//!   ending, and the reply of the request that caused it, is written before the last message.
//! - The rings together hold at most `MAX_RETAINED_BYTES`; the oldest events of all topics go
//!   first.
//! - A topic's events are numbered under the broker lock, in the order they are queued, so
//!   every subscriber sees `seq` increase by one from event to event.
//! - A client is cut only when its queue is full. A publisher may wait, 50 ms at most, for a
//!   writer that is behind for want of CPU, never for one blocked on its socket.
//! - Every error a client gets, on REST, on WebSocket or before either, is built by
//!   [`protocol::Failure`]: one shape, one translation of broker errors.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixListener};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

use backplane::{run_backplane, Backplane};
use config::{Config, Invocation, StderrLogger};
use dispatch::run_acceptor;
use rest::run_rest_worker;
use rest_proxy::RestBackends;
use state::Shared;

/// Threads answering REST requests. Handlers take microseconds and requests reach tiny_http
/// whole, so no worker ever waits on a client; requests pipelined on one connection still run
/// in order (RFC 9112 9.3.2) because the hand-off passes them on one at a time.
const REST_WORKERS: usize = 2;

/// How long start-up waits for cluster mode's first link to Redis before it listens anyway.
const BACKPLANE_START_WAIT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let invocation =
        match Invocation::parse(std::env::args().skip(1), |var| std::env::var(var).ok()) {
            Ok(invocation) => invocation,
            Err(error) => {
                let _ = writeln!(io::stderr(), "pubsub-backend: {error}");
                return ExitCode::from(2);
            }
        };
    let config = match invocation {
        Invocation::Help => {
            let _ = write!(io::stdout(), "{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Invocation::Version => {
            let _ = writeln!(io::stdout(), "pubsub-backend {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Invocation::Healthcheck(config) => return healthcheck(&config),
        Invocation::Client(args) => return cli::main(args, |var| std::env::var(var).ok()),
        Invocation::Run(config) => config,
    };
    StderrLogger::install(config.log_level);
    // A panic is a bug: report it through the log, with the thread's name, like any failure.
    std::panic::set_hook(Box::new(|info| {
        let thread = thread::current();
        let info = info.to_string().replace('\n', " ");
        log::error!("thread {} {info}", thread.name().unwrap_or("unnamed"));
    }));
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the server at `HOST`/`PORT` on this machine for `GET /health` and succeeds on a 200:
/// Docker's `HEALTHCHECK` for an image that has no shell and no curl.
fn healthcheck(config: &Config) -> ExitCode {
    let addr = loopback_for(config.bind_addr);
    let status_line = || -> io::Result<String> {
        let timeout = Duration::from_secs(3);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(stream, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut head = Vec::new();
        stream.take(256).read_to_end(&mut head)?;
        let head = String::from_utf8_lossy(&head);
        Ok(head.lines().next().unwrap_or_default().to_string())
    };
    match status_line() {
        Ok(line) if line.split(' ').nth(1) == Some("200") => ExitCode::SUCCESS,
        Ok(line) => {
            let _ = writeln!(
                io::stderr(),
                "pubsub-backend: unhealthy: GET http://{addr}/health answered {line:?}"
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            let _ = writeln!(
                io::stderr(),
                "pubsub-backend: unhealthy: GET http://{addr}/health: {error}"
            );
            ExitCode::FAILURE
        }
    }
}

/// Binds the port, starts every thread, waits for SIGTERM or SIGINT, then shuts down: stop
/// accepting, let every WebSocket flush its queue for up to `SHUTDOWN_GRACE_SEC`, close them
/// with 1001, and return.
fn run(config: Config) -> io::Result<()> {
    let listener = TcpListener::bind(config.bind_addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", config.bind_addr)))?;
    let local_addr = listener.local_addr()?;
    // Registered before any thread starts, so no thread inherits the default disposition.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;

    // tiny_http listens on an abstract unix socket: no file to clean up, nothing reachable from
    // the network, no file system needed (the image is FROM scratch, without /tmp), and no
    // Nagle delays on the hop.
    let rest_name = format!(
        "pubsub-backend-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let rest_addr = UnixSocketAddr::from_abstract_name(rest_name.as_bytes())?;
    let rest_listener = UnixListener::bind_addr(&rest_addr)?;
    let rest_server = tiny_http::Server::from_listener(rest_listener, None)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // tiny_http's `Drop` unwraps a socket path that an abstract socket does not have, so the
    // server lives in a static, which is never dropped; the process exit ends its threads.
    static REST_SERVER: OnceLock<tiny_http::Server> = OnceLock::new();
    let rest_server = REST_SERVER.get_or_init(|| rest_server);

    let backplane = match config.redis_url.as_deref() {
        None => None,
        Some(url) => Some(
            Backplane::new(url, config.ring_size, config.max_topics)
                .map_err(|e| io::Error::other(format!("REDIS_URL: {e}")))?,
        ),
    };
    let shared = Arc::new(Shared::new(config, RestBackends::new(rest_addr), backplane));
    let workers = (0..REST_WORKERS)
        .map(|n| {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("rest-worker-{n}"))
                .spawn(move || run_rest_worker(rest_server, &shared))
        })
        .collect::<io::Result<Vec<_>>>()?;
    shared.rest_backends.open_all()?;
    if let Some(backplane) = &shared.backplane {
        let follower = Arc::clone(&shared);
        thread::Builder::new()
            .name("backplane".into())
            .spawn(move || run_backplane(&follower))?;
        // A moment for the first link, so that an instance that says it listens knows the
        // cluster's topics; without Redis it starts all the same, unhealthy, and keeps trying.
        if !backplane.wait_linked(BACKPLANE_START_WAIT) {
            log::warn!(
                "backplane {}: not linked yet; /health answers 503 until it is",
                backplane.address()
            );
        }
    }
    let acceptor = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || run_acceptor(listener, &shared))?
    };
    log::info!(
        "serving at most {} connections at once",
        shared.config.max_connections
    );
    log::info!(
        "pubsub-backend {} listening on {local_addr} (REST http://{local_addr}, WebSocket ws://{local_addr}/ws)",
        env!("CARGO_PKG_VERSION")
    );

    let signal = signals.forever().next().unwrap_or(SIGTERM);
    let grace = shared.config.shutdown_grace;
    log::info!(
        "received {}: shutting down, flushing for at most {grace:?}",
        signal_name(signal)
    );
    shared.shutting_down.store(true, Ordering::SeqCst);
    match TcpStream::connect_timeout(&loopback_for(local_addr), Duration::from_secs(1)) {
        Ok(_) => join_quietly(acceptor),
        Err(error) => {
            log::warn!("could not wake the acceptor ({error}); exiting without joining it")
        }
    }
    shared.broker.shutdown();
    let unfinished = shared
        .connections
        .wait_for_websockets(Instant::now() + grace);
    if unfinished > 0 {
        log::warn!(
            "{unfinished} WebSocket connection(s) still flushing after {grace:?}: dropping them"
        );
    }
    shared.connections.shutdown_all();
    for _ in &workers {
        rest_server.unblock();
    }
    workers.into_iter().for_each(join_quietly);
    log::info!("shutdown complete");
    Ok(())
}

/// The address to reach the server from this machine (a self-connect to wake the acceptor,
/// the health check): the bound one, with an unspecified IP (`0.0.0.0`, `::`) replaced by
/// loopback.
fn loopback_for(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// Joins a thread; a panic in it has already been reported by the panic hook.
fn join_quietly<T>(handle: JoinHandle<T>) {
    let _ = handle.join();
}

mod config {
    //! The settings: one table ([`SETTINGS`]) that the environment, the flags, `--help` and
    //! README.md's table all follow, validated into a [`Config`] at start-up; and the logger.
    //!
    //! Owns: every setting's name, default, bounds and meaning. Must never: read the environment
    //! after start-up, or accept a value that could make the server allocate beyond reason or
    //! overflow a deadline.

    use std::collections::HashMap;
    use std::fmt;
    use std::io::{self, Write};
    use std::net::{SocketAddr, ToSocketAddrs};
    use std::ops::RangeInclusive;
    use std::time::{Duration, SystemTime};

    /// The largest value a setting in seconds takes (a day): more is a typo, and a deadline that
    /// far out could overflow `Instant`.
    const MAX_SECONDS_SETTING: f64 = 86_400.0;

    /// The longest linger a writer may be given: beyond it, the linger is a latency of its own.
    const MAX_LINGER_MS: f64 = 1_000.0;

    /// What the process was asked to do on its command line.
    #[derive(Debug)]
    pub(crate) enum Invocation {
        Run(Config),
        /// `pubsub-backend sub ...` and the other client subcommands, with their arguments.
        Client(Vec<String>),
        /// `pubsub-backend healthcheck`: ask the server on this machine for `GET /health`.
        Healthcheck(Config),
        Help,
        Version,
    }

    /// One configuration setting: its environment variable, default and meaning. Code reads a
    /// setting through its constant below, so a misspelled name does not compile; `--help`, the
    /// flag parser and README.md's table (checked by a test) all follow [`SETTINGS`].
    pub(crate) struct Setting {
        pub(crate) var: &'static str,
        default: Option<&'static str>,
        help: &'static str,
    }

    impl Setting {
        /// `PORT` → `--port`, `MAX_MESSAGE_BYTES` → `--max-message-bytes`.
        fn flag(&self) -> String {
            format!("--{}", self.var.to_ascii_lowercase().replace('_', "-"))
        }
    }

    pub(crate) const HOST: Setting = Setting {
        var: "HOST",
        default: Some("0.0.0.0"),
        help: "address to bind",
    };
    pub(crate) const PORT: Setting = Setting {
        var: "PORT",
        default: Some("8000"),
        help: "port to bind (0 picks a free one)",
    };
    pub(crate) const RING_SIZE: Setting = Setting {
        var: "RING_SIZE",
        default: Some("100"),
        help: "messages kept per topic for replay",
    };
    pub(crate) const QUEUE_SIZE: Setting = Setting {
        var: "QUEUE_SIZE",
        default: Some("100"),
        help: "outbound queue bound per WebSocket connection",
    };
    pub(crate) const LOG_LEVEL: Setting = Setting {
        var: "LOG_LEVEL",
        default: Some("INFO"),
        help: "ERROR, WARN, INFO, DEBUG or TRACE",
    };
    pub(crate) const HEARTBEAT_SEC: Setting = Setting {
        var: "HEARTBEAT_SEC",
        default: Some("30"),
        help: "heartbeat interval; silent for 2 intervals = dropped",
    };
    pub(crate) const HANDSHAKE_TIMEOUT_SEC: Setting = Setting {
        var: "HANDSHAKE_TIMEOUT_SEC",
        default: Some("10"),
        help: "time to send the request line and finish the WebSocket handshake",
    };
    pub(crate) const SHUTDOWN_GRACE_SEC: Setting = Setting {
        var: "SHUTDOWN_GRACE_SEC",
        default: Some("5"),
        help: "how long shutdown may spend flushing queues",
    };
    pub(crate) const WRITE_TIMEOUT_SEC: Setting = Setting {
        var: "WRITE_TIMEOUT_SEC",
        default: Some("10"),
        help: "a socket write blocked this long drops the connection",
    };
    pub(crate) const WRITE_LINGER_MS: Setting = Setting {
        var: "WRITE_LINGER_MS",
        default: Some("2"),
        help: "after writing a batch, a writer waits this long for more (0: never)",
    };
    pub(crate) const MAX_MESSAGE_BYTES: Setting = Setting {
        var: "MAX_MESSAGE_BYTES",
        default: Some("1048576"),
        help: "largest WebSocket message or REST body accepted",
    };
    pub(crate) const MAX_RETAINED_BYTES: Setting = Setting {
        var: "MAX_RETAINED_BYTES",
        default: Some("268435456"),
        help: "bytes of events kept in all rings together; the oldest go first beyond it",
    };
    pub(crate) const MAX_TOPICS: Setting = Setting {
        var: "MAX_TOPICS",
        default: Some("10000"),
        help: "topics that may exist at once; POST /topics beyond it gets 507",
    };
    pub(crate) const MAX_CONNECTIONS: Setting = Setting {
        var: "MAX_CONNECTIONS",
        default: Some("auto"),
        help: "open connections served at once; auto derives it from the OS limits",
    };
    pub(crate) const CORS_ORIGINS: Setting = Setting {
        var: "CORS_ORIGINS",
        default: None,
        help: "comma-separated origins allowed from browsers (* for any); unset: no CORS",
    };
    pub(crate) const CONSOLE: Setting = Setting {
        var: "CONSOLE",
        default: Some("on"),
        help: "on or off: the live console page at GET /",
    };
    pub(crate) const API_KEY: Setting = Setting {
        var: "API_KEY",
        default: None,
        help: "when set, required by every request but GET /health",
    };
    pub(crate) const REDIS_URL: Setting = Setting {
        var: "REDIS_URL",
        default: None,
        help: "cluster mode: redis://[:password@]host:port/db shared by every instance",
    };

    /// Every setting, in the order `--help` lists them.
    const SETTINGS: [&Setting; 18] = [
        &HOST,
        &PORT,
        &RING_SIZE,
        &QUEUE_SIZE,
        &LOG_LEVEL,
        &HEARTBEAT_SEC,
        &HANDSHAKE_TIMEOUT_SEC,
        &SHUTDOWN_GRACE_SEC,
        &WRITE_TIMEOUT_SEC,
        &WRITE_LINGER_MS,
        &MAX_MESSAGE_BYTES,
        &MAX_RETAINED_BYTES,
        &MAX_TOPICS,
        &MAX_CONNECTIONS,
        &CORS_ORIGINS,
        &CONSOLE,
        &API_KEY,
        &REDIS_URL,
    ];

    /// The server's settings, validated.
    #[derive(Debug, Clone)]
    pub(crate) struct Config {
        pub(crate) bind_addr: SocketAddr,
        /// Events kept per topic for replay; 0 disables replay.
        pub(crate) ring_size: usize,
        /// Items a connection's outbound queue holds before the connection is cut; at least 1.
        pub(crate) queue_size: usize,
        pub(crate) log_level: log::LevelFilter,
        pub(crate) heartbeat: Duration,
        /// How long a new connection may take to send its request line and complete the
        /// WebSocket handshake: a client that says nothing for this long is dropped (slowloris).
        pub(crate) handshake_timeout: Duration,
        pub(crate) shutdown_grace: Duration,
        pub(crate) write_timeout: Duration,
        /// How long a writer that just wrote several events waits before its next batch.
        pub(crate) write_linger: Duration,
        pub(crate) max_message_bytes: usize,
        /// Bytes of event frames all rings hold together.
        pub(crate) max_retained_bytes: usize,
        /// Topics that may exist at once.
        pub(crate) max_topics: usize,
        /// Connections served at once; more are refused with 503 (see `dispatch::refuse`).
        pub(crate) max_connections: usize,
        /// Origins allowed by CORS and on WebSocket upgrades; `None` sends no CORS headers and
        /// checks no `Origin`.
        pub(crate) cors_origins: Option<Vec<String>>,
        /// Serve the live console at `GET /`.
        pub(crate) console: bool,
        pub(crate) api_key: Option<String>,
        /// Cluster mode: the Redis every instance shares (see [`crate::backplane`]).
        pub(crate) redis_url: Option<String>,
    }

    /// A setting whose value cannot be used; start-up stops with this one line.
    #[derive(Debug, PartialEq)]
    struct ConfigError {
        var: &'static str,
        value: String,
        expected: String,
    }

    impl fmt::Display for ConfigError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "invalid {}={:?}: expected {}",
                self.var, self.value, self.expected
            )
        }
    }

    impl Invocation {
        /// Reads flags (`--port 9000` or `--port=9000`, overriding `PORT`) and then the environment.
        pub(crate) fn parse(
            args: impl IntoIterator<Item = String>,
            env: impl Fn(&str) -> Option<String>,
        ) -> Result<Invocation, String> {
            let mut flags: HashMap<&'static str, String> = HashMap::new();
            let mut args = args.into_iter().peekable();
            if args
                .peek()
                .is_some_and(|arg| super::cli::COMMANDS.contains(&arg.as_str()))
            {
                return Ok(Invocation::Client(args.collect()));
            }
            let healthcheck = args.next_if(|arg| arg == "healthcheck").is_some();
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "-h" | "--help" => return Ok(Invocation::Help),
                    "-V" | "--version" => return Ok(Invocation::Version),
                    _ => {}
                }
                let (name, inline_value) = match arg.split_once('=') {
                    Some((name, value)) => (name.to_string(), Some(value.to_string())),
                    None => (arg.clone(), None),
                };
                let setting = SETTINGS
                    .iter()
                    .find(|s| s.flag() == name)
                    .ok_or_else(|| format!("unknown argument {arg:?} (see --help)"))?;
                let value = match inline_value {
                    Some(value) => value,
                    None => args.next().ok_or_else(|| format!("{name} needs a value"))?,
                };
                flags.insert(setting.var, value);
            }
            let lookup = |var: &'static str| flags.get(var).cloned().or_else(|| env(var));
            let config = Config::from_lookup(lookup).map_err(|e| e.to_string())?;
            Ok(if healthcheck {
                Invocation::Healthcheck(config)
            } else {
                Invocation::Run(config)
            })
        }
    }

    impl Config {
        fn from_lookup(
            lookup: impl Fn(&'static str) -> Option<String>,
        ) -> Result<Config, ConfigError> {
            // A setting's value, or its default; "" for one without a default.
            let setting = |setting: &Setting| -> (String, &'static str) {
                let value = lookup(setting.var).or_else(|| setting.default.map(str::to_string));
                (value.unwrap_or_default(), setting.var)
            };
            let invalid = |(value, var): (String, &'static str), expected: &str| ConfigError {
                var,
                value,
                expected: expected.to_string(),
            };
            // Every number has an upper bound too: a value start-up accepts must never make the
            // server allocate beyond reason (a queue's slots are allocated up front) or overflow
            // a deadline later.
            let count = |var: &Setting, range: RangeInclusive<usize>| {
                let (value, var) = setting(var);
                match value.trim().parse::<usize>() {
                    Ok(n) if range.contains(&n) => Ok(n),
                    _ => Err(invalid(
                        (value, var),
                        &format!("a whole number from {} to {}", range.start(), range.end()),
                    )),
                }
            };
            let seconds = |var: &Setting, allow_zero: bool| -> Result<Duration, ConfigError> {
                let (value, var) = setting(var);
                let min = if allow_zero { 0.0 } else { f64::MIN_POSITIVE };
                match value.trim().parse::<f64>() {
                    Ok(s) if (min..=MAX_SECONDS_SETTING).contains(&s) => {
                        Ok(Duration::from_secs_f64(s))
                    }
                    _ => Err(invalid(
                        (value, var),
                        &format!(
                        "a number of seconds from 0{} to {MAX_SECONDS_SETTING}, such as 30 or 0.5",
                        if allow_zero { "" } else { " (excluded)" }
                    ),
                    )),
                }
            };

            let port = {
                let (value, var) = setting(&PORT);
                value
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| invalid((value, var), "a port number from 0 to 65535"))?
            };
            let bind_addr = {
                let (value, var) = setting(&HOST);
                (value.trim(), port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .ok_or_else(|| {
                        invalid(
                            (value, var),
                            "an IP address or host name to bind, such as 0.0.0.0",
                        )
                    })?
            };
            let log_level = {
                let (value, var) = setting(&LOG_LEVEL);
                match value.trim().to_ascii_uppercase().as_str() {
                    "ERROR" => log::LevelFilter::Error,
                    "WARN" => log::LevelFilter::Warn,
                    "INFO" => log::LevelFilter::Info,
                    "DEBUG" => log::LevelFilter::Debug,
                    "TRACE" => log::LevelFilter::Trace,
                    _ => {
                        return Err(invalid(
                            (value, var),
                            "one of ERROR, WARN, INFO, DEBUG, TRACE",
                        ))
                    }
                }
            };
            let redis_url = match lookup(REDIS_URL.var) {
                None => None,
                // Checked now so that a typo stops start-up; the password is never shown.
                Some(url) => match redis::Client::open(url.trim()) {
                    Ok(_) => Some(url.trim().to_string()),
                    Err(error) => {
                        let shown = match url.split_once('@') {
                            Some((_, host)) => format!("redis://…@{host}"),
                            None => url,
                        };
                        let expected = format!(
                            "a URL such as redis://127.0.0.1:6379/0 or redis://:password@host:6379/0 ({error})"
                        );
                        return Err(invalid((shown, REDIS_URL.var), &expected));
                    }
                },
            };
            let api_key = match lookup(API_KEY.var) {
                Some(key) if key.is_empty() => {
                    return Err(invalid(
                        (key, API_KEY.var),
                        "a non-empty key, or API_KEY unset to disable authentication",
                    ))
                }
                key => key,
            };
            Ok(Config {
                bind_addr,
                ring_size: count(&RING_SIZE, 0..=1_000_000)?,
                queue_size: count(&QUEUE_SIZE, 1..=100_000)?,
                log_level,
                heartbeat: seconds(&HEARTBEAT_SEC, false)?,
                handshake_timeout: seconds(&HANDSHAKE_TIMEOUT_SEC, false)?,
                shutdown_grace: seconds(&SHUTDOWN_GRACE_SEC, true)?,
                write_timeout: seconds(&WRITE_TIMEOUT_SEC, false)?,
                write_linger: {
                    let (value, var) = setting(&WRITE_LINGER_MS);
                    match value.trim().parse::<f64>() {
                        Ok(ms) if (0.0..=MAX_LINGER_MS).contains(&ms) => {
                            Duration::from_secs_f64(ms / 1000.0)
                        }
                        _ => {
                            return Err(invalid(
                                (value, var),
                                &format!(
                            "a number of milliseconds from 0 to {MAX_LINGER_MS}, such as 2 or 0.5"
                        ),
                            ))
                        }
                    }
                },
                max_message_bytes: count(&MAX_MESSAGE_BYTES, 64..=64 << 20)?,
                max_retained_bytes: count(&MAX_RETAINED_BYTES, 0..=1 << 40)?,
                max_topics: count(&MAX_TOPICS, 1..=10_000_000)?,
                max_connections: match setting(&MAX_CONNECTIONS) {
                    (value, _) if value.trim().eq_ignore_ascii_case("auto") => {
                        os_connection_limit()
                    }
                    _ => count(&MAX_CONNECTIONS, 1..=1_000_000)?,
                },
                cors_origins: match lookup(CORS_ORIGINS.var) {
                    None => None,
                    Some(list) => {
                        let origins: Vec<String> = list
                            .split(',')
                            .map(|origin| origin.trim().trim_end_matches('/').to_string())
                            .filter(|origin| !origin.is_empty())
                            .collect();
                        if origins.is_empty() {
                            let expected =
                            "origins such as https://app.example.com,http://localhost:3000 or *";
                            return Err(invalid((list, CORS_ORIGINS.var), expected));
                        }
                        Some(origins)
                    }
                },
                console: {
                    let (value, var) = setting(&CONSOLE);
                    match value.trim().to_ascii_lowercase().as_str() {
                        "on" | "true" | "1" => true,
                        "off" | "false" | "0" => false,
                        _ => return Err(invalid((value, var), "on or off")),
                    }
                },
                api_key,
                redis_url,
            })
        }

        /// Whether a browser page from `origin` may use this server (CORS and WebSocket upgrades).
        pub(crate) fn cors_allows(&self, origin: &str) -> bool {
            self.cors_origins.as_ref().is_some_and(|origins| {
                origins
                    .iter()
                    .any(|allowed| allowed == "*" || allowed == origin)
            })
        }
    }

    /// How many connections this process can serve at once, from the limits the OS sets: every
    /// WebSocket costs a file descriptor and two threads, and every thread a pid and four memory
    /// mappings (its stack and guard page, and the alternate signal stack and guard page that Rust
    /// gives every thread to report stack overflows), measured in /proc/PID/maps; a REST
    /// connection costs less. A reserve is kept for the listener, tiny_http and its pool of
    /// connections, and the thread a WebSocket's handshake runs on. Unreadable limits count as
    /// unlimited.
    fn os_connection_limit() -> usize {
        fn read_number(path: &str) -> Option<usize> {
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        }
        let threads = [
            read_number("/proc/sys/kernel/pid_max"),
            read_number("/proc/sys/kernel/threads-max"),
            read_number("/proc/sys/vm/max_map_count").map(|maps| maps / MAPS_PER_THREAD),
        ]
        .into_iter()
        .flatten()
        .min();
        const MAPS_PER_THREAD: usize = 4;
        let by_threads = threads.map_or(usize::MAX, |threads| (threads - reserve(threads)) / 2);
        descriptor_budget().min(by_threads).max(1)
    }

    /// Threads or file descriptors kept back from connections, for the listener, tiny_http, the
    /// workers and the refusal of connections beyond the limit: 256, or a quarter of a small limit.
    fn reserve(limit: usize) -> usize {
        (limit / 4).min(256)
    }

    /// File descriptors connections may use: the process's soft limit, less a reserve; unlimited
    /// when `/proc/self/limits` cannot be read.
    fn descriptor_budget() -> usize {
        // "Max open files            20000                20000                files"
        let open_files = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits
                    .lines()
                    .find(|line| line.starts_with("Max open files"))?;
                line["Max open files".len()..]
                    .split_whitespace()
                    .next()?
                    .parse::<usize>()
                    .ok()
            });
        open_files.map_or(usize::MAX, |files| files - reserve(files))
    }

    /// `--help`: usage, then every setting with its flag, default and meaning.
    pub(crate) fn help_text() -> String {
        let mut text = format!(
        "pubsub-backend {}: publish/subscribe over WebSocket (/ws), topics over REST, one port.\n\n\
         Usage: pubsub-backend [--NAME VALUE]...\n\
         \x20      pubsub-backend healthcheck [--NAME VALUE]...   exit 0 if GET /health answers 200\n\
         \x20      pubsub-backend sub|pub|topics|create|delete|history ...   a client (see sub --help)\n\n\
         Settings come from environment variables; the flag beside each overrides it.\n\n",
        env!("CARGO_PKG_VERSION")
    );
        for s in SETTINGS {
            let flag = s.flag();
            let default = s.default.unwrap_or("unset");
            text += &format!("  {:<20} {:<22} {:<9} {}\n", s.var, flag, default, s.help);
        }
        text += "\n  -h, --help     print this help\n  -V, --version  print the version\n";
        text
    }

    /// Writes each log record to stderr as one line: RFC 3339 time, level, message. Records from
    /// tiny_http and tungstenite carry their module path so they can be told apart.
    pub(crate) struct StderrLogger {
        level: log::LevelFilter,
    }

    impl StderrLogger {
        pub(crate) fn install(level: log::LevelFilter) {
            if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
                log::set_max_level(level);
            }
        }
    }

    impl log::Log for StderrLogger {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= self.level
        }

        fn log(&self, record: &log::Record<'_>) {
            if !self.enabled(record.metadata()) {
                return;
            }
            let ts = humantime::format_rfc3339_millis(SystemTime::now());
            let origin = match record.module_path() {
                Some(path) if !path.starts_with(env!("CARGO_CRATE_NAME")) => format!(" [{path}]"),
                _ => String::new(),
            };
            // A closed stderr must not take the server down, so the write error is ignored.
            let _ = writeln!(
                io::stderr().lock(),
                "{ts} {:<5}{origin} {}",
                record.level(),
                record.args()
            );
        }

        fn flush(&self) {
            let _ = io::stderr().flush();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        #[test]
        fn config_rejects_bad_values_naming_the_variable() {
            let parse = |pairs: &[(&str, &str)]| {
                let pairs: Vec<(String, String)> = pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Invocation::parse(Vec::new(), move |var| {
                    pairs.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
                })
            };
            assert!(matches!(parse(&[]), Ok(Invocation::Run(_))));
            for (var, value) in [
                ("PORT", "99999"),
                ("RING_SIZE", "abc"),
                ("QUEUE_SIZE", "0"),
                ("LOG_LEVEL", "LOUD"),
                ("HEARTBEAT_SEC", "0"),
                ("WRITE_TIMEOUT_SEC", "-1"),
                ("SHUTDOWN_GRACE_SEC", "soon"),
                ("MAX_MESSAGE_BYTES", "1"),
                ("MAX_MESSAGE_BYTES", "1000000000"),
                ("QUEUE_SIZE", "1000000000000"),
                ("QUEUE_SIZE", "18446744073709551615"),
                ("RING_SIZE", "100000000"),
                ("MAX_CONNECTIONS", "99999999999"),
                ("MAX_TOPICS", "0"),
                ("MAX_RETAINED_BYTES", "-1"),
                ("HEARTBEAT_SEC", "1e30"),
                ("WRITE_TIMEOUT_SEC", "inf"),
                ("HANDSHAKE_TIMEOUT_SEC", "NaN"),
                ("SHUTDOWN_GRACE_SEC", "100000"),
                ("API_KEY", ""),
                ("HOST", "not a host!"),
            ] {
                let error = parse(&[(var, value)]).unwrap_err();
                assert!(error.starts_with(&format!("invalid {var}=")), "{error}");
            }
            let Ok(Invocation::Run(config)) =
                parse(&[("HEARTBEAT_SEC", "0.5"), ("LOG_LEVEL", "debug")])
            else {
                panic!("valid settings refused")
            };
            assert_eq!(config.heartbeat, Duration::from_millis(500));
            assert_eq!(config.log_level, log::LevelFilter::Debug);
        }

        #[test]
        fn flags_override_the_environment() {
            let args = ["--port", "9001", "--ring-size=7"].map(String::from);
            let Ok(Invocation::Run(config)) =
                Invocation::parse(args, |_| Some("1".to_string()).filter(|_| false))
            else {
                panic!("flags refused")
            };
            assert_eq!(config.bind_addr.port(), 9001);
            assert_eq!(config.ring_size, 7);
            assert!(Invocation::parse(["--bogus".to_string()], |_| None).is_err());
            assert!(matches!(
                Invocation::parse(["--help".to_string()], |_| None),
                Ok(Invocation::Help)
            ));
        }
    }
}

pub(crate) mod protocol {
    //! The wire protocol: what a WebSocket client may send ([`ClientRequest`]), what the server
    //! sends ([`ServerMessage`]), the error codes ([`ErrorCode`]), and every error body a client
    //! can get, on WebSocket, REST or before either ([`Failure`]), including the one translation
    //! of broker errors into codes and messages.
    //!
    //! Owns: parsing and validation, and serialization. Must never: do I/O, touch shared state, or
    //! accept a payload that some subscriber could not read back.

    use std::fmt::{self, Write as _};
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serialize};
    use serde_json::value::RawValue;
    use tungstenite::handshake::server::ErrorResponse;
    use tungstenite::http::{header, HeaderValue, StatusCode};
    use tungstenite::Utf8Bytes;

    use super::broker::{BrokerError, Replay};

    /// Error codes sent to clients, on WebSocket (`error.code`) and REST (`error.code`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    pub(crate) enum ErrorCode {
        BadRequest,
        TopicNotFound,
        SlowConsumer,
        Unauthorized,
        /// A WebSocket upgrade from a browser origin not in `CORS_ORIGINS`.
        Forbidden,
        Internal,
        TopicExists,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        /// `POST /topics` while `MAX_TOPICS` topics exist.
        TooManyTopics,
        /// Cluster mode: a subscription ended because its topic cannot go on here without a
        /// gap; the message carries the last `seq` sent, to resume from.
        SubscriptionGap,
    }

    /// A validated request from a WebSocket client.
    #[derive(Debug)]
    pub(crate) struct ClientRequest<'a> {
        /// Echoed on the reply; any string the client likes.
        pub(crate) request_id: Option<String>,
        pub(crate) op: Operation<'a>,
    }

    #[derive(Debug)]
    pub(crate) enum Operation<'a> {
        Subscribe {
            topic: String,
            client_id: String,
            replay: Replay,
        },
        Unsubscribe {
            topic: String,
            client_id: String,
        },
        /// `payload` borrows the exact JSON text the client sent, so the event carries the same
        /// value byte for byte (key order, number spelling) without a parse into a tree.
        Publish {
            topic: String,
            id: String,
            payload: &'a RawValue,
        },
        Ping,
    }

    /// Why a request was refused with `BAD_REQUEST`, and the `request_id` to echo if it had one.
    #[derive(Debug, PartialEq)]
    pub(crate) struct Rejection {
        pub(crate) request_id: Option<String>,
        pub(crate) message: String,
    }

    /// A request as it arrives: every field optional and untyped, so that validation can say which
    /// field is missing or wrong instead of serde's generic message. Unknown fields are ignored.
    #[derive(Deserialize)]
    struct RawRequest<'a> {
        #[serde(rename = "type", borrow, default, deserialize_with = "present")]
        kind: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        request_id: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        topic: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        client_id: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        last_n: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        since_seq: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        epoch: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        message: Option<&'a RawValue>,
    }

    /// The `message` of a WebSocket publish and the body of an HTTP publish, untyped like
    /// [`RawRequest`].
    #[derive(Deserialize)]
    pub(crate) struct RawMessage<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        pub(crate) id: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        pub(crate) payload: Option<&'a RawValue>,
    }

    /// Deserializes a field that is present, even as `null`, into `Some`, so that a JSON `null`
    /// payload is a payload and a `null` topic is a wrongly typed topic, not a missing one.
    pub(crate) fn present<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(deserializer).map(Some)
    }

    /// Parses a JSON object whose every field is optional, refusing anything but an object
    /// (serde would otherwise accept an array as a struct, field by field).
    pub(crate) fn parse_object<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
        if !text.trim_start().starts_with('{') {
            return Err(match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => "expected a JSON object".to_string(),
                Err(error) => format!("invalid JSON: {error}"),
            });
        }
        serde_json::from_str(text).map_err(|error| {
            let message = error.to_string();
            match message.strip_prefix("duplicate field ") {
                Some(key) => {
                    let key = key.split(" at line").next().unwrap_or(key);
                    format!("duplicate key {key}: each key may appear once")
                }
                None => format!("invalid JSON: {message}"),
            }
        })
    }

    /// Reads a required string field, naming it in the error.
    pub(crate) fn required_string(raw: Option<&RawValue>, name: &str) -> Result<String, String> {
        let raw = raw.ok_or_else(|| format!("missing field `{name}`"))?;
        serde_json::from_str::<String>(raw.get())
            .map_err(|_| format!("field `{name}` must be a string"))
    }

    /// Reads a required topic name and checks it against the naming rule.
    fn required_topic(raw: Option<&RawValue>) -> Result<String, String> {
        let topic = required_string(raw, "topic")?;
        if !is_valid_topic_name(&topic) {
            return Err(format!(
                "field `topic` is not a valid topic name: {TOPIC_NAME_RULE}"
            ));
        }
        Ok(topic)
    }

    fn required_client_id(raw: Option<&RawValue>) -> Result<String, String> {
        let client_id = required_string(raw, "client_id")?;
        if client_id.is_empty() {
            return Err("field `client_id` must not be empty".to_string());
        }
        Ok(client_id)
    }

    /// How topic names are spelled; quoted in every error about one.
    pub(crate) const TOPIC_NAME_RULE: &str =
        "1 to 128 characters from A-Z a-z 0-9 _ - . :, not . or ..";

    pub(crate) fn is_valid_topic_name(name: &str) -> bool {
        // `.` and `..` are path segments that clients resolve away (RFC 3986 5.2.4): no request
        // could ever reach such a topic.
        (1..=128).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    }

    impl<'a> ClientRequest<'a> {
        /// Validates one text frame from a client.
        /// (Fuzzed by `fuzz/fuzz_targets/client_message.rs`, hence `pub(crate)`.)
        pub(crate) fn parse(text: &'a str) -> Result<ClientRequest<'a>, Rejection> {
            let raw: RawRequest<'a> = parse_object(text).map_err(|message| Rejection {
                request_id: None,
                message,
            })?;
            let request_id = match raw.request_id {
                None => None,
                Some(id) => {
                    Some(
                        serde_json::from_str::<String>(id.get()).map_err(|_| Rejection {
                            request_id: None,
                            message: "field `request_id` must be a string".to_string(),
                        })?,
                    )
                }
            };
            let op = Self::operation(&raw).map_err(|message| Rejection {
                request_id: request_id.clone(),
                message,
            })?;
            Ok(ClientRequest { request_id, op })
        }

        fn operation(raw: &RawRequest<'a>) -> Result<Operation<'a>, String> {
            let kind = required_string(raw.kind, "type")?;
            match kind.as_str() {
                "subscribe" => Ok(Operation::Subscribe {
                    topic: required_topic(raw.topic)?,
                    client_id: required_client_id(raw.client_id)?,
                    replay: Self::replay(raw)?,
                }),
                "unsubscribe" => Ok(Operation::Unsubscribe {
                    topic: required_topic(raw.topic)?,
                    client_id: required_client_id(raw.client_id)?,
                }),
                "publish" => {
                    let topic = required_topic(raw.topic)?;
                    let message = raw.message.ok_or("missing field `message`")?;
                    let message: RawMessage<'a> = parse_object(message.get()).map_err(|_| {
                        "field `message` must be an object with `id` and `payload`".to_string()
                    })?;
                    let id = required_message_id(message.id, "message.id")?;
                    let payload = message.payload.ok_or("missing field `message.payload`")?;
                    check_payload(payload, "message.payload")?;
                    Ok(Operation::Publish { topic, id, payload })
                }
                "ping" => Ok(Operation::Ping),
                other => Err(format!(
                    "unknown type {other:?}: expected subscribe, unsubscribe, publish or ping"
                )),
            }
        }

        /// `last_n: N` replays the last N events; `since_seq: N` with `epoch: E` resumes after
        /// event N of that epoch; neither replays nothing.
        fn replay(raw: &RawRequest<'a>) -> Result<Replay, String> {
            match (raw.last_n, raw.since_seq, raw.epoch) {
                (Some(_), Some(_), _) => {
                    Err("give either `last_n` or `since_seq`, not both".to_string())
                }
                (Some(n), None, None) => Ok(Replay::LastN(non_negative(n, "last_n")?)),
                (None, Some(seq), Some(epoch)) => Ok(Replay::Since {
                    seq: non_negative(seq, "since_seq")?,
                    epoch: required_string(Some(epoch), "epoch")?,
                }),
                (None, Some(_), None) => {
                    Err("missing field `epoch`: `since_seq` needs it".to_string())
                }
                (_, None, Some(_)) => Err("field `epoch` goes with `since_seq`".to_string()),
                (None, None, None) => Ok(Replay::LastN(0)),
            }
        }
    }

    fn non_negative(raw: &RawValue, name: &str) -> Result<u64, String> {
        serde_json::from_str::<u64>(raw.get())
            .map_err(|_| format!("field `{name}` must be a non-negative integer"))
    }

    /// Checks that a payload is JSON every subscriber can read back, not merely JSON by RFC 8259's
    /// grammar: nesting within 128 levels, numbers within f64, strings of valid Unicode (no lone
    /// surrogate escapes). serde_json, and many other parsers, refuse the rest, so forwarding it
    /// would hand subscribers an event they cannot read. Walks the value without building it.
    pub(crate) fn check_payload(payload: &RawValue, name: &str) -> Result<(), String> {
        use serde::de::{DeserializeSeed, Error, MapAccess, SeqAccess, Visitor};
        /// serde_json, with its default limit, reads at most 127 nested levels (arrays and
        /// objects): every envelope a payload travels in must stay within it.
        const MAX_READABLE_NESTING: usize = 127;
        /// Levels the deepest envelope adds around a payload: a history answer nests it in the
        /// answer object, its `messages` array and the message object (a live or replayed event
        /// only in the event object and its `message`).
        const DEEPEST_ENVELOPE: usize = 3;
        const MAX_PAYLOAD_DEPTH: usize = MAX_READABLE_NESTING - DEEPEST_ENVELOPE;
        /// Any JSON value at this depth, read in full and kept nowhere. `deserialize_any` parses
        /// every string and number, where serde's `IgnoredAny` would skip them unchecked.
        struct Readable(usize);
        impl<'de> DeserializeSeed<'de> for Readable {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
                deserializer.deserialize_any(self)
            }
        }
        impl<'de> Visitor<'de> for Readable {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<(), E> {
                Ok(())
            }
            fn visit_i64<E>(self, _: i64) -> Result<(), E> {
                Ok(())
            }
            fn visit_u64<E>(self, _: u64) -> Result<(), E> {
                Ok(())
            }
            fn visit_f64<E>(self, _: f64) -> Result<(), E> {
                Ok(())
            }
            fn visit_str<E>(self, _: &str) -> Result<(), E> {
                Ok(())
            }
            fn visit_unit<E>(self) -> Result<(), E> {
                Ok(())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                let inner = self.nested::<A::Error>()?;
                while seq.next_element_seed(Readable(inner))?.is_some() {}
                Ok(())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                let inner = self.nested::<A::Error>()?;
                // Keys through the same visitor: a key with an escape (`"\u043a"`, `"a\"b"`) is
                // unescaped into a buffer, which a borrowed `&str` could not take.
                while map.next_key_seed(Readable(inner))?.is_some() {
                    map.next_value_seed(Readable(inner))?;
                }
                Ok(())
            }
        }
        impl Readable {
            fn nested<E: Error>(&self) -> Result<usize, E> {
                if self.0 >= MAX_PAYLOAD_DEPTH {
                    return Err(E::custom(format!(
                        "nested deeper than {MAX_PAYLOAD_DEPTH} levels"
                    )));
                }
                Ok(self.0 + 1)
            }
        }
        let mut deserializer = serde_json::Deserializer::from_str(payload.get());
        Readable(0)
            .deserialize(&mut deserializer)
            .map_err(|error| format!("field `{name}` is not JSON every client can read: {error}"))
    }

    /// Reads a message id: a UUID in any of its spellings (hyphenated, 32 hex digits, braced,
    /// `urn:uuid:`, any case), returned in the canonical form, lower case with hyphens, which is
    /// how ids are compared for de-duplication and echoed.
    pub(crate) fn required_message_id(
        raw: Option<&RawValue>,
        name: &str,
    ) -> Result<String, String> {
        let id = required_string(raw, name)?;
        match uuid::Uuid::try_parse(&id) {
            Ok(uuid) => Ok(uuid.hyphenated().to_string()),
            Err(_) => Err(format!("field `{name}` must be a UUID, got {id:?}")),
        }
    }

    /// Everything the server sends on a WebSocket, one JSON object per text frame.
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    pub(crate) enum ServerMessage<'a> {
        /// A publish ack carries the `seq` the message got; a subscribe ack is finished by the
        /// broker with the topic's `epoch`, last `seq` and, on resume, `recovered`.
        Ack {
            #[serde(skip_serializing_if = "Option::is_none")]
            request_id: Option<&'a str>,
            status: &'static str,
            topic: &'a str,
            ts: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            /// On a publish whose message id the topic had already published (and still holds):
            /// `seq` is the original's, and nothing was published again.
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            duplicate: bool,
        },
        /// Serialized without `ts` and `seq`; the broker appends them (see [`Unfinished`]).
        Event {
            topic: &'a str,
            message: EventMessage<'a>,
        },
        Pong {
            #[serde(skip_serializing_if = "Option::is_none")]
            request_id: Option<&'a str>,
            ts: &'a str,
        },
        Error {
            #[serde(skip_serializing_if = "Option::is_none")]
            request_id: Option<&'a str>,
            /// On `SLOW_CONSUMER`: the topic whose event did not fit and the `seq` of the last
            /// event of it queued before the cut, where a reconnecting client resumes.
            #[serde(skip_serializing_if = "Option::is_none")]
            topic: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            error: ErrorBody<'a>,
            ts: &'a str,
        },
        Info {
            #[serde(skip_serializing_if = "Option::is_none")]
            topic: Option<&'a str>,
            msg: &'a str,
            ts: &'a str,
        },
    }

    #[derive(Serialize)]
    pub(crate) struct EventMessage<'a> {
        pub(crate) id: &'a str,
        pub(crate) payload: &'a RawValue,
    }

    /// The `error` object of a WebSocket error message and of every REST failure body.
    #[derive(Serialize)]
    pub(crate) struct ErrorBody<'a> {
        code: ErrorCode,
        message: &'a str,
    }

    impl ServerMessage<'_> {
        /// The notice a topic's subscribers get when it is deleted.
        pub(crate) fn topic_deleted(name: &str) -> Utf8Bytes {
            ServerMessage::Info {
                topic: Some(name),
                msg: "topic_deleted",
                ts: &timestamp(),
            }
            .to_frame()
        }

        /// Serializes once; the result is shared by every queue it goes to.
        pub(crate) fn to_frame(&self) -> Utf8Bytes {
            self.to_json().into()
        }

        fn to_json(&self) -> String {
            // Serializing these types cannot fail (no maps with non-string keys, no I/O); should
            // it ever, the client gets an INTERNAL error rather than the server a panic.
            serde_json::to_string(self).unwrap_or_else(|_| {
                r#"{"type":"error","error":{"code":"INTERNAL","message":"serialization failed"}}"#
                    .into()
            })
        }
    }

    /// A server message serialized before the broker knows all of its fields: the JSON object
    /// without its closing brace. Under its lock, where the order of publishes and so the numbers
    /// are decided, the broker appends the fields only it knows and the brace: string pushes,
    /// nothing that serializes or can fail.
    #[derive(Debug)]
    pub(crate) struct Unfinished(pub(crate) String);

    impl Unfinished {
        pub(crate) fn new(message: &ServerMessage<'_>) -> Unfinished {
            let mut text = message.to_json();
            text.pop(); // the closing `}` of the object
            Unfinished(text)
        }

        /// Finishes an event: `…,"ts":"…","seq":42}`. The time is taken where the number is, so
        /// that `ts` never goes backwards while `seq` goes forwards.
        pub(crate) fn with_time_and_seq(&self, time: SystemTime, seq: u64) -> Utf8Bytes {
            self.finish(|text| {
                let ts = humantime::format_rfc3339_millis(time);
                let _ = write!(text, ",\"ts\":\"{ts}\",\"seq\":{seq}");
            })
        }

        /// Finishes a message that ends with the `seq` of an event: `…,"seq":42}`.
        pub(crate) fn with_seq(&self, seq: u64) -> Utf8Bytes {
            self.finish(|text| {
                let _ = write!(text, ",\"seq\":{seq}");
            })
        }

        /// Finishes a subscribe ack: `…,"epoch":"…","seq":42,"recovered":true}`.
        pub(crate) fn with_position(
            &self,
            epoch: &str,
            seq: u64,
            recovered: Option<bool>,
        ) -> Utf8Bytes {
            self.finish(|text| {
                // The epoch is hexadecimal: nothing to escape.
                let _ = write!(text, ",\"epoch\":\"{epoch}\",\"seq\":{seq}");
                if let Some(recovered) = recovered {
                    let _ = write!(text, ",\"recovered\":{recovered}");
                }
            })
        }

        fn finish(&self, append: impl FnOnce(&mut String)) -> Utf8Bytes {
            let mut text = String::with_capacity(self.0.len() + 64);
            text.push_str(&self.0);
            // Writing to a String cannot fail.
            append(&mut text);
            text.push('}');
            text.into()
        }
    }

    /// Now, as the RFC 3339 UTC string with milliseconds every server message carries as `ts`.
    pub(crate) fn timestamp() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }

    /// A failure as a client is told it: an HTTP status (used where the answer is HTTP), a code
    /// and a message. Every error the server sends is built from one, so REST, WebSocket and the
    /// answers written before either (refusals, handshake errors) share one shape and one wording.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Failure {
        pub(crate) status: StatusCode,
        pub(crate) code: ErrorCode,
        pub(crate) message: String,
    }

    impl Failure {
        pub(crate) fn new(
            status: StatusCode,
            code: ErrorCode,
            message: impl Into<String>,
        ) -> Failure {
            Failure {
                status,
                code,
                message: message.into(),
            }
        }

        /// A request that cannot be served as sent: 400 `BAD_REQUEST`.
        pub(crate) fn bad_request(message: impl Into<String>) -> Failure {
            Failure::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
        }

        /// A server-side failure: 500 `INTERNAL`.
        pub(crate) fn internal(message: impl Into<String>) -> Failure {
            Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                message,
            )
        }

        /// A REST body or WebSocket message over `MAX_MESSAGE_BYTES`: 413 `PAYLOAD_TOO_LARGE`.
        pub(crate) fn too_large(limit: usize) -> Failure {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("body larger than MAX_MESSAGE_BYTES ({limit} bytes)"),
            )
        }

        /// What a client is told when the broker refuses an operation on `topic`: the one
        /// translation of [`BrokerError`], for REST and WebSocket alike.
        pub(crate) fn from_broker(error: BrokerError, topic: &str) -> Failure {
            match error {
                BrokerError::TopicNotFound => Failure::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::TopicNotFound,
                    format!("topic {topic:?} does not exist"),
                ),
                BrokerError::TopicExists => Failure::new(
                    StatusCode::CONFLICT,
                    ErrorCode::TopicExists,
                    format!("topic {topic:?} already exists"),
                ),
                BrokerError::TooManyTopics => Failure::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    ErrorCode::TooManyTopics,
                    format!(
                    "topic {topic:?} not created: MAX_TOPICS topics exist already; delete one first"
                ),
                ),
                BrokerError::Closed | BrokerError::SessionEnded => Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Internal,
                    "the server is shutting down",
                ),
            }
        }

        fn error_body(&self) -> ErrorBody<'_> {
            ErrorBody {
                code: self.code,
                message: &self.message,
            }
        }

        /// `{"error":{"code":…,"message":…}}`: the body of every HTTP failure.
        pub(crate) fn to_body(&self) -> String {
            #[derive(Serialize)]
            struct Body<'a> {
                error: ErrorBody<'a>,
            }
            let body = Body {
                error: self.error_body(),
            };
            // Cannot fail: two strings and a unit enum.
            serde_json::to_string(&body).unwrap_or_default()
        }

        /// The WebSocket error message about `topic`, for the broker to finish with a `seq`.
        pub(crate) fn to_message<'a>(
            &'a self,
            topic: Option<&'a str>,
            ts: &'a str,
        ) -> ServerMessage<'a> {
            ServerMessage::Error {
                request_id: None,
                topic,
                seq: None,
                error: self.error_body(),
                ts,
            }
        }

        /// The WebSocket error message answering the request `request_id`.
        pub(crate) fn to_frame(&self, request_id: Option<&str>, ts: &str) -> Utf8Bytes {
            ServerMessage::Error {
                request_id,
                topic: None,
                seq: None,
                error: self.error_body(),
                ts,
            }
            .to_frame()
        }

        /// The WebSocket error message of a session cut as a slow consumer, with the topic whose
        /// event did not fit and the `seq` of its last event queued before the cut.
        pub(crate) fn to_cut_frame(&self, position: Option<(&str, u64)>, ts: &str) -> Utf8Bytes {
            let (topic, seq) = position.unzip();
            ServerMessage::Error {
                request_id: None,
                topic,
                seq,
                error: self.error_body(),
                ts,
            }
            .to_frame()
        }

        /// The whole HTTP/1.1 answer, closing the connection, for a connection that never reaches
        /// tiny_http or tungstenite: one buffer, since an answer split over several writes may be
        /// cut by the close that follows.
        pub(crate) fn to_http_response(&self) -> Vec<u8> {
            let body = self.to_body();
            format!(
            "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            http_date(),
            body.len()
        )
        .into_bytes()
        }

        /// The same answer as tungstenite's refusal of a WebSocket handshake.
        pub(crate) fn to_handshake_response(&self) -> ErrorResponse {
            let body = self.to_body();
            let mut response = ErrorResponse::new(None);
            *response.status_mut() = self.status;
            let headers = response.headers_mut();
            headers.insert(header::DATE, date_header());
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            *response.body_mut() = Some(body);
            response
        }
    }

    /// Now, as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`): RFC 9110 6.6.1, an origin server
    /// with a clock sends `Date` on every answer. tiny_http adds it to REST answers; this is for
    /// the answers the server writes itself.
    pub(crate) fn http_date() -> String {
        httpdate::fmt_http_date(SystemTime::now())
    }

    /// [`http_date`] as a header value for tungstenite's handshake answers.
    pub(crate) fn date_header() -> HeaderValue {
        // An HTTP date is ASCII, always a valid header value.
        HeaderValue::from_str(&http_date()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    #[cfg(test)]
    pub(crate) mod tests {
        use super::*;
        use std::time::Duration;

        /// Parses `input` as a client request and compares the outcome's debug form.
        fn check(input: &str, expected: &str) {
            let actual = match ClientRequest::parse(input) {
                Ok(request) => format!("{:?} {:?}", request.request_id, request.op),
                Err(rejection) => format!(
                    "{:?} BAD_REQUEST {}",
                    rejection.request_id, rejection.message
                ),
            };
            assert_eq!(actual, expected, "input: {input}");
        }

        #[test]
        fn payloads_must_be_json_every_client_can_read() {
            let publish = |payload: &str| {
                format!(
                    r#"{{"type":"publish","topic":"t","message":{{"id":"9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b","payload":{payload}}}}}"#
                )
            };
            let refused = |payload: &str| ClientRequest::parse(&publish(payload)).is_err();
            assert!(refused(r#""\ud800""#), "a lone surrogate");
            assert!(refused(r#"{"a":["\udfff"]}"#), "a lone surrogate, nested");
            assert!(refused("1e400"), "a number beyond f64");
            assert!(
                refused(&format!("{}1{}", "[".repeat(200), "]".repeat(200))),
                "200 levels"
            );
            assert!(
                !refused(&format!("{}1{}", "[".repeat(100), "]".repeat(100))),
                "100 levels"
            );
            assert!(!refused(
                r#"{"ok":"\ud83d\ude00","n":123456789012345678901234567890,"f":-0.0}"#
            ));
            // Escapes in keys, as Python's json.dumps writes every non-ASCII key.
            assert!(!refused(r#"{"\u043a\u043b\u044e\u0447":"\u0437"}"#));
            assert!(!refused(r#"{"a\"b":1,"c\\d":2,"e\nf":3,"\u0000":4}"#));
            assert!(!refused(
                r#"{"\ud83d\ude80":{"\ud83d\ude80":"\ud83d\ude80"}}"#
            ));
            assert!(refused(r#"{"\ud800":1}"#), "a lone surrogate in a key");
        }

        #[test]
        fn parses_valid_requests() {
            check(r#"{"type":"ping","request_id":"p1"}"#, r#"Some("p1") Ping"#);
            check(
                r#"{"type":"subscribe","topic":"orders","client_id":"c1","last_n":5}"#,
                r#"None Subscribe { topic: "orders", client_id: "c1", replay: LastN(5) }"#,
            );
            check(
                r#"{"type":"unsubscribe","topic":"a.b:c-d_e","client_id":"c1"}"#,
                r#"None Unsubscribe { topic: "a.b:c-d_e", client_id: "c1" }"#,
            );
            check(
                r#"{"type":"publish","topic":"t","message":{"id":"9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b","payload":{"b":1,"a":[1.50,null]}}}"#,
                r#"None Publish { topic: "t", id: "9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b", payload: RawValue({"b":1,"a":[1.50,null]}) }"#,
            );
            check(
                r#"{"type":"publish","topic":"t","message":{"id":"9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b","payload":null}}"#,
                r#"None Publish { topic: "t", id: "9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b", payload: RawValue(null) }"#,
            );
        }

        #[test]
        fn rejects_malformed_requests_naming_the_field() {
            check(
                "not json",
                "None BAD_REQUEST invalid JSON: expected ident at line 1 column 2",
            );
            check("[1,2]", "None BAD_REQUEST expected a JSON object");
            check(
                r#"{"request_id":"r"}"#,
                r#"Some("r") BAD_REQUEST missing field `type`"#,
            );
            check(
                r#"{"type":7}"#,
                "None BAD_REQUEST field `type` must be a string",
            );
            check(
                r#"{"type":"dance","request_id":"r"}"#,
                r#"Some("r") BAD_REQUEST unknown type "dance": expected subscribe, unsubscribe, publish or ping"#,
            );
            check(
                r#"{"type":"ping","request_id":5}"#,
                "None BAD_REQUEST field `request_id` must be a string",
            );
            check(
                r#"{"type":"subscribe","client_id":"c"}"#,
                "None BAD_REQUEST missing field `topic`",
            );
            check(
                r#"{"type":"subscribe","topic":null,"client_id":"c"}"#,
                "None BAD_REQUEST field `topic` must be a string",
            );
            check(
                r#"{"type":"subscribe","topic":"t"}"#,
                "None BAD_REQUEST missing field `client_id`",
            );
            check(
                r#"{"type":"subscribe","topic":"t","client_id":"c","last_n":-1}"#,
                "None BAD_REQUEST field `last_n` must be a non-negative integer",
            );
            check(
                r#"{"type":"subscribe","topic":"t","client_id":"c","last_n":1.5}"#,
                "None BAD_REQUEST field `last_n` must be a non-negative integer",
            );
            check(
            r#"{"type":"subscribe","topic":"bad name","client_id":"c"}"#,
            "None BAD_REQUEST field `topic` is not a valid topic name: 1 to 128 characters from A-Z a-z 0-9 _ - . :, not . or ..",
        );
            check(
                r#"{"type":"publish","topic":"t"}"#,
                "None BAD_REQUEST missing field `message`",
            );
            check(
                r#"{"type":"publish","topic":"t","message":"hi"}"#,
                "None BAD_REQUEST field `message` must be an object with `id` and `payload`",
            );
            check(
                r#"{"type":"publish","topic":"t","message":{"id":"nope","payload":1}}"#,
                r#"None BAD_REQUEST field `message.id` must be a UUID, got "nope""#,
            );
            check(
                r#"{"type":"publish","topic":"t","message":{"id":"9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b"}}"#,
                "None BAD_REQUEST missing field `message.payload`",
            );
        }

        #[test]
        fn subscribe_takes_last_n_or_a_resume_position() {
            let subscribe = |fields: &str| {
                format!(r#"{{"type":"subscribe","topic":"t","client_id":"c"{fields}}}"#)
            };
            check(
                &subscribe(r#","since_seq":4,"epoch":"ab""#),
                r#"None Subscribe { topic: "t", client_id: "c", replay: Since { seq: 4, epoch: "ab" } }"#,
            );
            check(
                &subscribe(""),
                r#"None Subscribe { topic: "t", client_id: "c", replay: LastN(0) }"#,
            );
            check(
                &subscribe(r#","last_n":2,"since_seq":4,"epoch":"ab""#),
                "None BAD_REQUEST give either `last_n` or `since_seq`, not both",
            );
            check(
                &subscribe(r#","since_seq":4"#),
                "None BAD_REQUEST missing field `epoch`: `since_seq` needs it",
            );
            check(
                &subscribe(r#","epoch":"ab""#),
                "None BAD_REQUEST field `epoch` goes with `since_seq`",
            );
            check(
                &subscribe(r#","since_seq":-4,"epoch":"ab""#),
                "None BAD_REQUEST field `since_seq` must be a non-negative integer",
            );
            check(
                &subscribe(r#","since_seq":4,"epoch":5"#),
                "None BAD_REQUEST field `epoch` must be a string",
            );
        }

        #[test]
        fn topic_names_follow_the_rule() {
            assert!(is_valid_topic_name("orders.eu-1:new_"));
            assert!(is_valid_topic_name(&"a".repeat(128)));
            assert!(!is_valid_topic_name(&"a".repeat(129)));
            assert!(!is_valid_topic_name(""));
            assert!(!is_valid_topic_name("a/b"));
            assert!(!is_valid_topic_name("é"));
            assert!(!is_valid_topic_name("."));
            assert!(!is_valid_topic_name(".."));
            assert!(is_valid_topic_name("..."));
            assert!(is_valid_topic_name(".a"));
        }

        #[test]
        fn server_messages_serialize_as_the_spec_shows() {
            let payload = RawValue::from_string(r#"{"z":1,"a":2}"#.to_string()).unwrap();
            let message = EventMessage {
                id: "id1",
                payload: &payload,
            };
            let event = ServerMessage::Event {
                topic: "orders",
                message,
            };
            let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123);
            assert_eq!(
                Unfinished::new(&event).with_time_and_seq(time, 7).as_str(),
                r#"{"type":"event","topic":"orders","message":{"id":"id1","payload":{"z":1,"a":2}},"ts":"2026-11-30T00:53:20.123Z","seq":7}"#
            );
            let ack = |seq| ServerMessage::Ack {
                request_id: Some("r1"),
                status: "ok",
                topic: "o",
                ts: "T",
                seq,
                duplicate: false,
            };
            assert_eq!(
                ack(Some(3)).to_frame().as_str(),
                r#"{"type":"ack","request_id":"r1","status":"ok","topic":"o","ts":"T","seq":3}"#
            );
            assert_eq!(
                Unfinished::new(&ack(None))
                    .with_position("ab12", 9, Some(false))
                    .as_str(),
                r#"{"type":"ack","request_id":"r1","status":"ok","topic":"o","ts":"T","epoch":"ab12","seq":9,"recovered":false}"#
            );
            let info = ServerMessage::Info {
                topic: None,
                msg: "ping",
                ts: "T",
            };
            assert_eq!(
                info.to_frame().as_str(),
                r#"{"type":"info","msg":"ping","ts":"T"}"#
            );
        }

        /// One failure, in each shape a client can get it.
        #[test]
        fn a_failure_reads_the_same_on_rest_websocket_and_raw_http() {
            let failure = Failure::from_broker(BrokerError::TopicExists, "o");
            assert_eq!(failure.status, StatusCode::CONFLICT);
            let body =
                r#"{"error":{"code":"TOPIC_EXISTS","message":"topic \"o\" already exists"}}"#;
            assert_eq!(failure.to_body(), body);
            assert_eq!(
                failure.to_frame(Some("r1"), "T").as_str(),
                r#"{"type":"error","request_id":"r1","error":{"code":"TOPIC_EXISTS","message":"topic \"o\" already exists"},"ts":"T"}"#
            );
            let http = String::from_utf8(failure.to_http_response()).unwrap();
            let (head, rest) = http.split_once("\r\n\r\n").unwrap();
            assert_eq!(rest, body);
            assert!(head.starts_with("HTTP/1.1 409 Conflict\r\n"), "{head}");
            let date = head
                .lines()
                .find_map(|line| line.strip_prefix("Date: "))
                .expect("a Date header");
            assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
            let handshake = failure.to_handshake_response();
            assert_eq!(handshake.status(), StatusCode::CONFLICT);
            assert_eq!(handshake.body().as_deref(), Some(body));
            assert!(handshake.headers().contains_key("date"));
        }

        #[test]
        fn timestamps_are_rfc3339_utc_with_millis() {
            let ts = timestamp();
            assert_eq!(ts.len(), "2026-11-27T06:24:44.123Z".len(), "{ts}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        }

        /// Every input of a committed fuzz corpus (`fuzz/corpus/NAME`, see docs/testing.md,
        /// "Fuzzing"), for the tests that replay them: the fuzz targets check much more, but need a
        /// nightly toolchain; this keeps the corpora replayed by every `cargo test`.
        pub(crate) fn fuzz_corpus(name: &str) -> Vec<Vec<u8>> {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(name);
            let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
                .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
                .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
                .collect();
            assert!(
                inputs.len() > 10,
                "{}: {} inputs",
                dir.display(),
                inputs.len()
            );
            inputs
        }

        /// The client-message corpus, parsed on a thread with a session's stack: no panic, no
        /// stack overflow, and every rejection says why.
        #[test]
        fn the_client_message_corpus_parses_without_a_panic() {
            let messages = fuzz_corpus("client_message");
            let replay = std::thread::Builder::new()
                .stack_size(super::super::ws::SESSION_STACK_SIZE)
                .spawn(move || {
                    for input in &messages {
                        if let Ok(text) = std::str::from_utf8(input) {
                            if let Err(rejection) = ClientRequest::parse(text) {
                                assert!(!rejection.message.is_empty(), "{text:?}");
                            }
                        }
                    }
                })
                .unwrap();
            replay.join().expect("an input of the fuzz corpus panicked");
        }
    }
}

mod queue {
    //! What travels on a WebSocket session's outbound queue, from the reader and the broker to the
    //! session's writer ([`Outgoing`]).
    //!
    //! Owns: the queue item and the place a reply takes before it is built ([`ReplySlot`]). Must
    //! never: grow an item beyond 16 bytes (each byte costs `QUEUE_SIZE` bytes per connection).

    use std::sync::{Arc, Condvar, Mutex, PoisonError};

    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::{Bytes, Utf8Bytes};

    /// One item on a connection's outbound queue. Only the connection's writer thread turns items
    /// into bytes on the socket. An item is a pointer and a tag, 16 bytes: `sync_channel` allocates
    /// every connection's `QUEUE_SIZE` slots up front, so each byte here costs `QUEUE_SIZE` bytes
    /// per connection.
    #[derive(Debug)]
    pub(crate) enum Outgoing {
        /// A live event, one allocation shared by every subscriber's queue.
        Event(Arc<LiveEvent>),
        /// Anything else, at most one per request the connection sends.
        Reply(Box<Reply>),
        /// Nothing to write: look at the session's [`Ending`](crate::broker::Ending) (sent when shutdown begins).
        Wake,
    }

    const _: () = assert!(std::mem::size_of::<Outgoing>() <= 16);

    impl Outgoing {
        pub(crate) fn text(frame: Utf8Bytes) -> Outgoing {
            Outgoing::Reply(Box::new(Reply::Text(frame)))
        }
    }

    /// A published event as its subscribers' writers get it.
    #[derive(Debug)]
    pub(crate) struct LiveEvent {
        pub(crate) frame: Utf8Bytes,
        /// When the publish was accepted ([`Shared::clock_us`](crate::state::Shared::clock_us)), for the publish-to-write histogram.
        pub(crate) accepted_us: u32,
    }

    #[derive(Debug)]
    pub(crate) enum Reply {
        /// A complete JSON text frame: ack, error or info.
        Text(Utf8Bytes),
        /// A subscribe ack followed by its replayed events, queued as one item under the broker lock
        /// so that no live event can come between them.
        Batch(Box<[Utf8Bytes]>),
        /// RFC 6455 5.5.3: a Pong echoing the application data of the Ping the reader received.
        Pong(Bytes),
        /// The place of a reply that is not built yet (a subscribe ack with its replay).
        Slot(Arc<ReplySlot>),
        /// Send a Close frame with this code and reason, then write nothing more.
        Close(CloseCode, &'static str),
    }

    /// The place of a reply queued before it is built: a subscribe ack and its replay. The reader
    /// fills it right after the broker call and the writer waits for it, so the items queued behind
    /// it stay behind it. A mutex and a condition variable rather than a one-item channel: building
    /// a channel takes close to a kilobyte of the reader's stack, and that frame alone cost every
    /// connection one more page of resident stack.
    #[derive(Debug, Default)]
    pub(crate) struct ReplySlot {
        /// `None` until filled; `Some(None)` if the request produced no reply.
        item: Mutex<Option<Option<Outgoing>>>,
        filled: Condvar,
    }

    impl ReplySlot {
        /// Fills the slot once; later calls change nothing.
        pub(crate) fn fill(&self, item: Option<Outgoing>) {
            let mut state = self.item.lock().unwrap_or_else(PoisonError::into_inner);
            if state.is_none() {
                *state = Some(item);
            }
            drop(state);
            self.filled.notify_one();
        }

        /// Waits until the slot is filled and takes what it holds.
        pub(crate) fn take(&self) -> Option<Outgoing> {
            let mut state = self.item.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(item) = state.take() {
                    return item;
                }
                state = self
                    .filled
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// The reader's hold on a [`ReplySlot`]. Dropped unfilled, when the request panicked, it
    /// leaves the slot empty, so the writer never waits on it for ever.
    pub(crate) struct SlotFiller(pub(crate) Arc<ReplySlot>);

    impl Drop for SlotFiller {
        fn drop(&mut self) {
            self.0.fill(None);
        }
    }
}

pub(crate) mod broker {
    //! The broker: topics, their replay rings and subscribers, the numbering of events, and the
    //! sending end of every WebSocket session's queue, behind one mutex.
    //!
    //! Owns: "subscribed ⇔ holds a live queue", kept true by its private fields. Must never: do
    //! I/O, block on a queue (`try_send` only), serialize under its lock, or panic while holding it.

    use std::collections::{BTreeMap, HashMap, VecDeque};
    use std::sync::atomic::{fence, AtomicBool, AtomicU8, AtomicUsize, Ordering};
    use std::sync::mpsc::{SyncSender, TrySendError};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
    use std::thread::{self, Thread};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use tungstenite::Utf8Bytes;

    use super::protocol::Unfinished;
    use super::queue::{LiveEvent, Outgoing, Reply};

    /// Identifies one WebSocket connection for its whole life.
    pub(crate) type SessionId = u64;

    /// What an operation could not do. The broker never fails for any other reason.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum BrokerError {
        TopicNotFound,
        TopicExists,
        /// Shutdown has begun: no new subscriptions or publishes.
        Closed,
        /// The session was cut (a slow consumer) between its reader's check and this call.
        SessionEnded,
        /// `MAX_TOPICS` topics exist already.
        TooManyTopics,
    }

    /// What the broker holds at most.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Limits {
        /// Events kept per topic (`RING_SIZE`).
        pub(crate) ring_size: usize,
        /// Bytes of event frames kept in all rings together (`MAX_RETAINED_BYTES`).
        pub(crate) retained_bytes: usize,
        /// Topics (`MAX_TOPICS`).
        pub(crate) topics: usize,
    }

    /// What a subscription replays before live events.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Replay {
        /// The last N events the ring holds (0: none).
        LastN(u64),
        /// Every event after `seq` of `epoch`, if the ring still holds them all; otherwise
        /// none, and the ack says `recovered: false`.
        Since { seq: u64, epoch: String },
    }

    /// Why a session is ending. Set once, by the broker (slow consumer) or by shutdown; read by
    /// the session's writer once its queue is empty, and by its reader before each request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    pub(crate) enum Ending {
        Open = 0,
        /// Its queue overflowed: it was removed from every topic.
        SlowConsumer = 1,
        ShuttingDown = 2,
    }

    /// What the broker tells a session's threads: why it ends and, after a slow-consumer cut,
    /// where the client can resume; and when a lingering writer must wake.
    #[derive(Debug, Default)]
    pub(crate) struct SessionControl {
        ending: AtomicU8,
        cut_position: OnceLock<(Arc<str>, u64)>,
        /// Set by the reader while it executes a request and queues its reply, so that the
        /// writer of an ending session writes that reply (a publish's ack, say) before the
        /// session's last message.
        executing: AtomicBool,
        /// Events queued and not yet written: the broker counts up before each send, the
        /// writer counts down after each flush, so this may run ahead but never behind.
        queued: AtomicUsize,
        /// Half the queue: a lingering writer is woken when `queued` reaches it.
        wake_at: usize,
        /// The writer thread, registered when it starts.
        writer: OnceLock<Thread>,
        /// Set while the writer sleeps on an empty queue: whoever queues an item for it then
        /// wakes it, the broker only after releasing its lock.
        asleep: AtomicBool,
        /// Set by the reader when it queued a reply: it ends a linger, which events do not.
        reply_waiting: AtomicBool,
        /// Set while the writer is inside a socket write: a queue that fills then is the
        /// client's doing, not the server's.
        in_write: AtomicBool,
        /// Publishers waiting for this writer to catch up, on `caught_up`.
        waiters: AtomicUsize,
        waiting: Mutex<()>,
        caught_up: Condvar,
    }

    impl SessionControl {
        /// The control of a session whose queue holds `queue_size` items.
        pub(crate) fn new(queue_size: usize) -> SessionControl {
            SessionControl {
                wake_at: (queue_size / 2).max(1),
                ..SessionControl::default()
            }
        }

        /// Called by the writer after a flush of several events: sleeps up to `time` so that
        /// the next wake-up writes a bigger batch, unless the queue is already half full or
        /// the session ends. Woken early when either happens meanwhile.
        pub(crate) fn linger(&self, time: Duration) {
            let deadline = Instant::now() + time;
            // A wake-up between a check and the park is kept by the thread's token; a park
            // that returns for no reason parks again.
            while self.queued.load(Ordering::Relaxed) < self.wake_at
                && self.ending() == Ending::Open
                && !self.reply_waiting.swap(false, Ordering::SeqCst)
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                thread::park_timeout(left);
            }
        }

        /// Registers the writer thread, from both sides, whichever comes first: by the writer
        /// before it can first sleep (the broker only wakes a writer that marked itself
        /// asleep), and by the reader from the spawn handle before it queues any reply.
        pub(crate) fn register_writer(&self, writer: Thread) {
            let _ = self.writer.set(writer);
        }

        /// Called by the writer: true before it looks at its queue for the last time and then
        /// sleeps, false once awake.
        pub(crate) fn set_asleep(&self, asleep: bool) {
            self.asleep.store(asleep, Ordering::SeqCst);
            // Orders the flag before that last look, whatever the channel's own orderings.
            fence(Ordering::SeqCst);
        }

        /// Called after queuing an item: true when the writer was asleep and the caller must
        /// wake it ([`wake_writer`](Self::wake_writer)). An atomic swap, so that either the
        /// writer's last look at its queue sees the item or this sees the writer asleep.
        fn take_asleep(&self) -> bool {
            self.asleep.swap(false, Ordering::SeqCst)
        }

        /// Marks the writer entering (true) or leaving (false) a socket write.
        pub(crate) fn set_in_write(&self, in_write: bool) {
            self.in_write.store(in_write, Ordering::SeqCst);
            if in_write {
                self.wake_waiters();
            }
        }

        /// True while half the queue or more waits for a writer that is not blocked on its
        /// socket: a writer behind for want of CPU, which a publisher should wait for.
        pub(crate) fn is_behind(&self) -> bool {
            self.queued.load(Ordering::SeqCst) >= self.wake_at
                && !self.in_write.load(Ordering::SeqCst)
                && self.ending() == Ending::Open
        }

        /// Waits, up to `limit`, while the writer [`is_behind`](Self::is_behind).
        pub(crate) fn wait_until_caught_up(&self, limit: Duration) {
            // SeqCst with the writer's updates: either the writer sees this waiter and wakes
            // it, or this check sees the writer's progress and does not wait.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + limit;
            let mut guard = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            while self.is_behind() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                guard = match self.caught_up.wait_timeout(guard, left) {
                    Ok((guard, _)) => guard,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
            drop(guard);
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }

        /// Called by the writer once `events` events have been flushed.
        pub(crate) fn count_written(&self, events: usize) {
            let before = self.queued.fetch_sub(events, Ordering::SeqCst);
            if before >= self.wake_at && before - events < self.wake_at {
                self.wake_waiters();
            }
        }

        fn wake_waiters(&self) {
            if self.waiters.load(Ordering::SeqCst) > 0 {
                // Taking the lock orders this after a waiter's check, before its wait.
                drop(self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
                self.caught_up.notify_all();
            }
        }

        /// Counts one event about to be queued; the count of queued events.
        fn count_queued(&self) -> usize {
            self.queued.fetch_add(1, Ordering::Relaxed) + 1
        }

        /// Called by the reader after queuing a reply: a reply to the client's own request is
        /// never held back by a linger.
        pub(crate) fn wake_for_reply(&self) {
            self.reply_waiting.store(true, Ordering::SeqCst);
            self.wake_writer();
        }

        /// Wakes the writer from its sleep on an empty queue or from its linger.
        pub(crate) fn wake_writer(&self) {
            if let Some(writer) = self.writer.get() {
                writer.unpark();
            }
        }

        pub(crate) fn ending(&self) -> Ending {
            match self.ending.load(Ordering::SeqCst) {
                0 => Ending::Open,
                1 => Ending::SlowConsumer,
                _ => Ending::ShuttingDown,
            }
        }

        /// The topic whose event did not fit and the `seq` of its last event queued before
        /// the cut.
        pub(crate) fn cut_position(&self) -> Option<(&str, u64)> {
            self.cut_position.get().map(|(topic, seq)| (&**topic, *seq))
        }

        /// Marks the start of a request on the reader; false when the session is ending, in
        /// which case nothing may be executed.
        pub(crate) fn begin_request(&self) -> bool {
            // SeqCst with `ending` and `is_executing`: a writer that saw the ending and then
            // `executing == false` knows that no request will start after it looked.
            self.executing.store(true, Ordering::SeqCst);
            if self.ending() == Ending::Open {
                return true;
            }
            self.end_request();
            false
        }

        /// Marks the end of a request, after its reply was queued.
        pub(crate) fn end_request(&self) {
            self.executing.store(false, Ordering::SeqCst);
        }

        pub(crate) fn is_executing(&self) -> bool {
            self.executing.load(Ordering::SeqCst)
        }

        /// Records why the session ends; the first reason wins.
        fn end(&self, why: Ending) {
            let _ = self
                .ending
                .compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst);
            self.wake_writer();
            self.wake_waiters();
        }
    }

    /// Counts for `/topics`, `/stats` and `/metrics`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct TopicStats {
        pub(crate) name: String,
        pub(crate) messages: u64,
        pub(crate) subscribers: usize,
        /// Events queued for its subscribers, ever.
        pub(crate) delivered: u64,
    }

    /// What `/metrics` reports of the broker.
    #[derive(Debug)]
    pub(crate) struct Snapshot {
        pub(crate) topics: usize,
        pub(crate) subscriptions: usize,
        /// Messages published and events queued for subscribers since start, deleted topics
        /// included.
        pub(crate) published: u64,
        pub(crate) delivered: u64,
        /// Sessions cut because their queue was full.
        pub(crate) slow_consumer_cuts: u64,
        /// Bytes of event frames the rings hold together.
        pub(crate) retained_bytes: usize,
        /// The first topics by name, at most as many as asked for.
        pub(crate) first_topics: Vec<TopicStats>,
    }

    /// One event in a topic's ring: its number and the exact frame sent live.
    #[derive(Debug, Clone)]
    pub(crate) struct RingEntry {
        pub(crate) seq: u64,
        pub(crate) frame: Utf8Bytes,
        /// Its place among all publishes to all topics (see [`Retention`]).
        order: u64,
        /// Its message id, as a number (0 for none).
        id: u128,
    }

    /// What [`Broker::apply`] did with an event numbered elsewhere.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Applied {
        Delivered,
        /// Its `seq` was applied before.
        Duplicate,
        /// Events between the topic's `last` seq and this one are missing.
        Gap {
            last: u64,
        },
        /// No such topic here, or one of another epoch.
        Unknown,
    }

    /// What [`Broker::mirror`] did.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Mirrored {
        /// The topic was new here.
        Added,
        Unchanged,
        /// This many events were missing and have been delivered.
        CaughtUp(u64),
        /// The topic started again from the cluster's state; its subscribers were told.
        Reset,
    }

    /// What a publish did: the message's `seq`, and whether it was a duplicate of one the
    /// topic still holds (then nothing was published, and `seq` is the original's).
    #[derive(Debug)]
    pub(crate) struct Published {
        pub(crate) seq: u64,
        pub(crate) duplicate: bool,
        /// A subscriber whose queue was half full or more after this event and whose writer
        /// was not blocked on its socket: the publisher waits for it ([`SessionControl::is_behind`]).
        pub(crate) behind: Option<Arc<SessionControl>>,
    }

    /// What a de-duplication record costs against `MAX_RETAINED_BYTES`: the id in the ring
    /// entry and its entry in the topic's id map, with the map's slack.
    pub(crate) const ID_RECORD_BYTES: usize = 48;

    /// What `GET /topics/{name}/messages` shows: the topic's position and ring entries.
    #[derive(Debug)]
    pub(crate) struct History {
        pub(crate) epoch: String,
        pub(crate) last_seq: u64,
        /// The oldest `seq` the ring holds; `last_seq + 1` when it is empty.
        pub(crate) first_seq: u64,
        pub(crate) entries: Vec<RingEntry>,
    }

    /// The one broker, behind one mutex. Critical sections clone `Arc`s, push to `VecDeque`s,
    /// append a number to a pre-serialized frame and `try_send` to bounded queues: nothing
    /// blocks, serializes or does I/O under the lock.
    pub(crate) struct Broker {
        state: Mutex<Registry>,
        /// Publishers waiting for an event numbered elsewhere to be applied here (see
        /// [`Broker::wait_applied`]); a lock of its own, taken only in cluster mode.
        awaited: Mutex<Vec<Awaited>>,
        limits: Limits,
        /// Debug builds only: publishing to this topic panics under the lock (see
        /// [`panic_on_publish_to`](Broker::panic_on_publish_to)).
        #[cfg(debug_assertions)]
        panic_topic: OnceLock<String>,
    }

    /// Everything the broker's lock guards.
    #[derive(Default)]
    struct Registry {
        topics: BTreeMap<Arc<str>, Topic>,
        sessions: HashMap<SessionId, Session>,
        retention: Retention,
        /// The `ts` of the last event published, to any topic.
        last_event_time: Option<SystemTime>,
        closed: bool,
        /// Messages published, deleted topics included.
        published: u64,
        /// The `order` of the last event retained (see [`RingEntry`]).
        ordered: u64,
        delivered: u64,
        slow_consumer_cuts: u64,
    }

    /// What the rings hold together, against `MAX_RETAINED_BYTES`. When a publish takes the
    /// total over the limit, the oldest events of all topics go first, whichever topics hold
    /// them; a ring only ever loses its oldest entry, so its `seq`s stay consecutive.
    #[derive(Default)]
    struct Retention {
        /// Bytes of the frames in all rings.
        bytes: usize,
        /// Every non-empty ring, by the `order` of its oldest entry: the first names the topic
        /// holding the oldest event anywhere. One entry per topic, so it is as small as the
        /// topic map.
        fronts: BTreeMap<u64, Arc<str>>,
    }

    struct Topic {
        /// The key it is filed under, shared with its subscribers' `Session::topics`.
        name: Arc<str>,
        /// Made when the topic is created: a topic deleted and created again numbers its
        /// events afresh, and the new epoch tells resuming clients so.
        epoch: String,
        /// The `seq` of the last event published, which is also how many were ever published
        /// (the first is 1); 0 before any.
        last_seq: u64,
        /// The last `ring_size` events, oldest first; their `seq`s are consecutive and end at
        /// `last_seq`.
        ring: VecDeque<RingEntry>,
        /// The message ids of the ring's events, with their `seq`: a publish of an id held
        /// here is a retry, answered with the original `seq` (the de-duplication window is
        /// the ring).
        ids: HashMap<u128, u64>,
        subscribers: Vec<Subscriber>,
        /// Events queued for subscribers, ever.
        delivered: u64,
    }

    struct Subscriber {
        session: SessionId,
        tx: SyncSender<Outgoing>,
        control: Arc<SessionControl>,
        /// The topic's last `seq` when the subscription began: later events are delivered
        /// live, earlier ones only by replay.
        joined: u64,
    }

    struct Session {
        tx: SyncSender<Outgoing>,
        control: Arc<SessionControl>,
        /// The topics this session is subscribed to: the reverse of `Topic::subscribers`.
        topics: Vec<Arc<str>>,
    }

    /// A publisher waiting in [`Broker::wait_applied`].
    struct Awaited {
        name: String,
        seq: u64,
        thread: Thread,
    }

    /// Writers to wake when dropped.
    #[derive(Default)]
    struct WakeOnDrop(Vec<Arc<SessionControl>>);

    impl Drop for WakeOnDrop {
        fn drop(&mut self) {
            for writer in &self.0 {
                writer.wake_writer();
            }
        }
    }

    impl Broker {
        pub(crate) fn new(limits: Limits) -> Broker {
            Broker {
                state: Mutex::new(Registry::default()),
                awaited: Mutex::default(),
                limits,
                #[cfg(debug_assertions)]
                panic_topic: OnceLock::new(),
            }
        }

        /// A panic elsewhere while holding the lock leaves the state consistent (every mutation
        /// below completes before anything that could panic), so a poisoned lock is used as is.
        fn lock(&self) -> MutexGuard<'_, Registry> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        pub(crate) fn add_topic(&self, name: &str, epoch: String) -> Result<(), BrokerError> {
            let mut state = self.lock();
            if state.topics.contains_key(name) {
                return Err(BrokerError::TopicExists);
            }
            if state.topics.len() >= self.limits.topics {
                return Err(BrokerError::TooManyTopics);
            }
            let name: Arc<str> = name.into();
            state
                .topics
                .insert(Arc::clone(&name), Topic::new(name, epoch));
            Ok(())
        }

        /// Removes a topic (only of that `epoch`, when one is given); each of its subscribers is
        /// told with `notice` and stays connected.
        pub(crate) fn remove_topic(
            &self,
            name: &str,
            epoch: Option<&str>,
            notice: Utf8Bytes,
        ) -> Result<(), BrokerError> {
            let mut state = self.lock();
            let held = state.topics.get(name).map(|topic| topic.epoch.as_str());
            if held.is_none() || epoch.is_some_and(|epoch| held != Some(epoch)) {
                return Err(BrokerError::TopicNotFound);
            }
            let Some(mut topic) = state.topics.remove(name) else {
                return Err(BrokerError::TopicNotFound);
            };
            while topic.drop_oldest(&mut state.retention) {}
            let mut overflowed = Vec::new();
            for subscriber in &topic.subscribers {
                if let Some(session) = state.sessions.get_mut(&subscriber.session) {
                    session.topics.retain(|t| *t != topic.name);
                }
                if subscriber
                    .tx
                    .try_send(Outgoing::text(notice.clone()))
                    .is_err()
                {
                    overflowed.push(subscriber.session);
                }
                subscriber.control.wake_writer();
            }
            for session in overflowed {
                state.cut(session, Ending::SlowConsumer, None);
            }
            drop(state);
            self.wake_awaiting(name, u64::MAX);
            Ok(())
        }

        /// A topic's epoch and last `seq`.
        pub(crate) fn position(&self, name: &str) -> Option<(String, u64)> {
            let state = self.lock();
            let topic = state.topics.get(name)?;
            Some((topic.epoch.clone(), topic.last_seq))
        }

        /// Delivers an event numbered elsewhere (by the cluster's backplane), exactly when it
        /// is the next of its topic: `seq` one above the last, in the same `epoch`.
        pub(crate) fn apply(
            &self,
            name: &str,
            epoch: &str,
            seq: u64,
            frame: Utf8Bytes,
            accepted_us: u32,
        ) -> Applied {
            // Declared before the guard, as in `number_and_queue`.
            let mut wakes = WakeOnDrop::default();
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(topic) = state.topics.get_mut(name) else {
                return Applied::Unknown;
            };
            if topic.epoch != epoch {
                return Applied::Unknown;
            }
            if seq <= topic.last_seq {
                return Applied::Duplicate;
            }
            if seq > topic.last_seq + 1 {
                return Applied::Gap {
                    last: topic.last_seq,
                };
            }
            topic.last_seq = seq;
            let event = RingEntry {
                seq,
                frame,
                order: 0,
                id: 0,
            };
            // After shutdown has begun nothing more is queued; the ring still follows.
            if state.closed {
                state.retain(name, event, &self.limits);
            } else {
                state.deliver(name, event, accepted_us, &self.limits, &mut wakes);
            }
            drop(guard);
            self.wake_awaiting(name, seq);
            Applied::Delivered
        }

        /// Waits, up to `timeout`, until topic `name` of `epoch` has applied `seq`; false if it
        /// has not by then.
        pub(crate) fn wait_applied(
            &self,
            name: &str,
            epoch: &str,
            seq: u64,
            timeout: Duration,
        ) -> bool {
            let applied = || {
                let state = self.lock();
                let topic = state.topics.get(name);
                topic.is_some_and(|topic| topic.epoch != epoch || topic.last_seq >= seq)
            };
            let deadline = Instant::now() + timeout;
            let me = thread::current();
            let awaited = Awaited {
                name: name.to_string(),
                seq,
                thread: me.clone(),
            };
            // Registered before the first look: a wake-up between the look and the park is kept by
            // the thread's token.
            self.awaited
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(awaited);
            let done = loop {
                if applied() {
                    break true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break false;
                }
                thread::park_timeout(left);
            };
            let mut awaited = self.awaited.lock().unwrap_or_else(PoisonError::into_inner);
            awaited.retain(|a| !(a.thread.id() == me.id() && a.seq == seq && a.name == name));
            done
        }

        /// Wakes the publishers waiting for topic `name` up to `seq` (every one of them for
        /// `u64::MAX`), each only when what it waits for may have come.
        fn wake_awaiting(&self, name: &str, seq: u64) {
            let awaited = self.awaited.lock().unwrap_or_else(PoisonError::into_inner);
            for waiter in awaited.iter().filter(|a| a.name == name && a.seq <= seq) {
                waiter.thread.unpark();
            }
        }

        /// Makes topic `name` mirror the cluster's: its `epoch`, its last `seq` and the newest
        /// `entries` the cluster holds (consecutive, ending at `last_seq`; possibly none).
        /// Events the local topic lacks are delivered to its subscribers when the entries reach
        /// back to them. Otherwise (another epoch, or events the cluster no longer holds) each
        /// subscriber is unsubscribed and sent `notice` finished with the last `seq` it was sent,
        /// from where it can resume.
        pub(crate) fn mirror(
            &self,
            name: &str,
            epoch: &str,
            last_seq: u64,
            entries: Vec<(u64, Utf8Bytes)>,
            notice: &Unfinished,
        ) -> Mirrored {
            let mut wakes = WakeOnDrop::default();
            let mut guard = self.lock();
            let state = &mut *guard;
            let held = state
                .topics
                .get(name)
                .map(|t| (t.epoch == epoch, t.last_seq));
            let outcome = match held {
                None => {
                    let name: Arc<str> = name.into();
                    let topic = Topic::new(Arc::clone(&name), epoch.to_string());
                    state.topics.insert(name, topic);
                    Mirrored::Added
                }
                Some((true, last)) if last == last_seq => Mirrored::Unchanged,
                Some((true, last))
                    if last < last_seq
                        && entries.first().is_some_and(|(first, _)| *first <= last + 1) =>
                {
                    Mirrored::CaughtUp(last_seq - last)
                }
                Some(_) => {
                    state.unsubscribe_all(name, notice);
                    let name: Arc<str> = name.into();
                    if let Some(mut old) = state.topics.remove(&name) {
                        while old.drop_oldest(&mut state.retention) {}
                    }
                    let topic = Topic::new(Arc::clone(&name), epoch.to_string());
                    state.topics.insert(name, topic);
                    Mirrored::Reset
                }
            };
            let catching_up = matches!(outcome, Mirrored::CaughtUp(_));
            for (seq, frame) in entries {
                let Some(topic) = state.topics.get_mut(name) else {
                    break;
                };
                if seq <= topic.last_seq {
                    continue;
                }
                topic.last_seq = seq;
                let event = RingEntry {
                    seq,
                    frame,
                    order: 0,
                    id: 0,
                };
                if catching_up && !state.closed {
                    state.deliver(name, event, 0, &self.limits, &mut wakes);
                } else {
                    state.retain(name, event, &self.limits);
                }
            }
            if let Some(topic) = state.topics.get_mut(name) {
                topic.last_seq = topic.last_seq.max(last_seq);
            }
            state.enforce_retention(self.limits.retained_bytes);
            drop(guard);
            self.wake_awaiting(name, u64::MAX);
            outcome
        }

        pub(crate) fn topic_stats(&self) -> Vec<TopicStats> {
            self.lock().topics.values().map(Topic::stats).collect()
        }

        pub(crate) fn snapshot(&self, max_topics: usize) -> Snapshot {
            let state = self.lock();
            Snapshot {
                topics: state.topics.len(),
                subscriptions: state.topics.values().map(|t| t.subscribers.len()).sum(),
                published: state.published,
                delivered: state.delivered,
                slow_consumer_cuts: state.slow_consumer_cuts,
                retained_bytes: state.retention.bytes,
                first_topics: state
                    .topics
                    .values()
                    .take(max_topics)
                    .map(Topic::stats)
                    .collect(),
            }
        }

        /// (topics, active subscriptions) for `/health`.
        pub(crate) fn totals(&self) -> (usize, usize) {
            let state = self.lock();
            let subscriptions = state.topics.values().map(|t| t.subscribers.len()).sum();
            (state.topics.len(), subscriptions)
        }

        /// The ring entries with a `seq` above `after` (all of them for 0), newest `last_n` at
        /// most.
        pub(crate) fn history(
            &self,
            name: &str,
            after: u64,
            last_n: usize,
        ) -> Result<History, BrokerError> {
            let state = self.lock();
            let topic = state.topics.get(name).ok_or(BrokerError::TopicNotFound)?;
            let newer = topic.ring.iter().filter(|entry| entry.seq > after).count();
            let entries = topic
                .ring
                .iter()
                .skip(topic.ring.len() - newer.min(last_n))
                .cloned()
                .collect();
            Ok(History {
                epoch: topic.epoch.clone(),
                last_seq: topic.last_seq,
                first_seq: topic.ring.front().map_or(topic.last_seq + 1, |e| e.seq),
                entries,
            })
        }

        /// Registers a new WebSocket session and its queue. During shutdown the session is told
        /// to end at once.
        pub(crate) fn open_session(
            &self,
            id: SessionId,
            tx: SyncSender<Outgoing>,
            control: Arc<SessionControl>,
        ) {
            let mut state = self.lock();
            if state.closed {
                control.end(Ending::ShuttingDown);
                let _ = tx.try_send(Outgoing::Wake);
            }
            state.sessions.insert(
                id,
                Session {
                    tx,
                    control,
                    topics: Vec::new(),
                },
            );
        }

        /// Forgets a session and all its subscriptions.
        pub(crate) fn close_session(&self, id: SessionId) {
            self.lock().remove_session(id);
        }

        /// Subscribes a session and queues its ack, finished with the topic's position,
        /// followed by the replayed events, as one item built under the lock: the caller puts it
        /// in the place it reserved in the session's queue before the call, ahead of every live
        /// event of the new subscription, so replay and live delivery neither overlap nor leave
        /// a gap. Subscribing again adds no subscription: its ack replays, on a resume, the
        /// events after the client's position that came before live delivery began.
        pub(crate) fn subscribe(
            &self,
            id: SessionId,
            name: &str,
            ack: &Unfinished,
            replay: &Replay,
        ) -> Result<Outgoing, BrokerError> {
            let mut guard = self.lock();
            let state = &mut *guard;
            if state.closed {
                return Err(BrokerError::Closed);
            }
            let topic = state
                .topics
                .get_mut(name)
                .ok_or(BrokerError::TopicNotFound)?;
            let Some(session) = state.sessions.get_mut(&id) else {
                return Err(BrokerError::SessionEnded);
            };
            let joined = topic.subscribers.iter().find(|s| s.session == id);
            let (replayed, recovered) = match joined.map(|s| s.joined) {
                Some(joined) => match replay {
                    Replay::LastN(_) => (Vec::new(), None),
                    Replay::Since { .. } => topic.replay(replay, joined),
                },
                None => {
                    topic.subscribers.push(Subscriber {
                        session: id,
                        tx: session.tx.clone(),
                        control: Arc::clone(&session.control),
                        joined: topic.last_seq,
                    });
                    session.topics.push(Arc::clone(&topic.name));
                    topic.replay(replay, topic.last_seq)
                }
            };
            let ack = ack.with_position(&topic.epoch, topic.last_seq, recovered);
            Ok(if replayed.is_empty() {
                Outgoing::text(ack)
            } else {
                let frames = std::iter::once(ack).chain(replayed).collect();
                Outgoing::Reply(Box::new(Reply::Batch(frames)))
            })
        }

        /// Unsubscribes a session; not being subscribed is fine.
        pub(crate) fn unsubscribe(&self, id: SessionId, name: &str) -> Result<(), BrokerError> {
            let mut state = self.lock();
            if state.closed {
                return Err(BrokerError::Closed);
            }
            let topic = state
                .topics
                .get_mut(name)
                .ok_or(BrokerError::TopicNotFound)?;
            topic.subscribers.retain(|s| s.session != id);
            if let Some(session) = state.sessions.get_mut(&id) {
                session.topics.retain(|t| &**t != name);
            }
            Ok(())
        }

        /// Numbers an event, appends it to the topic's ring and queues it for every
        /// subscriber, without waiting for any: a subscriber whose queue is full is cut as a
        /// slow consumer. Returns the event's `seq`, and a subscriber whose writer is behind.
        /// `id` is the message id as a number (0 for none); `accepted_us` when the publish was
        /// accepted ([`Shared::clock_us`](crate::state::Shared::clock_us)).
        pub(crate) fn number_and_queue(
            &self,
            name: &str,
            id: u128,
            event: &Unfinished,
            accepted_us: u32,
        ) -> Result<Published, BrokerError> {
            #[cfg(debug_assertions)]
            if self.panic_topic.get().is_some_and(|topic| topic == name) {
                self.panic_under_lock();
            }
            // Declared before the guard, so dropped after it: writers are woken once the lock is
            // released (each wake-up is a system call that may hand the CPU to the writer it
            // wakes), and also if anything below panics.
            let mut wakes = WakeOnDrop::default();
            let mut guard = self.lock();
            if guard.closed {
                return Err(BrokerError::Closed);
            }
            let state = &mut *guard;
            let topic = state
                .topics
                .get_mut(name)
                .ok_or(BrokerError::TopicNotFound)?;
            if let Some(&seq) = topic.ids.get(&id) {
                return Ok(Published {
                    seq,
                    duplicate: true,
                    behind: None,
                });
            }
            topic.last_seq += 1;
            let seq = topic.last_seq;
            // A clock stepped back must not make `ts` go backwards along the seqs.
            let time = SystemTime::now().max(state.last_event_time.unwrap_or(UNIX_EPOCH));
            state.last_event_time = Some(time);
            let frame = event.with_time_and_seq(time, seq);
            let event = RingEntry {
                seq,
                frame,
                order: 0,
                id,
            };
            let behind = state.deliver(name, event, accepted_us, &self.limits, &mut wakes);
            Ok(Published {
                seq,
                duplicate: false,
                behind,
            })
        }

        /// Test hook (debug builds only): publishing to `topic` panics while holding the lock,
        /// to show that a panic in one connection neither poisons the broker for good nor stops
        /// the server.
        #[cfg(debug_assertions)]
        pub(crate) fn panic_on_publish_to(&self, topic: String) {
            let _ = self.panic_topic.set(topic);
        }

        #[cfg(debug_assertions)]
        fn panic_under_lock(&self) {
            let _state = self.lock();
            panic!("test hook: panic under the broker lock");
        }

        /// Refuses new operations from now on and tells every session to flush and close.
        pub(crate) fn shutdown(&self) {
            let mut state = self.lock();
            state.closed = true;
            for session in state.sessions.values() {
                session.control.end(Ending::ShuttingDown);
                // A full queue needs no wake-up: its writer is busy and checks after draining.
                let _ = session.tx.try_send(Outgoing::Wake);
            }
        }
    }

    impl Topic {
        fn new(name: Arc<str>, epoch: String) -> Topic {
            Topic {
                name,
                epoch,
                last_seq: 0,
                ring: VecDeque::new(),
                ids: HashMap::new(),
                subscribers: Vec::new(),
                delivered: 0,
            }
        }

        /// Appends an event to the ring, dropping its oldest beyond `ring_size`.
        fn retain(&mut self, entry: RingEntry, ring_size: usize, retention: &mut Retention) {
            if ring_size == 0 {
                return;
            }
            if self.ring.len() >= ring_size {
                self.drop_oldest(retention);
            }
            if self.ring.is_empty() {
                retention.fronts.insert(entry.order, Arc::clone(&self.name));
            }
            retention.bytes += entry.frame.len() + ID_RECORD_BYTES;
            if entry.id != 0 {
                self.ids.insert(entry.id, entry.seq);
            }
            self.ring.push_back(entry);
        }

        /// Drops the ring's oldest entry; false when it was empty.
        fn drop_oldest(&mut self, retention: &mut Retention) -> bool {
            let Some(oldest) = self.ring.pop_front() else {
                return false;
            };
            retention.bytes = retention
                .bytes
                .saturating_sub(oldest.frame.len() + ID_RECORD_BYTES);
            retention.fronts.remove(&oldest.order);
            self.ids.remove(&oldest.id);
            if let Some(next) = self.ring.front() {
                retention.fronts.insert(next.order, Arc::clone(&self.name));
            }
            true
        }

        fn stats(&self) -> TopicStats {
            TopicStats {
                name: self.name.to_string(),
                messages: self.last_seq,
                subscribers: self.subscribers.len(),
                delivered: self.delivered,
            }
        }

        /// The ring entries a subscription replays, up to `upto` (where its live delivery
        /// begins), and for a resume whether it recovered everything after the client's
        /// position.
        fn replay(&self, replay: &Replay, upto: u64) -> (Vec<Utf8Bytes>, Option<bool>) {
            let first_held = self.ring.front().map_or(self.last_seq + 1, |e| e.seq);
            // The ring's seqs are consecutive, so the entries from `from` up to `upto` are one
            // run of it, found by subtraction.
            let held = |from: u64| -> Vec<Utf8Bytes> {
                let index = |seq: u64| {
                    usize::try_from(seq.saturating_sub(first_held))
                        .unwrap_or(usize::MAX)
                        .min(self.ring.len())
                };
                let (start, end) = (index(from), index(upto.saturating_add(1)));
                self.ring
                    .range(start.min(end)..end)
                    .map(|e| e.frame.clone())
                    .collect()
            };
            match replay {
                Replay::LastN(n) => {
                    let n = usize::try_from(*n).unwrap_or(usize::MAX);
                    let mut frames = held(first_held);
                    frames.drain(..frames.len().saturating_sub(n));
                    (frames, None)
                }
                Replay::Since { seq, epoch } => {
                    if *epoch != self.epoch || *seq > self.last_seq {
                        (Vec::new(), Some(false))
                    } else if *seq >= upto {
                        (Vec::new(), Some(true))
                    } else if *seq + 1 >= first_held {
                        (held(*seq + 1), Some(true))
                    } else {
                        (Vec::new(), Some(false))
                    }
                }
            }
        }
    }

    impl Registry {
        /// Appends an event to its topic's ring without delivering it: history the cluster
        /// holds, mirrored.
        fn retain(&mut self, name: &str, mut event: RingEntry, limits: &Limits) {
            let Some(topic) = self.topics.get_mut(name) else {
                return;
            };
            self.ordered += 1;
            event.order = self.ordered;
            topic.retain(event, limits.ring_size, &mut self.retention);
        }

        /// Unsubscribes every subscriber of topic `name`, each told with `notice` finished with
        /// the topic's last `seq`: the last event it was sent.
        fn unsubscribe_all(&mut self, name: &str, notice: &Unfinished) {
            let Some(topic) = self.topics.get_mut(name) else {
                return;
            };
            let frame = notice.with_seq(topic.last_seq);
            let mut overflowed = Vec::new();
            for subscriber in topic.subscribers.drain(..) {
                if let Some(session) = self.sessions.get_mut(&subscriber.session) {
                    session.topics.retain(|t| &**t != name);
                }
                let notice = Outgoing::text(frame.clone());
                if subscriber.tx.try_send(notice).is_err() {
                    overflowed.push(subscriber.session);
                }
                subscriber.control.wake_writer();
            }
            for session in overflowed {
                self.cut(session, Ending::SlowConsumer, None);
            }
        }

        /// Appends `event`, numbered by the caller as its topic's new last `seq`, to the ring
        /// and queues it for every subscriber, without waiting for any: a subscriber whose
        /// queue is full is cut as a slow consumer. Returns a subscriber whose writer is behind
        /// ([`SessionControl::is_behind`]); the writers to wake go to `wakes`.
        fn deliver(
            &mut self,
            name: &str,
            mut event: RingEntry,
            accepted_us: u32,
            limits: &Limits,
            wakes: &mut WakeOnDrop,
        ) -> Option<Arc<SessionControl>> {
            let topic = self.topics.get_mut(name)?;
            let seq = event.seq;
            self.published += 1;
            self.ordered += 1;
            event.order = self.ordered;
            let live = Arc::new(LiveEvent {
                frame: event.frame.clone(),
                accepted_us,
            });
            topic.retain(event, limits.ring_size, &mut self.retention);
            let mut overflowed = Vec::new();
            let mut behind = None;
            for subscriber in &topic.subscribers {
                let control = &subscriber.control;
                let queued = control.count_queued();
                if queued == control.wake_at {
                    // Half the queue: a lingering writer must not linger on.
                    wakes.0.push(Arc::clone(control));
                }
                if queued >= control.wake_at && behind.is_none() && control.is_behind() {
                    behind = Some(Arc::clone(control));
                }
                match subscriber.tx.try_send(Outgoing::Event(Arc::clone(&live))) {
                    Ok(()) => {
                        topic.delivered += 1;
                        if control.take_asleep() {
                            wakes.0.push(Arc::clone(control));
                        }
                    }
                    Err(TrySendError::Full(_)) => {
                        overflowed.push((subscriber.session, Ending::SlowConsumer))
                    }
                    // Its writer is gone and its reader will close the session: drop it now.
                    Err(TrySendError::Disconnected(_)) => {
                        overflowed.push((subscriber.session, Ending::Open))
                    }
                }
            }
            let name = Arc::clone(&topic.name);
            let delivered = topic.subscribers.len() - overflowed.len();
            self.delivered += delivered as u64;
            for (session, why) in overflowed {
                self.cut(session, why, Some((Arc::clone(&name), seq - 1)));
            }
            self.enforce_retention(limits.retained_bytes);
            behind
        }

        /// Drops the oldest events of all topics until the rings hold `limit` bytes at most.
        fn enforce_retention(&mut self, limit: usize) {
            while self.retention.bytes > limit {
                let Some((&order, name)) = self.retention.fronts.first_key_value() else {
                    return;
                };
                let dropped = match self.topics.get_mut(name) {
                    Some(topic) => topic.drop_oldest(&mut self.retention),
                    None => false,
                };
                if !dropped {
                    // Cannot happen (a deleted topic leaves the index); never loop on it.
                    self.retention.fronts.remove(&order);
                }
            }
        }

        /// Removes a session from every topic and records why; its queue is dropped, so
        /// nothing more is queued for it.
        fn cut(&mut self, id: SessionId, why: Ending, position: Option<(Arc<str>, u64)>) {
            if let Some(session) = self.remove_session(id) {
                if why == Ending::SlowConsumer {
                    self.slow_consumer_cuts += 1;
                }
                if why != Ending::Open {
                    if let Some(position) = position {
                        let _ = session.control.cut_position.set(position);
                    }
                    session.control.end(why);
                }
            }
        }

        fn remove_session(&mut self, id: SessionId) -> Option<Session> {
            let session = self.sessions.remove(&id)?;
            for name in &session.topics {
                if let Some(topic) = self.topics.get_mut(name) {
                    topic.subscribers.retain(|s| s.session != id);
                }
            }
            Some(session)
        }
    }

    /// A topic's epoch: 16 random hexadecimal digits, new for every topic created.
    pub(crate) fn new_epoch() -> String {
        let mut epoch = uuid::Uuid::new_v4().simple().to_string();
        epoch.truncate(16);
        epoch
    }

    #[cfg(test)]
    mod tests {
        use super::super::broker;
        use super::*;
        use std::sync::mpsc::{self, Receiver};

        /// A broker with one session whose queue holds `queue_size` items, and a topic `t` of
        /// epoch `E`.
        fn broker_with_session(
            ring_size: usize,
            queue_size: usize,
        ) -> (Broker, Receiver<Outgoing>, Arc<SessionControl>) {
            broker_with_limits(
                broker::Limits {
                    ring_size,
                    retained_bytes: usize::MAX,
                    topics: usize::MAX,
                },
                queue_size,
            )
        }

        fn broker_with_limits(
            limits: broker::Limits,
            queue_size: usize,
        ) -> (Broker, Receiver<Outgoing>, Arc<SessionControl>) {
            let broker = Broker::new(limits);
            let (tx, rx) = mpsc::sync_channel(queue_size);
            let control = Arc::new(SessionControl::new(queue_size));
            broker.open_session(1, tx, Arc::clone(&control));
            broker.add_topic("t", "E".to_string()).unwrap();
            (broker, rx, control)
        }

        /// A stand-in for a serialized message: `{"m":"NAME"` waiting for the broker's fields.
        fn unfinished(name: &str) -> Unfinished {
            Unfinished(format!(r#"{{"m":"{name}""#))
        }

        /// Publishes a message without an id (never a duplicate); its `seq`.
        fn publish_event(broker: &Broker, topic: &str, name: &str) -> Result<u64, BrokerError> {
            broker
                .number_and_queue(topic, 0, &unfinished(name), 0)
                .map(|published| published.seq)
        }

        /// A message id published again while the ring holds it gets the original seq and
        /// publishes nothing; once it has left the ring it is new again.
        #[test]
        fn a_retried_id_is_answered_with_its_original_seq() {
            let (broker, rx, _) = broker_with_session(2, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let publish_id = |topic, id| {
                let published = broker
                    .number_and_queue(topic, id, &unfinished("e"), 0)
                    .unwrap();
                (published.seq, published.duplicate)
            };
            let new = |seq| (seq, false);
            let again = |seq| (seq, true);
            assert_eq!(publish_id("t", 7), new(1));
            assert_eq!(publish_id("t", 7), again(1));
            assert_eq!(publish_id("t", 8), new(2));
            assert_eq!(publish_id("t", 7), again(1));
            assert_eq!(
                (next(&rx), next(&rx)),
                (
                    vec![r#"{"m":"e","seq":1}"#.to_string()],
                    vec![r#"{"m":"e","seq":2}"#.to_string()]
                )
            );
            assert!(rx.try_recv().is_err(), "a duplicate publishes nothing");
            // Seq 1 leaves the ring of two: id 7 is new again.
            assert_eq!(publish_id("t", 9), new(3));
            assert_eq!(publish_id("t", 7), new(4));
            broker.add_topic("u", "F".to_string()).unwrap();
            assert_eq!(publish_id("u", 7), new(1), "ids are per topic");
        }

        /// Runs `linger` for at most `time` on another thread, does `meanwhile`, and returns how
        /// long the linger lasted.
        fn linger_while(
            control: &Arc<SessionControl>,
            time: Duration,
            meanwhile: impl FnOnce(),
        ) -> Duration {
            let (started_tx, started_rx) = mpsc::channel();
            let lingering = Arc::clone(control);
            let writer = thread::spawn(move || {
                lingering.register_writer(thread::current());
                let start = Instant::now();
                started_tx.send(()).unwrap();
                lingering.linger(time);
                start.elapsed()
            });
            started_rx.recv().unwrap();
            meanwhile();
            writer.join().unwrap()
        }

        /// A writer lingering after a batch wakes as soon as half its queue is used, long before
        /// its linger ends, so that a reader that keeps up is not cut while its writer sleeps.
        #[test]
        fn a_lingering_writer_wakes_when_its_queue_is_half_full() {
            let (broker, rx, control) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let lingered = linger_while(&control, Duration::from_secs(10), || {
                for _ in 0..5 {
                    publish_event(&broker, "t", "e").unwrap();
                }
            });
            assert!(lingered < Duration::from_secs(5), "lingered {lingered:?}");
            assert_eq!(rx.try_iter().count(), 5);
        }

        /// A publish names a subscriber whose writer has half its queue waiting and is not inside
        /// a socket write, for the publisher to wait for; a writer blocked on its socket (a client
        /// that does not read) is never waited for.
        #[test]
        fn a_publish_names_a_writer_behind_but_not_one_blocked_on_its_socket() {
            let (broker, _rx, control) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let behind = || {
                let published = broker
                    .number_and_queue("t", 0, &unfinished("e"), 0)
                    .unwrap();
                published.behind.is_some()
            };
            assert_eq!([behind(), behind(), behind(), behind()], [false; 4]);
            assert!(behind(), "the fifth event fills half the queue of ten");
            control.set_in_write(true);
            assert!(!behind(), "blocked on its socket");
            control.set_in_write(false);
            control.count_written(6);
            assert!(!behind(), "caught up");
        }

        /// A broker whose session 1 subscribes to `t` with a queue of ten, five events queued.
        fn half_full_queue() -> (Broker, Receiver<Outgoing>, Arc<SessionControl>) {
            let (broker, rx, control) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            for _ in 0..5 {
                publish_event(&broker, "t", "e").unwrap();
            }
            (broker, rx, control)
        }

        /// A publisher waiting for a writer that is behind wakes as soon as the writer catches up
        /// or enters a socket write, long before its limit.
        #[test]
        fn a_publisher_waits_for_a_writer_behind_only_until_it_catches_up_or_blocks() {
            let (_broker, _rx, control) = half_full_queue();
            assert!(control.is_behind());
            let wait = |progress: fn(&SessionControl)| {
                let writer = Arc::clone(&control);
                let progressed = thread::spawn(move || {
                    thread::sleep(Duration::from_millis(20));
                    progress(&writer);
                });
                let start = Instant::now();
                control.wait_until_caught_up(Duration::from_secs(10));
                progressed.join().unwrap();
                start.elapsed()
            };
            let waited = wait(|writer| writer.set_in_write(true));
            assert!(waited < Duration::from_secs(5), "waited {waited:?}");
            control.set_in_write(false);
            let waited = wait(|writer| writer.count_written(5));
            assert!(waited < Duration::from_secs(5), "waited {waited:?}");
            assert!(!control.is_behind());
        }

        /// A writer asleep on its empty queue is woken by the publish that queues an event for it
        /// (after the broker's lock is released), not by its heartbeat.
        #[test]
        fn a_publish_wakes_a_writer_asleep_on_its_queue() {
            let (broker, rx, control) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let (started_tx, started_rx) = mpsc::channel();
            let writer = Arc::clone(&control);
            let sleeper = thread::spawn(move || {
                writer.register_writer(thread::current());
                writer.set_asleep(true);
                let start = Instant::now();
                started_tx.send(()).unwrap();
                thread::park_timeout(Duration::from_secs(10));
                start.elapsed()
            });
            started_rx.recv().unwrap();
            publish_event(&broker, "t", "e").unwrap();
            let slept = sleeper.join().unwrap();
            assert!(slept < Duration::from_secs(5), "slept {slept:?}");
            assert_eq!(rx.try_iter().count(), 1);
        }

        /// A reply to the client's own request ends a linger at once: events wait for the
        /// linger's batch, replies never do.
        #[test]
        fn a_reply_ends_a_linger() {
            let (_broker, _rx, control) = broker_with_session(10, 10);
            let replied = Arc::clone(&control);
            let lingered = linger_while(&control, Duration::from_secs(10), move || {
                thread::sleep(Duration::from_millis(20));
                replied.wake_for_reply();
            });
            assert!(lingered < Duration::from_secs(5), "lingered {lingered:?}");
        }

        /// The end of a session, a slow-consumer cut or shutdown, ends a linger at once.
        #[test]
        fn a_lingering_writer_wakes_when_its_session_ends() {
            let (broker, _rx, control) = broker_with_session(10, 10);
            let lingered = linger_while(&control, Duration::from_secs(10), || broker.shutdown());
            assert!(lingered < Duration::from_secs(5), "lingered {lingered:?}");
        }

        /// A writer whose queue is already half full does not linger at all.
        #[test]
        fn a_writer_does_not_linger_behind_a_half_full_queue() {
            let (_broker, _rx, control) = half_full_queue();
            let start = Instant::now();
            control.linger(Duration::from_secs(10));
            assert!(start.elapsed() < Duration::from_secs(5));
            // Once the writer has written them, it lingers its whole time again.
            control.count_written(5);
            let start = Instant::now();
            control.linger(Duration::from_millis(50));
            assert!(start.elapsed() >= Duration::from_millis(50));
        }

        /// Subscribes session 1 to `t`; the frames of its ack and replay.
        fn subscribe(broker: &Broker, replay: Replay) -> Result<Vec<String>, BrokerError> {
            broker
                .subscribe(1, "t", &unfinished("ack"), &replay)
                .map(frames)
        }

        /// The next queued item's frames, or what else it is.
        fn next(rx: &Receiver<Outgoing>) -> Vec<String> {
            match rx.try_recv() {
                Ok(item) => frames(item),
                other => vec![format!("{other:?}")],
            }
        }

        /// An item's frames, each without the `ts` the broker stamps on events.
        fn frames(item: Outgoing) -> Vec<String> {
            let untimed = |frame: &Utf8Bytes| -> String {
                let frame = frame.as_str();
                match frame.find(r#","ts":""#) {
                    Some(start) => {
                        let value = start + r#","ts":""#.len();
                        let end = value + frame[value..].find('"').unwrap() + 1;
                        format!("{}{}", &frame[..start], &frame[end..])
                    }
                    None => frame.to_string(),
                }
            };
            match item {
                Outgoing::Event(event) => vec![untimed(&event.frame)],
                Outgoing::Reply(reply) => match *reply {
                    Reply::Text(frame) => vec![untimed(&frame)],
                    Reply::Batch(frames) => frames.iter().map(untimed).collect(),
                    other => vec![format!("{other:?}")],
                },
                other => vec![format!("{other:?}")],
            }
        }

        #[test]
        fn events_are_numbered_and_acks_carry_the_position() {
            let (broker, rx, _) = broker_with_session(3, 10);
            assert_eq!(publish_event(&broker, "t", "e1"), Ok(1));
            assert_eq!(publish_event(&broker, "t", "e2"), Ok(2));
            assert_eq!(
                subscribe(&broker, Replay::LastN(0)).unwrap(),
                [r#"{"m":"ack","epoch":"E","seq":2}"#]
            );
            assert_eq!(publish_event(&broker, "t", "e3"), Ok(3));
            assert_eq!(next(&rx), [r#"{"m":"e3","seq":3}"#]);
            assert_eq!(
                publish_event(&broker, "nope", "e"),
                Err(BrokerError::TopicNotFound)
            );
        }

        #[test]
        fn subscribe_builds_ack_and_replay_as_one_item() {
            let (broker, rx, _) = broker_with_session(3, 10);
            for n in 1..=5 {
                publish_event(&broker, "t", &format!("e{n}")).unwrap();
            }
            assert_eq!(
                subscribe(&broker, Replay::LastN(10)).unwrap(),
                [
                    r#"{"m":"ack","epoch":"E","seq":5}"#,
                    r#"{"m":"e3","seq":3}"#,
                    r#"{"m":"e4","seq":4}"#,
                    r#"{"m":"e5","seq":5}"#
                ]
            );
            publish_event(&broker, "t", "e6").unwrap();
            assert_eq!(next(&rx), [r#"{"m":"e6","seq":6}"#]);
            // Subscribing again: the ack only, no replay, no second copy of later events.
            assert_eq!(
                subscribe(&broker, Replay::LastN(10)).unwrap(),
                [r#"{"m":"ack","epoch":"E","seq":6}"#]
            );
            publish_event(&broker, "t", "e7").unwrap();
            assert_eq!(next(&rx), [r#"{"m":"e7","seq":7}"#]);
            // Again with a resume point: the events after it that came before live delivery
            // began (6 and 7 came live), while the ring (5 to 7) holds them.
            let since = |seq| Replay::Since {
                seq,
                epoch: "E".to_string(),
            };
            assert_eq!(
                subscribe(&broker, since(4)).unwrap(),
                [
                    r#"{"m":"ack","epoch":"E","seq":7,"recovered":true}"#,
                    r#"{"m":"e5","seq":5}"#
                ]
            );
            assert_eq!(
                subscribe(&broker, since(3)).unwrap(),
                [r#"{"m":"ack","epoch":"E","seq":7,"recovered":false}"#]
            );
            assert_eq!(
                subscribe(&broker, since(6)).unwrap(),
                [r#"{"m":"ack","epoch":"E","seq":7,"recovered":true}"#]
            );
            assert!(rx.try_recv().is_err());
            assert_eq!(broker.topic_stats()[0].messages, 7);
        }

        #[test]
        fn resume_replays_exactly_what_was_missed_or_says_it_cannot() {
            // (since_seq, epoch, recovered, events replayed); the topic holds events 1 to 5 of
            // epoch E, and its ring the last 3.
            let cases = [
                (3, "E", true, 2),
                (5, "E", true, 0),
                (2, "E", true, 3),
                // The ring no longer reaches back to event 2.
                (1, "E", false, 0),
                // Ahead of the topic, or of another epoch: nothing can be trusted.
                (6, "E", false, 0),
                (4, "X", false, 0),
            ];
            for (seq, epoch, recovered, replayed) in cases {
                let replay = Replay::Since {
                    seq,
                    epoch: epoch.to_string(),
                };
                let ack = format!(r#"{{"m":"ack","epoch":"E","seq":5,"recovered":{recovered}}}"#);
                let (broker, _, _) = broker_with_session(3, 10);
                for n in 1..=5 {
                    publish_event(&broker, "t", &format!("e{n}")).unwrap();
                }
                let frames = subscribe(&broker, replay.clone()).unwrap();
                assert_eq!(frames[0], ack, "{replay:?}");
                let expected: Vec<String> = (6 - replayed..=5)
                    .map(|n| format!(r#"{{"m":"e{n}","seq":{n}}}"#))
                    .collect();
                assert_eq!(frames[1..], expected, "{replay:?}");
            }
        }

        #[test]
        fn a_full_queue_cuts_the_session_from_every_topic() {
            let (broker, rx, control) = broker_with_session(0, 1);
            broker.add_topic("u", "F".to_string()).unwrap();
            subscribe(&broker, Replay::LastN(0)).unwrap();
            broker
                .subscribe(1, "u", &unfinished("ack"), &Replay::LastN(0))
                .unwrap();
            assert_eq!(broker.totals(), (2, 2));
            publish_event(&broker, "t", "e1").unwrap();
            publish_event(&broker, "t", "e2").unwrap();
            assert_eq!(control.ending(), Ending::SlowConsumer);
            assert_eq!(control.cut_position(), Some(("t", 1)));
            assert_eq!(broker.totals(), (2, 0));
            publish_event(&broker, "u", "e3").unwrap();
            assert_eq!(next(&rx), [r#"{"m":"e1","seq":1}"#]);
            assert!(rx.try_recv().is_err(), "nothing is queued after the cut");
        }

        #[test]
        fn deleting_a_topic_notifies_and_unsubscribes() {
            let (broker, rx, control) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            broker.remove_topic("t", None, "gone".into()).unwrap();
            assert_eq!(next(&rx), ["gone"]);
            assert_eq!(broker.totals(), (0, 0));
            assert_eq!(control.ending(), Ending::Open);
            assert_eq!(
                publish_event(&broker, "t", "x"),
                Err(BrokerError::TopicNotFound)
            );
            assert_eq!(
                broker.remove_topic("t", None, "gone".into()),
                Err(BrokerError::TopicNotFound)
            );
        }

        #[test]
        fn history_returns_the_ring_after_a_position() {
            let (broker, _, _) = broker_with_session(3, 10);
            for n in 1..=5 {
                publish_event(&broker, "t", &format!("e{n}")).unwrap();
            }
            let seqs = |after, last_n| -> Vec<u64> {
                broker
                    .history("t", after, last_n)
                    .unwrap()
                    .entries
                    .iter()
                    .map(|e| e.seq)
                    .collect()
            };
            assert_eq!(seqs(0, usize::MAX), [3, 4, 5]);
            assert_eq!(seqs(0, 2), [4, 5]);
            assert_eq!(seqs(4, usize::MAX), [5]);
            assert_eq!(seqs(5, usize::MAX), Vec::<u64>::new());
            let history = broker.history("t", 0, 0).unwrap();
            assert_eq!((history.epoch.as_str(), history.last_seq), ("E", 5));
        }

        /// The rings together stay within the retained-bytes limit by dropping the oldest events
        /// of all topics first; each ring keeps consecutive seqs ending at its last.
        #[test]
        fn retained_bytes_drop_the_oldest_events_of_all_topics() {
            // Every frame of `unfinished("eN")` finished with a one-digit seq is 15 bytes.
            let frame = publish_frame_len();
            let (broker, _, _) = broker_with_limits(
                broker::Limits {
                    ring_size: 100,
                    retained_bytes: 5 * frame,
                    topics: 10,
                },
                10,
            );
            broker.add_topic("u", "F".to_string()).unwrap();
            for topic in ["t", "u", "t", "u", "t", "u", "t"] {
                publish_event(&broker, topic, "e").unwrap();
            }
            let seqs = |name| -> Vec<u64> {
                let history = broker.history(name, 0, usize::MAX).unwrap();
                history.entries.iter().map(|e| e.seq).collect()
            };
            // Seven publishes, room for five: t's 1 and u's 1 went, in publish order.
            assert_eq!(seqs("t"), [2, 3, 4]);
            assert_eq!(seqs("u"), [2, 3]);
            assert_eq!(broker.snapshot(0).retained_bytes, 5 * frame);
            broker.remove_topic("u", None, "gone".into()).unwrap();
            assert_eq!(broker.snapshot(0).retained_bytes, 3 * frame);
            // A message larger than the whole limit is delivered but kept nowhere.
            let huge = "x".repeat(6 * frame);
            publish_event(&broker, "t", &huge).unwrap();
            assert_eq!(seqs("t"), Vec::<u64>::new());
            assert_eq!(broker.snapshot(0).retained_bytes, 0);
            publish_event(&broker, "t", "e").unwrap();
            assert_eq!(seqs("t"), [6]);
        }

        fn publish_frame_len() -> usize {
            unfinished("e")
                .with_time_and_seq(SystemTime::UNIX_EPOCH, 1)
                .len()
                + broker::ID_RECORD_BYTES
        }

        #[test]
        fn topics_beyond_the_limit_are_refused() {
            let (broker, _, _) = broker_with_limits(
                broker::Limits {
                    ring_size: 1,
                    retained_bytes: 1,
                    topics: 2,
                },
                1,
            );
            broker.add_topic("u", "F".to_string()).unwrap();
            assert_eq!(
                broker.add_topic("v", "G".to_string()),
                Err(BrokerError::TooManyTopics)
            );
            assert_eq!(
                broker.add_topic("t", "G".to_string()),
                Err(BrokerError::TopicExists)
            );
            broker.remove_topic("u", None, "gone".into()).unwrap();
            broker.add_topic("v", "G".to_string()).unwrap();
        }

        /// Events numbered elsewhere are delivered exactly when they are the next of their
        /// topic and epoch; anything else is reported, not delivered.
        #[test]
        fn applied_events_are_delivered_only_in_order() {
            let (broker, rx, _) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let apply = |epoch, seq| broker.apply("t", epoch, seq, format!("e{seq}").into(), 0);
            assert_eq!(apply("E", 1), Applied::Delivered);
            assert_eq!(next(&rx), ["e1"]);
            assert_eq!(apply("E", 1), Applied::Duplicate);
            assert_eq!(apply("E", 3), Applied::Gap { last: 1 });
            assert_eq!(apply("F", 2), Applied::Unknown);
            assert_eq!(
                broker.apply("nope", "E", 1, "x".into(), 0),
                Applied::Unknown
            );
            assert_eq!(next(&rx), ["Err(Empty)"]);
            assert_eq!(apply("E", 2), Applied::Delivered);
            assert_eq!(next(&rx), ["e2"]);
            assert_eq!(broker.position("t"), Some(("E".to_string(), 2)));
        }

        /// A mirror delivers what its subscribers lack when the entries reach back to it, and
        /// otherwise unsubscribes them with the notice finished with the last seq they got.
        #[test]
        fn a_mirror_catches_up_or_tells_subscribers_where_they_were() {
            let (broker, rx, _) = broker_with_session(10, 10);
            subscribe(&broker, Replay::LastN(0)).unwrap();
            let entries = |seqs: std::ops::RangeInclusive<u64>| -> Vec<(u64, Utf8Bytes)> {
                seqs.map(|seq| (seq, format!("e{seq}").into())).collect()
            };
            let notice = unfinished("gap");
            let mirrored = broker.mirror("t", "E", 3, entries(1..=3), &notice);
            assert_eq!(mirrored, Mirrored::CaughtUp(3));
            assert_eq!(
                [next(&rx), next(&rx), next(&rx)].concat(),
                ["e1", "e2", "e3"]
            );
            assert_eq!(
                broker.mirror("t", "E", 3, entries(1..=3), &notice),
                Mirrored::Unchanged
            );
            // Redis now holds 8 to 9 only: 4 to 7 are gone.
            assert_eq!(
                broker.mirror("t", "E", 9, entries(8..=9), &notice),
                Mirrored::Reset
            );
            assert_eq!(next(&rx), [r#"{"m":"gap","seq":3}"#]);
            assert_eq!(broker.topic_stats()[0].subscribers, 0, "unsubscribed");
            assert_eq!(broker.position("t"), Some(("E".to_string(), 9)));
            let history = broker.history("t", 0, usize::MAX).unwrap();
            assert_eq!(
                history.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
                [8, 9]
            );
            // Another epoch starts the topic again too; a topic never seen is added.
            assert_eq!(
                broker.mirror("t", "F", 0, Vec::new(), &notice),
                Mirrored::Reset
            );
            assert_eq!(
                broker.mirror("u", "G", 2, entries(1..=2), &notice),
                Mirrored::Added
            );
            assert_eq!(broker.history("u", 0, usize::MAX).unwrap().entries.len(), 2);
        }

        /// A publisher waiting for its event returns once another thread has applied it, or at
        /// its deadline.
        #[test]
        fn a_publisher_waits_for_its_event_to_be_applied() {
            let (broker, _rx, _) = broker_with_session(10, 10);
            let broker = Arc::new(broker);
            assert!(!broker.wait_applied("t", "E", 1, Duration::from_millis(20)));
            let applier = {
                let broker = Arc::clone(&broker);
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(20));
                    broker.apply("t", "E", 1, "e1".into(), 0)
                })
            };
            let started = Instant::now();
            assert!(broker.wait_applied("t", "E", 1, Duration::from_secs(10)));
            assert!(started.elapsed() < Duration::from_secs(5));
            assert_eq!(applier.join().unwrap(), Applied::Delivered);
            // Another epoch means the awaited event will never come here: no wait.
            assert!(broker.wait_applied("t", "F", 5, Duration::from_secs(10)));
        }

        #[test]
        fn shutdown_refuses_operations_and_wakes_sessions() {
            let (broker, rx, control) = broker_with_session(10, 10);
            broker.shutdown();
            assert_eq!(control.ending(), Ending::ShuttingDown);
            assert!(matches!(rx.try_recv(), Ok(Outgoing::Wake)));
            assert_eq!(publish_event(&broker, "t", "x"), Err(BrokerError::Closed));
            assert_eq!(
                subscribe(&broker, Replay::LastN(0)),
                Err(BrokerError::Closed)
            );
        }
    }
}

mod state {
    //! What every thread shares ([`Shared`]): the configuration, the broker, the open connections
    //! counted against `MAX_CONNECTIONS` ([`Connections`]), and the counters `/metrics` reports.
    //!
    //! Owns: admission bookkeeping and counters. Must never: block a hot path (counters are relaxed
    //! atomics) or hold a lock across I/O.

    use std::collections::{BTreeMap, HashMap};
    use std::fmt;
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    use serde_json::value::RawValue;

    use super::backplane::{catch_up, Backplane, CallError, Numbered, APPLY_WAIT};
    use super::broker::{self, new_epoch, Broker, BrokerError, Published};
    use super::config::Config;
    use super::protocol::{EventMessage, Failure, ServerMessage, Unfinished};
    use super::rest_proxy::RestBackends;

    /// What every thread shares, for the life of the process.
    pub(crate) struct Shared {
        pub(crate) config: Config,
        pub(crate) broker: Broker,
        pub(crate) connections: Connections,
        /// Connections turned away: `MAX_CONNECTIONS`, out of descriptors or threads.
        pub(crate) refusals: Tally,
        /// Connections cut because their request head was too slow or they were evicted for room.
        pub(crate) slow_heads: Tally,
        pub(crate) metrics: Metrics,
        pub(crate) started: Instant,
        pub(crate) shutting_down: AtomicBool,
        pub(crate) next_connection_id: AtomicU64,
        /// Connections to tiny_http; REST requests are pumped there.
        pub(crate) rest_backends: RestBackends,
        /// Cluster mode's link to Redis; `None` in memory mode (`REDIS_URL` unset).
        pub(crate) backplane: Option<Backplane>,
    }

    impl Shared {
        pub(crate) fn new(
            config: Config,
            rest_backends: RestBackends,
            backplane: Option<Backplane>,
        ) -> Shared {
            let broker = Broker::new(broker::Limits {
                ring_size: config.ring_size,
                retained_bytes: config.max_retained_bytes,
                topics: config.max_topics,
            });
            // The integration tests' way to make a request panic under the broker lock.
            #[cfg(debug_assertions)]
            if let Ok(topic) = std::env::var("PUBSUB_BACKEND_TEST_PANIC_TOPIC") {
                broker.panic_on_publish_to(topic);
            }
            Shared {
                broker,
                config,
                connections: Connections::default(),
                refusals: Tally::new("refused"),
                slow_heads: Tally::new("cut for a slow request head"),
                metrics: Metrics::default(),
                started: Instant::now(),
                shutting_down: AtomicBool::new(false),
                next_connection_id: AtomicU64::new(1),
                rest_backends,
                backplane,
            }
        }

        /// Creates a topic: in this process, or cluster-wide in cluster mode.
        pub(crate) fn create_topic(&self, name: &str) -> Result<(), Failure> {
            let epoch = new_epoch();
            let Some(backplane) = &self.backplane else {
                let created = self.broker.add_topic(name, epoch);
                return created.map_err(|error| Failure::from_broker(error, name));
            };
            let exists = |error| Err(Failure::from_broker(error, name));
            match backplane.create(name, &epoch) {
                Ok(Some(true)) => {
                    // Mirrored at once, so that this instance's next request finds it; should Redis
                    // fail just now, the backplane thread mirrors it when it catches up.
                    let _ = catch_up(self, backplane, name);
                    Ok(())
                }
                Ok(Some(false)) => exists(BrokerError::TopicExists),
                Ok(None) => exists(BrokerError::TooManyTopics),
                Err(error) => Err(backplane.unavailable(&error)),
            }
        }

        /// Deletes a topic, here or cluster-wide; its subscribers are told and stay connected.
        pub(crate) fn delete_topic(&self, name: &str) -> Result<(), Failure> {
            let notice = ServerMessage::topic_deleted(name);
            let Some(backplane) = &self.backplane else {
                let removed = self.broker.remove_topic(name, None, notice);
                return removed.map_err(|error| Failure::from_broker(error, name));
            };
            match backplane.delete(name) {
                Ok(true) => {
                    let _ = self.broker.remove_topic(name, None, notice);
                    Ok(())
                }
                Ok(false) => Err(Failure::from_broker(BrokerError::TopicNotFound, name)),
                Err(error) => Err(backplane.unavailable(&error)),
            }
        }

        /// Publishes a message, from WebSocket or HTTP alike: its event is serialized once, here,
        /// then numbered by the broker, or in cluster mode by the backplane, in which case the
        /// answer waits (a moment at most) until this instance has delivered it, so that a
        /// subscriber here gets the event before the publisher its ack. `id` is canonical (see
        /// [`required_message_id`](crate::protocol::required_message_id)).
        pub(crate) fn publish(
            &self,
            name: &str,
            id: &str,
            payload: &RawValue,
        ) -> Result<Published, Failure> {
            let event = ServerMessage::Event {
                topic: name,
                message: EventMessage { id, payload },
            };
            let event = Unfinished::new(&event);
            let Some(backplane) = &self.backplane else {
                let id = uuid::Uuid::try_parse(id).map_or(0, |uuid| uuid.as_u128());
                let published = self
                    .broker
                    .number_and_queue(name, id, &event, self.clock_us());
                return published.map_err(|error| Failure::from_broker(error, name));
            };
            let (seq, duplicate) = match backplane.number(name, id, &event) {
                Ok(Numbered::Published { epoch, seq }) => {
                    self.broker.wait_applied(name, &epoch, seq, APPLY_WAIT);
                    (seq, false)
                }
                Ok(Numbered::Duplicate { seq }) => (seq, true),
                Ok(Numbered::NoTopic) => {
                    return Err(Failure::from_broker(BrokerError::TopicNotFound, name));
                }
                Err(error) => {
                    let mut failure = backplane.unavailable(&error);
                    if matches!(error, CallError::Unknown(_)) {
                        // Never retried here: the client decides, and a retry with this id is safe.
                        failure.message += &format!(
                                    "; publish again with message id {id}: if it was published, the repeat is \
                                     answered with its seq and nothing is published twice"
                                );
                    }
                    return Err(failure);
                }
            };
            Ok(Published {
                seq,
                duplicate,
                behind: None,
            })
        }

        /// In cluster mode, mirrors topic `name` from Redis if this instance has not heard of it
        /// yet; true when it exists here now.
        pub(crate) fn refresh(&self, name: &str) -> bool {
            match &self.backplane {
                Some(backplane) => {
                    catch_up(self, backplane, name).is_ok() && self.broker.position(name).is_some()
                }
                None => false,
            }
        }

        pub(crate) fn is_shutting_down(&self) -> bool {
            self.shutting_down.load(Ordering::SeqCst)
        }

        /// Microseconds since start, wrapping every 71 minutes: stamps events compactly, for
        /// latencies far shorter than that.
        pub(crate) fn clock_us(&self) -> u32 {
            self.started.elapsed().as_micros() as u32
        }
    }

    /// Every open client socket, so that shutdown can count the WebSockets still flushing and
    /// wake any thread still blocked on a socket.
    #[derive(Default)]
    pub(crate) struct Connections {
        open: Mutex<OpenConnections>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct OpenConnections {
        sockets: HashMap<u64, OpenConnection>,
        websockets: usize,
    }

    /// One admitted connection, as [`Connections`] sees it.
    struct OpenConnection {
        socket: Arc<TcpStream>,
        /// Since when it has been waiting for a request head (a new connection, or a REST
        /// keep-alive between requests); `None` while a request is served or a WebSocket session
        /// runs. Only a connection that is waiting may be evicted to make room.
        awaiting_head_since: Option<Instant>,
    }

    /// Keeps a connection in [`Connections`] while it lives, counting it against
    /// `MAX_CONNECTIONS`; dropping it (even while a panic unwinds) frees the place.
    pub(crate) struct Registration {
        pub(crate) shared: Arc<Shared>,
        id: u64,
        /// Routed to a WebSocket session, which shutdown waits for.
        websocket: bool,
    }

    impl Connections {
        fn lock(&self) -> MutexGuard<'_, OpenConnections> {
            self.open.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Admits a connection. When `MAX_CONNECTIONS` are open, the one that has waited longest
        /// for a request head is shut down to make room: the budget goes to clients that make
        /// progress, never to a served request or a WebSocket session. Without such a connection,
        /// the new one is refused (`None`).
        pub(crate) fn admit(
            shared: &Arc<Shared>,
            id: u64,
            socket: &Arc<TcpStream>,
        ) -> Option<Registration> {
            let mut open = shared.connections.lock();
            if open.sockets.len() >= shared.config.max_connections {
                let oldest = open
                    .sockets
                    .iter()
                    .filter_map(|(&id, c)| c.awaiting_head_since.map(|since| (since, id)))
                    .min()?;
                // Its thread sees the shutdown and ends; its registration then finds it gone.
                if let Some(evicted) = open.sockets.remove(&oldest.1) {
                    let _ = evicted.socket.shutdown(Shutdown::Both);
                }
                shared
                    .slow_heads
                    .record("evicted, waiting for a request head while MAX_CONNECTIONS were open");
            }
            let connection = OpenConnection {
                socket: Arc::clone(socket),
                awaiting_head_since: Some(Instant::now()),
            };
            open.sockets.insert(id, connection);
            Some(Registration {
                shared: Arc::clone(shared),
                id,
                websocket: false,
            })
        }

        /// Waits until every WebSocket session has ended or the deadline passes; returns how many
        /// are left.
        pub(crate) fn wait_for_websockets(&self, deadline: Instant) -> usize {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let (open, _) = self
                .changed
                .wait_timeout_while(self.lock(), timeout, |open| open.websockets > 0)
                .unwrap_or_else(PoisonError::into_inner);
            open.websockets
        }

        /// Records whether a connection is waiting for a request head, and so may be evicted.
        pub(crate) fn set_awaiting_head(&self, id: u64, awaiting: bool) {
            if let Some(connection) = self.lock().sockets.get_mut(&id) {
                connection.awaiting_head_since = awaiting.then(Instant::now);
            }
        }

        /// (open connections, of which WebSocket sessions).
        pub(crate) fn counts(&self) -> (usize, usize) {
            let open = self.lock();
            (open.sockets.len(), open.websockets)
        }

        /// Shuts every socket down, which wakes the threads blocked on them.
        pub(crate) fn shutdown_all(&self) {
            for connection in self.lock().sockets.values() {
                let _ = connection.socket.shutdown(Shutdown::Both);
            }
        }
    }

    impl Registration {
        /// Counts this connection as a WebSocket session until it ends.
        pub(crate) fn mark_websocket(&mut self) {
            self.shared.connections.lock().websockets += 1;
            self.websocket = true;
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            let connections = &self.shared.connections;
            let mut open = connections.lock();
            open.sockets.remove(&self.id);
            if self.websocket {
                open.websockets -= 1;
            }
            connections.changed.notify_all();
        }
    }

    /// Counts connections ended for one kind of reason and logs them at most once a second, so
    /// that a flood of connections does not become a flood of log lines too.
    pub(crate) struct Tally {
        /// What happened to the connections counted, for the log line ("refused").
        what: &'static str,
        /// When the last line was logged, and how many came since.
        log_state: Mutex<(Option<Instant>, u64)>,
        pub(crate) total: AtomicU64,
    }

    impl Tally {
        fn new(what: &'static str) -> Tally {
            Tally {
                what,
                log_state: Mutex::new((None, 0)),
                total: AtomicU64::new(0),
            }
        }

        pub(crate) fn record(&self, why: &str) {
            self.total.fetch_add(1, Ordering::Relaxed);
            let mut state = self
                .log_state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (last_logged, unlogged) = &mut *state;
            *unlogged += 1;
            let now = Instant::now();
            if last_logged.is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1)) {
                let what = self.what;
                log::warn!("{what}: {unlogged} connection(s) since the last report (last: {why})");
                (*last_logged, *unlogged) = (Some(now), 0);
            }
        }
    }

    /// Upper bounds of the publish-to-write latency buckets, in microseconds (50 µs to 5 s).
    pub(crate) const LATENCY_BUCKETS_US: [u64; 14] = [
        50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
        1_000_000, 5_000_000,
    ];

    /// What `/metrics` reports beyond the broker's counts: relaxed atomics and one small map, so
    /// the hot paths never wait on them.
    #[derive(Default)]
    pub(crate) struct Metrics {
        pub(crate) heartbeat_reaps: AtomicU64,
        /// (route label, status) → requests.
        pub(crate) rest_requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
        pub(crate) publish_to_write: LatencyHistogram,
    }

    impl Metrics {
        pub(crate) fn count_rest_request(&self, route: &'static str, status: u16) {
            let mut requests = self
                .rest_requests
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *requests.entry((route, status)).or_default() += 1;
        }
    }

    /// A histogram of microseconds; one extra bucket holds what exceeds the last bound.
    #[derive(Default)]
    pub(crate) struct LatencyHistogram {
        pub(crate) counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
        pub(crate) sum_us: AtomicU64,
    }

    impl LatencyHistogram {
        /// Adds a writer's batch with one atomic add per bucket it touched.
        pub(crate) fn add(&self, batch: &LatencyBatch) {
            for (count, &n) in self
                .counts
                .iter()
                .zip(&batch.counts)
                .filter(|(_, &n)| n > 0)
            {
                count.fetch_add(n, Ordering::Relaxed);
            }
            self.sum_us.fetch_add(batch.sum_us, Ordering::Relaxed);
        }
    }

    /// The latencies of one writer batch, kept locally until its flush.
    #[derive(Default)]
    pub(crate) struct LatencyBatch {
        counts: [u64; LATENCY_BUCKETS_US.len() + 1],
        sum_us: u64,
    }

    impl LatencyBatch {
        pub(crate) fn record(&mut self, latency_us: u32) {
            let latency_us = u64::from(latency_us);
            self.counts[LATENCY_BUCKETS_US.partition_point(|&bound| bound < latency_us)] += 1;
            self.sum_us += latency_us;
        }
    }

    /// Names a connection in log lines: its id and the peer's address.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Peer {
        pub(crate) id: u64,
        pub(crate) addr: SocketAddr,
    }

    impl fmt::Display for Peer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "conn {} {}", self.id, self.addr)
        }
    }
}

mod auth {
    //! The API key: where a request may present it and how it is compared.
    //!
    //! Owns: the one reading of `X-API-Key`, `Authorization: Bearer` and the `api_key` query
    //! parameter, for REST and WebSocket upgrades alike. Must never: compare in variable time,
    //! or log a key.

    use subtle::ConstantTimeEq;
    use tungstenite::http::StatusCode;

    use super::protocol::{ErrorCode, Failure};

    /// The key a request presents: the first `X-API-Key` or `Authorization: Bearer` header, in
    /// the order the headers came, else the first `api_key` parameter of `query` (given only
    /// for WebSocket upgrades: browsers cannot set headers on a WebSocket). Only the first
    /// counts, so one request is one guess.
    pub(crate) fn presented_key<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        query: Option<&'a str>,
    ) -> Option<&'a [u8]> {
        let from_headers = headers.into_iter().find_map(|(name, value)| {
            if name.eq_ignore_ascii_case("X-API-Key") {
                Some(value)
            } else if name.eq_ignore_ascii_case("Authorization") {
                // RFC 9110 11.1: the scheme is case-insensitive. Prometheus and most HTTP
                // clients send credentials this way.
                let space = value.iter().position(|&b| b == b' ')?;
                let (scheme, credentials) = value.split_at(space);
                scheme
                    .eq_ignore_ascii_case(b"Bearer")
                    .then(|| credentials.trim_ascii_start())
            } else {
                None
            }
        });
        from_headers.or_else(|| {
            query?
                .split('&')
                .find_map(|pair| pair.strip_prefix("api_key="))
                .map(str::as_bytes)
        })
    }

    /// True when no key is `required`, or when the `presented` one is it.
    pub(crate) fn is_authorized(required: Option<&str>, presented: Option<&[u8]>) -> bool {
        match required {
            None => true,
            // Compared in constant time, so response timing does not reveal how much of a
            // guess matched.
            Some(expected) => {
                presented.is_some_and(|given| expected.as_bytes().ct_eq(given).into())
            }
        }
    }

    /// The refusal of a request without the right key: 401, naming where a key goes.
    pub(crate) fn unauthorized(query_accepted: bool) -> Failure {
        let places = if query_accepted {
            "X-API-Key header, Authorization: Bearer or api_key query parameter"
        } else {
            "X-API-Key header or Authorization: Bearer"
        };
        Failure::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!("missing or wrong API key ({places})"),
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn check(headers: &[(&str, &str)], query: Option<&str>, expected: Option<&str>) {
            let headers = headers.iter().map(|(n, v)| (*n, v.as_bytes()));
            assert_eq!(
                presented_key(headers, query),
                expected.map(str::as_bytes),
                "{query:?}"
            );
        }

        #[test]
        fn the_first_credential_a_request_presents_is_its_key() {
            check(&[], None, None);
            check(&[("x-api-key", "k")], None, Some("k"));
            check(&[("Authorization", "bearer   k")], None, Some("k"));
            check(&[("Authorization", "Basic k")], None, None);
            check(&[("Authorization", "k")], None, None);
            check(
                &[("Authorization", "Basic x"), ("X-API-Key", "k")],
                None,
                Some("k"),
            );
            check(
                &[("X-API-Key", "no"), ("Authorization", "Bearer k")],
                None,
                Some("no"),
            );
            check(&[], Some("a=1&api_key=k&api_key=no"), Some("k"));
            check(&[("X-API-Key", "h")], Some("api_key=q"), Some("h"));
            check(&[], Some("xapi_key=k&API_KEY=k"), None);
        }

        #[test]
        fn only_the_exact_key_is_authorized() {
            assert!(is_authorized(None, None));
            assert!(is_authorized(Some("k3y"), Some(b"k3y")));
            for wrong in [&b""[..], b"k3", b"k3y ", b"K3Y"] {
                assert!(!is_authorized(Some("k3y"), Some(wrong)));
            }
            assert!(!is_authorized(Some("k3y"), None));
        }
    }
}

pub(crate) mod dispatch {
    //! The front door: accepts connections, admits or refuses them against `MAX_CONNECTIONS`, peeks
    //! at the request line without consuming it, and routes `/ws` upgrades to [`crate::ws`] and
    //! everything else to [`crate::rest_proxy`].
    //!
    //! Owns: the listening socket, the `conn-N` threads, the request-head deadline ([`HeadClock`]).
    //! Must never: block the acceptor on a client, or read bytes the handler after it needs.

    use std::io::{self, Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use tungstenite::http::StatusCode;

    use super::protocol::{ErrorCode, Failure};
    use super::rest_proxy::proxy_to_rest;
    use super::state::{Connections, Peer, Registration, Shared, Tally};
    use super::ws::serve_ws;

    /// Longest request line the dispatcher looks at, in bytes. Longer lines are refused with 414
    /// rather than routed blind; 8 KiB matches the common limit of nginx and Node.js.
    pub(crate) const MAX_REQUEST_LINE: usize = 8 * 1024;

    /// How long a request head may dawdle once its first byte is in, before [`HEAD_MIN_RATE`]
    /// applies: a head normally arrives in one segment, so this is only slack for a lossy link.
    const HEAD_RATE_GRACE: Duration = Duration::from_secs(3);

    /// Bytes a second a request head must average after [`HEAD_RATE_GRACE`] (Apache's
    /// `mod_reqtimeout` uses the same 500): a client that trickles its head to hold a connection
    /// (slowloris) is cut after seconds, not after `HANDSHAKE_TIMEOUT_SEC`.
    const HEAD_MIN_RATE: u64 = 500;

    /// Stack size of the thread that takes each new connection (`conn-N`: the peek, the WebSocket
    /// handshake, or a REST connection's whole life). It differs from [`SESSION_STACK_SIZE`](crate::ws::SESSION_STACK_SIZE) by more
    /// than 4 times so that glibc, which keeps the stacks of ended threads for reuse, never hands
    /// a stack the handshake ran deep in to a session thread (see [`serve_ws`]).
    const DISPATCH_STACK_SIZE: usize = 2 * 1024 * 1024;

    /// `accept`'s error when the process has no file descriptor left (Linux errno 24).
    const EMFILE: i32 = 24;

    /// How long the acceptor backs off after `accept` fails (out of file descriptors, say), so the
    /// failure is not retried in a hot loop; the server goes on once descriptors free up.
    const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

    /// Limits of a REST request head, checked before tiny_http sees it (it buffers heads without a
    /// limit): 16 KiB and 64 headers, about what nginx and Node.js allow.
    pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

    pub(crate) const MAX_HEADERS: usize = 64;

    /// Accepts connections until shutdown and gives each its own thread. An accept error (out of
    /// file descriptors, say) is logged and backed off from; a thread that cannot be started
    /// refuses that one connection.
    pub(crate) fn run_acceptor(listener: TcpListener, shared: &Arc<Shared>) {
        // A descriptor held in reserve: when the process runs out, closing it makes room to accept
        // one waiting connection and refuse it properly, instead of leaving it in the backlog.
        // Reopened before every accept while missing: another thread may take the number it frees.
        let mut spare = None;
        loop {
            if spare.is_none() {
                spare = std::fs::File::open("/dev/null").ok();
            }
            let accepted = listener.accept();
            if shared.is_shutting_down() {
                return;
            }
            let (stream, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) if error.raw_os_error() == Some(EMFILE) && spare.is_some() => {
                    drop(spare.take());
                    // Only a connection already waiting is refused; none may be by now.
                    let _ = listener.set_nonblocking(true);
                    if let Ok((stream, _)) = listener.accept() {
                        refuse(&stream, &shared.refusals, "out of file descriptors");
                    }
                    let _ = listener.set_nonblocking(false);
                    continue;
                }
                Err(error) => {
                    shared.refusals.record(&format!("accept failed: {error}"));
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let peer = Peer {
                id: shared.next_connection_id.fetch_add(1, Ordering::Relaxed),
                addr,
            };
            let socket = Arc::new(stream);
            let Some(registration) = Connections::admit(shared, peer.id, &socket) else {
                let why = format!(
                    "MAX_CONNECTIONS ({}) reached",
                    shared.config.max_connections
                );
                refuse(&socket, &shared.refusals, &why);
                continue;
            };
            let thread_socket = Arc::clone(&socket);
            let spawned = thread::Builder::new()
                .name(format!("conn-{}", peer.id))
                .stack_size(DISPATCH_STACK_SIZE)
                .spawn(move || serve_connection(&thread_socket, peer, registration));
            if let Err(error) = spawned {
                refuse(
                    &socket,
                    &shared.refusals,
                    &format!("cannot start a thread: {error}"),
                );
            }
        }
    }

    /// Turns away a connection the server cannot take, from the acceptor thread itself (nothing is
    /// spawned for it): a 503 with a JSON error, then close. Whatever of the request has arrived
    /// is read first, so that closing does not reset the connection before the client reads the
    /// answer. Nothing here may block the acceptor.
    fn refuse(socket: &TcpStream, refusals: &Tally, why: &str) {
        let _ = socket.set_nonblocking(true);
        let _ = (&*socket).read(&mut [0u8; 4096]);
        let message = format!("server busy: {why}; retry later");
        let failure = Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            message,
        );
        let _ = send_failure(socket, &failure);
        let _ = socket.shutdown(Shutdown::Write);
        refusals.record(why);
    }

    /// Answers a connection that never reaches tiny_http or tungstenite with `failure`; the caller
    /// closes it.
    pub(crate) fn send_failure(socket: &TcpStream, failure: &Failure) -> io::Result<()> {
        let mut socket = socket;
        socket.write_all(&failure.to_http_response())
    }

    /// Runs one client connection to its end, or until a WebSocket session's threads take it
    /// over, and logs its end.
    fn serve_connection(socket: &Arc<TcpStream>, peer: Peer, registration: Registration) {
        log::debug!("{peer}: connected");
        let shared = Arc::clone(&registration.shared);
        match dispatch(socket, peer, &shared, registration) {
            Ok(Dispatched::HandedOver) => {}
            Ok(Dispatched::Ended) => log_end(peer, Ok(())),
            Err(error) => log_end(peer, Err(error)),
        }
    }

    /// What became of a connection its first thread was done with.
    pub(crate) enum Dispatched {
        Ended,
        /// A WebSocket session's threads serve it now, and log its end.
        HandedOver,
    }

    /// Logs a connection's end once: expected ends (closed, reset, timed out) at debug, anything
    /// else at warn.
    pub(crate) fn log_end(peer: Peer, result: io::Result<()>) {
        match result {
            Ok(()) => log::debug!("{peer}: closed"),
            Err(error) if is_expected_end(&error) => log::debug!("{peer}: closed: {error}"),
            Err(error) => log::warn!("{peer}: failed: {error}"),
        }
    }

    /// Peer gone or silent: the normal ways for a connection to end.
    pub(crate) fn is_expected_end(error: &io::Error) -> bool {
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::NotConnected
        )
    }

    /// How long a request head may take to arrive: at most `HANDSHAKE_TIMEOUT_SEC` from when it was
    /// awaited and, once its first byte is in, no slower than [`HEAD_MIN_RATE`] after
    /// [`HEAD_RATE_GRACE`]. A connection that has not sent a byte yet (a browser's preconnect) keeps
    /// the whole timeout; only a head that has started and stalls is cut early.
    pub(crate) struct HeadClock {
        pub(crate) awaited: Instant,
        pub(crate) limit: Duration,
        first_byte: Option<Instant>,
    }

    impl HeadClock {
        pub(crate) fn start(limit: Duration) -> HeadClock {
            HeadClock {
                awaited: Instant::now(),
                limit,
                first_byte: None,
            }
        }

        /// How long the next read may wait, with `received` bytes of the head in; a `TimedOut`
        /// error once the head is late.
        pub(crate) fn remaining(&mut self, received: usize) -> io::Result<Duration> {
            let now = Instant::now();
            let mut deadline = self.awaited + self.limit;
            if received > 0 {
                let first_byte = *self.first_byte.get_or_insert(now);
                let earned = Duration::from_millis(received as u64 * 1000 / HEAD_MIN_RATE);
                deadline = deadline.min(first_byte + HEAD_RATE_GRACE + earned);
            }
            match deadline.checked_duration_since(now) {
                Some(remaining) if !remaining.is_zero() => Ok(remaining),
                _ => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                )),
            }
        }
    }

    /// Where a connection goes, decided from its request line alone.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Route {
        WebSocket,
        Rest,
        /// The peer closed before sending a request line.
        Closed,
        /// The request line exceeded [`MAX_REQUEST_LINE`].
        TooLong,
        /// The peer closed its side in the middle of the request line.
        Incomplete,
    }

    /// Routes one connection: `/ws` to the WebSocket session, anything else to REST.
    fn dispatch(
        socket: &Arc<TcpStream>,
        peer: Peer,
        shared: &Arc<Shared>,
        mut registration: Registration,
    ) -> io::Result<Dispatched> {
        socket.set_nodelay(true)?;
        socket.set_write_timeout(Some(shared.config.write_timeout))?;
        // One clock for the request line and the rest of the head (the WebSocket handshake, or
        // the first REST request).
        let mut clock = HeadClock::start(shared.config.handshake_timeout);
        let route = match peek_route(socket, &mut clock) {
            Ok(route) => route,
            Err(error) => {
                if error.kind() == io::ErrorKind::TimedOut {
                    shared.slow_heads.record("request line too slow");
                }
                return Err(error);
            }
        };
        let ended = match route {
            Route::WebSocket => {
                registration.mark_websocket();
                return serve_ws(socket, peer, clock, registration);
            }
            Route::Rest => proxy_to_rest(socket, peer, shared, clock),
            Route::Closed => Ok(()),
            Route::TooLong => {
                let message = format!("request line longer than {MAX_REQUEST_LINE} bytes");
                let failure =
                    Failure::new(StatusCode::URI_TOO_LONG, ErrorCode::BadRequest, message);
                send_failure(socket, &failure)
            }
            Route::Incomplete => {
                // The line stays unread in the socket: closing with unread bytes would reset the
                // connection and could destroy the answer on its way.
                let _ = (&**socket).read(&mut [0u8; MAX_REQUEST_LINE]);
                let message = "the connection was half-closed before the request line was complete";
                send_failure(socket, &Failure::bad_request(message))
            }
        };
        ended.map(|()| Dispatched::Ended)
    }

    /// Peeks (without consuming) until the request line is complete, then routes on its path. The
    /// bytes stay in the socket for whoever serves the connection. `peek` returns at once while any
    /// byte is waiting, so a line that arrives in pieces is re-peeked after a short wait in `poll`
    /// for the peer's FIN (`POLLRDHUP`): a peer that closed its side can never complete the line,
    /// and is answered at once instead of at the deadline. The deadline bounds a client that
    /// trickles bytes (see [`HeadClock`]).
    fn peek_route(socket: &TcpStream, clock: &mut HeadClock) -> io::Result<Route> {
        let mut buf = vec![0u8; MAX_REQUEST_LINE];
        let mut pause = Duration::from_millis(1);
        let mut peeked = 0;
        loop {
            let remaining = clock.remaining(peeked)?;
            socket.set_read_timeout(Some(remaining))?;
            peeked = socket.peek(&mut buf)?;
            match decide_route(&buf[..peeked], buf.len()) {
                // Only an upgrade request goes to the WebSocket handshake; anything else sent to
                // `/ws` is answered by REST, like every other route (`OPTIONS`, `401`, `426`).
                Some(Route::WebSocket) => match requests_upgrade(&buf[..peeked]) {
                    Some(true) => return Ok(Route::WebSocket),
                    Some(false) => return Ok(Route::Rest),
                    None if peeked == buf.len() => return Ok(Route::WebSocket),
                    None => {}
                },
                Some(route) => return Ok(route),
                None => {}
            }
            if peer_has_closed(socket, pause.min(clock.remaining(peeked)?))? {
                return Ok(Route::Incomplete);
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Waits up to `wait` for the peer to shut down its sending side; true once it has.
    fn peer_has_closed(socket: &TcpStream, wait: Duration) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(socket, PollFlags::RDHUP)];
        poll(&mut fds, Some(&timeout))?;
        Ok(fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR))
    }

    /// Routes on what has been peeked so far, or `None` while the request line is incomplete and
    /// more bytes fit. `capacity` is how many bytes a peek can return. (The fuzz target
    /// `fuzz/fuzz_targets/route.rs` exercises this, hence `pub(crate)`.)
    pub(crate) fn decide_route(peeked: &[u8], capacity: usize) -> Option<Route> {
        if peeked.is_empty() {
            return Some(Route::Closed);
        }
        match peeked.iter().position(|&b| b == b'\n') {
            Some(end) => Some(route_for_request_line(&peeked[..end])),
            None if peeked.len() >= capacity => Some(Route::TooLong),
            None => None,
        }
    }

    /// Whether a complete request head asks for a WebSocket upgrade (RFC 6455 4.2.1: an `Upgrade`
    /// header naming `websocket`); `None` while the head is incomplete. A head that does not parse
    /// counts as an upgrade, so that the handshake answers it with its own error.
    fn requests_upgrade(head: &[u8]) -> Option<bool> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(head) {
            Ok(httparse::Status::Partial) => None,
            Ok(httparse::Status::Complete(_)) => Some(request.headers.iter().any(|header| {
                header.name.eq_ignore_ascii_case("upgrade")
                    && String::from_utf8_lossy(header.value)
                        .to_ascii_lowercase()
                        .contains("websocket")
            })),
            Err(_) => Some(true),
        }
    }

    /// `GET /ws?api_key=k HTTP/1.1` → WebSocket; any other line → REST, which answers even
    /// nonsense with a proper HTTP error.
    fn route_for_request_line(line: &[u8]) -> Route {
        let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
        let target = std::str::from_utf8(target).map_or(target, |t| origin_form(t).as_bytes());
        let path = target.split(|&b| b == b'?').next().unwrap_or_default();
        if path == b"/ws" {
            Route::WebSocket
        } else {
            Route::Rest
        }
    }

    /// The path and query of a request target. RFC 9112 3.2.2: a server must accept the
    /// absolute form (`http://host/health`), which proxies send; routes match the origin form.
    pub(crate) fn origin_form(target: &str) -> &str {
        let Some((scheme, rest)) = target.split_once("://") else {
            return target;
        };
        if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
            return target;
        }
        match rest.find(['/', '?']) {
            Some(start) if rest[start..].starts_with('/') => &rest[start..],
            _ => "/",
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn routes_on_the_request_line_path() {
            let route = |peeked: &[u8]| decide_route(peeked, 64);
            assert_eq!(
                route(b"GET /ws HTTP/1.1\r\nHost: x\r\n"),
                Some(Route::WebSocket)
            );
            assert_eq!(
                route(b"GET /ws?api_key=k HTTP/1.1\r\n"),
                Some(Route::WebSocket)
            );
            assert_eq!(route(b"GET /wsx HTTP/1.1\r\n"), Some(Route::Rest));
            assert_eq!(route(b"GET /topics HTTP/1.1\r\n"), Some(Route::Rest));
            assert_eq!(route(b"garbage\n"), Some(Route::Rest));
            assert_eq!(route(b"GET /w"), None, "an incomplete line waits for more");
            assert_eq!(route(b""), Some(Route::Closed));
            assert_eq!(route(&[b'a'; 64]), Some(Route::TooLong));
        }

        /// The route corpus (see `fuzz_corpus`), at several peek capacities: no panic.
        #[test]
        fn the_route_corpus_routes_without_a_panic() {
            for input in &super::super::protocol::tests::fuzz_corpus("route") {
                for capacity in [1, 16, MAX_REQUEST_LINE] {
                    let _ = decide_route(input, capacity);
                }
            }
        }
    }
}

pub(crate) mod ws {
    //! A WebSocket session: the handshake (with the API key and origin checks), then a reader
    //! thread that parses and executes requests and a [`Writer`] thread that alone writes frames.
    //!
    //! Owns: the session's threads, its queue's receiving end, heartbeats and closing. Must never:
    //! let two threads write to one socket, or hold any lock while writing.

    use std::cell::Cell;
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use tungstenite::handshake::server::{
        Callback, ErrorResponse, Request as UpgradeRequest, Response as UpgradeResponse,
    };
    use tungstenite::handshake::HandshakeError;
    use tungstenite::http::{header, StatusCode};
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
    use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

    use super::auth;
    use super::broker::{Broker, BrokerError, Ending, Published, SessionControl};
    use super::config::Config;
    use super::dispatch::{is_expected_end, log_end, send_failure, Dispatched, HeadClock};
    use super::join_quietly;
    use super::protocol::{
        date_header, timestamp, ClientRequest, ErrorCode, Failure, Operation, ServerMessage,
        Unfinished,
    };
    use super::queue::{Outgoing, Reply, SlotFiller};
    use super::state::{Connections, LatencyBatch, Peer, Registration, Shared};

    /// How long a WebSocket whose server side has sent its Close frame waits for the client's reply
    /// before the TCP connection is dropped (RFC 6455 7.1.1: the server closes TCP first).
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

    /// Stack size of a WebSocket session's reader and writer threads, in bytes. They need little:
    /// the deepest path is serde_json's recursion-limited (128 levels) parse of a request.
    pub(crate) const SESSION_STACK_SIZE: usize = 256 * 1024;

    /// Bytes tungstenite reads from a socket at a time, and keeps allocated (and zeroed) for every
    /// connection: its default is 128 KiB, while a request is usually a few hundred bytes. Larger
    /// messages still arrive whole, a read call per KiB (about a millisecond per MiB).
    const WS_READ_BUFFER_SIZE: usize = 1024;

    /// Bytes of encoded frames the writer collects before it writes to the socket; a flush at the
    /// end of every batch of queued items sends the rest, so small batches are not delayed.
    const WS_WRITE_BUFFER_SIZE: usize = 64 * 1024;

    /// The longest a publisher waits after one publish for a subscriber's writer that is behind:
    /// long enough for a starved writer to be scheduled and drain, short enough that a wait never
    /// shows as a stall.
    const WRITER_WAIT_LIMIT: Duration = Duration::from_millis(50);

    /// The tungstenite limits that enforce `MAX_MESSAGE_BYTES` and keep buffers small.
    fn websocket_config(config: &Config) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER_SIZE)
            .write_buffer_size(WS_WRITE_BUFFER_SIZE)
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes))
    }

    /// Takes one WebSocket connection through its handshake, then hands it (and its place in
    /// [`Connections`](crate::state::Connections)) to a new reader thread ([`run_session`]).
    pub(crate) fn serve_ws(
        socket: &Arc<TcpStream>,
        peer: Peer,
        clock: HeadClock,
        registration: Registration,
    ) -> io::Result<Dispatched> {
        let shared = Arc::clone(&registration.shared);
        let config = &shared.config;
        let reader_socket = ReaderSocket {
            socket: Arc::clone(socket),
            handshake_done: false,
            clock,
            received: 0,
        };
        let authorize = UpgradeAuth {
            config,
            connections: &shared.connections,
            id: peer.id,
        };
        let mut ws = match tungstenite::accept_hdr_with_config(
            reader_socket,
            authorize,
            Some(websocket_config(config)),
        ) {
            Ok(ws) => ws,
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                log::debug!("{peer}: upgrade refused with {}", response.status());
                return Ok(Dispatched::Ended);
            }
            Err(HandshakeError::Failure(tungstenite::Error::Io(error))) => {
                if error.kind() == io::ErrorKind::TimedOut {
                    shared.slow_heads.record("WebSocket handshake too slow");
                }
                return Err(error);
            }
            Err(HandshakeError::Failure(error)) => {
                log::debug!("{peer}: not a WebSocket upgrade: {error}");
                let message = format!("/ws expects a WebSocket upgrade request: {error}");
                return send_failure(socket, &Failure::bad_request(message))
                    .map(|()| Dispatched::Ended);
            }
            Err(HandshakeError::Interrupted(_)) => {
                shared.slow_heads.record("WebSocket handshake too slow");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "WebSocket handshake not completed in time",
                ));
            }
        };
        ws.get_mut().handshake_done = true;
        // A peer that sends nothing, not even a pong, for two heartbeat intervals is dropped: the
        // read times out and the session ends.
        socket.set_read_timeout(Some(config.heartbeat * 2))?;
        log::debug!("{peer}: WebSocket session open");

        // The session gets threads of its own, and this one ends: the handshake above is the
        // deepest code a connection runs (tungstenite parses up to 124 headers on the stack), and
        // the stack pages it touched would stay resident on this thread for as long as the
        // connection lives (a third of what an idle connection costs).
        let session_socket = Arc::clone(socket);
        let reader = thread::Builder::new()
            .name(format!("ws-reader-{}", peer.id))
            .stack_size(SESSION_STACK_SIZE)
            .spawn(move || {
                let shared = Arc::clone(&registration.shared);
                let ended = run_session(ws, &session_socket, peer, &shared);
                drop(registration);
                log_end(peer, ended);
            });
        match reader {
            Ok(_) => Ok(Dispatched::HandedOver),
            Err(error) => {
                close_try_again(socket, &shared, &error);
                Err(error)
            }
        }
    }

    /// RFC 6455 7.4.1: closes an upgraded connection that no thread can serve with 1013, "try
    /// again later". Only for a connection without a writer thread, which alone writes otherwise.
    fn close_try_again(socket: &Arc<TcpStream>, shared: &Shared, error: &io::Error) {
        let writer_socket = WriterSocket::new(socket, shared.config.write_timeout, None);
        let mut ws = WebSocket::from_raw_socket(writer_socket, Role::Server, None);
        let reason = Utf8Bytes::from_static("server busy: cannot start a thread");
        let _ = ws.close(Some(CloseFrame {
            code: CloseCode::Again,
            reason,
        }));
        shared
            .refusals
            .record(&format!("cannot start a session thread: {error}"));
    }

    /// A WebSocket session after its handshake, on its reader thread: starts the writer, reads and
    /// executes requests until the connection ends, then has the writer close it.
    fn run_session(
        mut ws: WebSocket<ReaderSocket>,
        socket: &Arc<TcpStream>,
        peer: Peer,
        shared: &Arc<Shared>,
    ) -> io::Result<()> {
        let config = &shared.config;
        let (tx, rx) = mpsc::sync_channel(config.queue_size);
        let control = Arc::new(SessionControl::new(config.queue_size));
        let reader = Reader {
            id: peer.id,
            peer,
            shared,
            tx,
            control: Arc::clone(&control),
            behind: Cell::new(None),
        };
        shared
            .broker
            .open_session(reader.id, reader.tx.clone(), Arc::clone(&control));
        // However this thread leaves, a panic included, the session leaves the broker, so that its
        // writer sees the queue disconnect and ends too.
        let _leave_broker = LeaveBrokerOnDrop {
            broker: &shared.broker,
            id: reader.id,
        };
        let writer = match spawn_writer(socket, peer, shared, rx, control) {
            Ok(handle) => {
                reader.control.register_writer(handle.thread().clone());
                handle
            }
            Err(error) => {
                shared.broker.close_session(reader.id);
                close_try_again(socket, shared, &error);
                return Err(error);
            }
        };

        // A request that panics (a bug) ends only its own connection, with close 1011.
        let end = panic::catch_unwind(AssertUnwindSafe(|| read_requests(&mut ws, &reader)))
            .unwrap_or(ReadEnd::Panicked);
        shared.broker.close_session(reader.id);
        if let ReadEnd::Silent = end {
            shared
                .metrics
                .heartbeat_reaps
                .fetch_add(1, Ordering::Relaxed);
        }
        match &end {
            ReadEnd::ProtocolViolation(violation) => {
                log::debug!("{peer}: protocol violation: {violation}")
            }
            end => log::debug!("{peer}: reader done: {end:?}"),
        }
        if let Some((code, reason)) = end.close_reply() {
            // Blocks while the queue is full; the writer drains it or gives up at its write timeout.
            let _ = reader
                .tx
                .send(Outgoing::Reply(Box::new(Reply::Close(code, reason))));
        }
        // The writer may sleep on its queue: woken now, it finds the queue disconnected.
        let control = Arc::clone(&reader.control);
        drop(reader);
        control.wake_for_reply();
        join_quietly(writer);
        match end {
            ReadEnd::Failed(error) => Err(error),
            ReadEnd::Panicked => Err(io::Error::other("a request panicked")),
            _ => Ok(()),
        }
    }

    /// Starts a session's writer thread. Out of line because the reader blocks in its caller's frame
    /// for the whole session: the writer's WebSocket, built here, would otherwise widen that frame,
    /// and every page of stack the reader ever touches stays resident for each connection.
    #[inline(never)]
    fn spawn_writer(
        socket: &Arc<TcpStream>,
        peer: Peer,
        shared: &Arc<Shared>,
        rx: Receiver<Outgoing>,
        control: Arc<SessionControl>,
    ) -> io::Result<JoinHandle<()>> {
        let writer = Writer {
            ws: WebSocket::from_raw_socket(
                WriterSocket::new(
                    socket,
                    shared.config.write_timeout,
                    Some(Arc::clone(&control)),
                ),
                Role::Server,
                // The writer's WebSocket never reads, so its read buffer is as small as tungstenite
                // allows (it is allocated up front, per connection).
                Some(websocket_config(&shared.config).read_buffer_size(0)),
            ),
            rx,
            control,
            peer,
            shared: Arc::clone(shared),
            unflushed: Vec::new(),
        };
        thread::Builder::new()
            .name(format!("ws-writer-{}", peer.id))
            .stack_size(SESSION_STACK_SIZE)
            .spawn(move || writer.run())
    }

    /// Removes a WebSocket session from the broker when dropped.
    struct LeaveBrokerOnDrop<'a> {
        broker: &'a Broker,
        id: u64,
    }

    impl Drop for LeaveBrokerOnDrop<'_> {
        fn drop(&mut self) {
            self.broker.close_session(self.id);
        }
    }

    /// tungstenite's handshake callback: refuses an upgrade from a browser origin that
    /// `CORS_ORIGINS` does not allow with 403, and one without the right API key with 401.
    struct UpgradeAuth<'a> {
        config: &'a Config,
        /// Told that the request head is in once the upgrade is accepted: from then on the
        /// connection is a session, which must never be evicted as one waiting for a head.
        connections: &'a Connections,
        id: u64,
    }

    impl Callback for UpgradeAuth<'_> {
        fn on_request(
            self,
            request: &UpgradeRequest,
            response: UpgradeResponse,
        ) -> Result<UpgradeResponse, ErrorResponse> {
            // Only browsers send Origin; other clients are not subject to it.
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .map(|o| o.to_str().unwrap_or("(not ASCII)"));
            if let Some(origin) = origin.filter(|_| self.config.cors_origins.is_some()) {
                if !self.config.cors_allows(origin) {
                    let message = format!("origin {origin:?} is not in CORS_ORIGINS");
                    let failure =
                        Failure::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message);
                    return Err(failure.to_handshake_response());
                }
            }
            let headers = request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes()));
            let presented = auth::presented_key(headers, request.uri().query());
            if !auth::is_authorized(self.config.api_key.as_deref(), presented) {
                return Err(auth::unauthorized(true).to_handshake_response());
            }
            // Before the 101 goes out: a client may send its next request the moment it has it.
            self.connections.set_awaiting_head(self.id, false);
            let mut response = response;
            response.headers_mut().insert(header::DATE, date_header());
            Ok(response)
        }
    }

    /// What a session's reader thread works with: its connection, the shared state, and the
    /// sending end of the session's queue.
    struct Reader<'a> {
        id: u64,
        peer: Peer,
        shared: &'a Shared,
        tx: SyncSender<Outgoing>,
        control: Arc<SessionControl>,
        /// Set by a publish whose event left a subscriber's writer behind: the reader waits for
        /// it before it reads the next request.
        behind: Cell<Option<Arc<SessionControl>>>,
    }

    /// Why a WebSocket reader stopped.
    #[derive(Debug)]
    enum ReadEnd {
        /// The client sent a Close frame with this code (if any).
        PeerClosed(Option<CloseCode>),
        /// Nothing arrived for two heartbeat intervals.
        Silent,
        /// A message over `MAX_MESSAGE_BYTES`.
        TooBig,
        /// A text frame that is not UTF-8.
        InvalidUtf8,
        /// A violation of RFC 6455 (unmasked frame, bad opcode, fragmented control frame, ...).
        ProtocolViolation(String),
        /// The writer has gone (write timeout or closed socket): nothing more can be sent.
        WriterGone,
        /// The connection dropped (reset, closed without a Close frame).
        Dropped,
        /// Executing a request panicked (a bug; the panic hook logged it).
        Panicked,
        /// Anything else.
        Failed(io::Error),
    }

    impl ReadEnd {
        fn from_error(error: tungstenite::Error) -> ReadEnd {
            use tungstenite::Error;
            match error {
                Error::ConnectionClosed | Error::AlreadyClosed => ReadEnd::Dropped,
                Error::Io(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    ReadEnd::Silent
                }
                Error::Io(e) if is_expected_end(&e) => ReadEnd::Dropped,
                Error::Io(e) => ReadEnd::Failed(e),
                Error::Capacity(_) => ReadEnd::TooBig,
                Error::Utf8(_) => ReadEnd::InvalidUtf8,
                Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ) => ReadEnd::Dropped,
                Error::Protocol(violation) => ReadEnd::ProtocolViolation(violation.to_string()),
                other => ReadEnd::Failed(io::Error::other(other.to_string())),
            }
        }

        /// The Close frame the server sends because of this end, if the peer can still get one.
        fn close_reply(&self) -> Option<(CloseCode, &'static str)> {
            match self {
                // RFC 6455 5.5.1: the endpoint echoes the status code it received.
                ReadEnd::PeerClosed(code) => Some((code.unwrap_or(CloseCode::Normal), "")),
                ReadEnd::Silent => Some((CloseCode::Away, "heartbeat timeout")),
                ReadEnd::TooBig => Some((CloseCode::Size, "message too big")),
                ReadEnd::InvalidUtf8 => Some((CloseCode::Invalid, "invalid UTF-8")),
                ReadEnd::ProtocolViolation(_) => Some((CloseCode::Protocol, "protocol error")),
                ReadEnd::Panicked => Some((CloseCode::Error, "internal error")),
                ReadEnd::WriterGone | ReadEnd::Dropped | ReadEnd::Failed(_) => None,
            }
        }
    }

    /// Reads and answers requests until the connection ends.
    fn read_requests(ws: &mut WebSocket<ReaderSocket>, reader: &Reader<'_>) -> ReadEnd {
        loop {
            let message = match ws.read() {
                Ok(message) => message,
                Err(error) => return ReadEnd::from_error(error),
            };
            let request = match message {
                Message::Text(text) => DataFrame::Text(text),
                Message::Binary(_) => DataFrame::Binary,
                Message::Ping(data) => {
                    if reader
                        .tx
                        .send(Outgoing::Reply(Box::new(Reply::Pong(data))))
                        .is_err()
                    {
                        return ReadEnd::WriterGone;
                    }
                    reader.control.wake_for_reply();
                    continue;
                }
                Message::Close(frame) => return ReadEnd::PeerClosed(frame.map(|f| f.code)),
                _ => continue,
            };
            // A session that is ending executes nothing more; it only waits for its close.
            if !reader.control.begin_request() {
                continue;
            }
            let reply = match request {
                DataFrame::Text(text) => handle_request(&text, reader),
                DataFrame::Binary => {
                    let message =
                        "binary frames are not supported: send each request as a JSON text frame";
                    Some(failure_reply(
                        &Failure::bad_request(message),
                        None,
                        &timestamp(),
                    ))
                }
            };
            // Blocks while the queue is full: a client that sends faster than it reads is slowed
            // down, not cut. The reply of a request the session's cut interrupted still goes out.
            let sent = reply.is_none_or(|reply| reader.tx.send(reply).is_ok());
            reader.control.wake_for_reply();
            reader.control.end_request();
            if !sent {
                return ReadEnd::WriterGone;
            }
            // On a machine with fewer cores than runnable writers, a publisher on a fast
            // connection could otherwise outrun writers whose clients keep up, and have them cut.
            if let Some(writer) = reader.behind.take() {
                writer.wait_until_caught_up(WRITER_WAIT_LIMIT);
            }
        }
    }

    /// A data frame from the client, to execute.
    enum DataFrame {
        Text(Utf8Bytes),
        Binary,
    }

    /// Executes one request and returns the reply to queue, or `None` when the broker has queued it
    /// already (a subscribe ack travels with its replay).
    fn handle_request(text: &str, reader: &Reader<'_>) -> Option<Outgoing> {
        let ts = timestamp();
        let request = match ClientRequest::parse(text) {
            Ok(request) => request,
            Err(rejection) => {
                let failure = Failure::bad_request(rejection.message);
                return Some(failure_reply(
                    &failure,
                    rejection.request_id.as_deref(),
                    &ts,
                ));
            }
        };
        let request_id = request.request_id.as_deref();
        let broker = &reader.shared.broker;
        let ack = |topic, published: Option<&Published>| ServerMessage::Ack {
            request_id,
            status: "ok",
            topic,
            ts: &ts,
            seq: published.map(|p| p.seq),
            duplicate: published.is_some_and(|p| p.duplicate),
        };
        let outcome = match &request.op {
            Operation::Ping => {
                return Some(Outgoing::text(
                    ServerMessage::Pong {
                        request_id,
                        ts: &ts,
                    }
                    .to_frame(),
                ))
            }
            Operation::Subscribe {
                topic,
                client_id,
                replay,
            } => {
                // The reply's place in the queue is taken before the subscription exists, so its
                // live events queue behind it; taking it waits while the queue is full, which
                // paces a client that subscribes faster than it reads, as publishes are paced.
                let slot = SlotFiller(Arc::default());
                let place = Outgoing::Reply(Box::new(Reply::Slot(Arc::clone(&slot.0))));
                if reader.tx.send(place).is_err() {
                    return None;
                }
                let ack = Unfinished::new(&ack(topic, None));
                let mut subscribed = broker.subscribe(reader.id, topic, &ack, replay);
                // A topic created on another instance a moment ago may not be mirrored yet.
                let missing = matches!(subscribed, Err(BrokerError::TopicNotFound));
                if missing && reader.shared.refresh(topic) {
                    subscribed = broker.subscribe(reader.id, topic, &ack, replay);
                }
                let reply = match subscribed {
                    Ok(item) => {
                        log::debug!(
                            "{}: client {client_id:?} subscribed to {topic:?} ({replay:?})",
                            reader.peer
                        );
                        Some(item)
                    }
                    Err(error) => broker_refusal(error, request_id, topic, &ts),
                };
                slot.0.fill(reply);
                return None;
            }
            Operation::Unsubscribe { topic, client_id } => {
                let result = broker.unsubscribe(reader.id, topic);
                if result.is_ok() {
                    log::debug!(
                        "{}: client {client_id:?} unsubscribed from {topic:?}",
                        reader.peer
                    );
                }
                result
                    .map(|()| (topic, None))
                    .map_err(|error| broker_failure(error, topic))
            }
            Operation::Publish { topic, id, payload } => reader
                .shared
                .publish(topic, id, payload)
                .map(|published| (topic, Some(published)))
                .map_err(Some),
        };
        match outcome {
            Ok((topic, mut published)) => {
                let reply = Outgoing::text(ack(topic, published.as_ref()).to_frame());
                reader
                    .behind
                    .set(published.as_mut().and_then(|p| p.behind.take()));
                Some(reply)
            }
            Err(failure) => failure.map(|failure| failure_reply(&failure, request_id, &ts)),
        }
    }

    /// The reply to a request that failed.
    fn failure_reply(failure: &Failure, request_id: Option<&str>, ts: &str) -> Outgoing {
        Outgoing::text(failure.to_frame(request_id, ts))
    }

    /// The reply to a request the broker refused; none once the session has been cut, since its
    /// writer is about to send `SLOW_CONSUMER` and close.
    fn broker_refusal(
        error: BrokerError,
        request_id: Option<&str>,
        topic: &str,
        ts: &str,
    ) -> Option<Outgoing> {
        let failure = broker_failure(error, topic)?;
        Some(failure_reply(&failure, request_id, ts))
    }

    /// What the client is told of a broker refusal: nothing once the session has been cut.
    fn broker_failure(error: BrokerError, topic: &str) -> Option<Failure> {
        (error != BrokerError::SessionEnded).then(|| Failure::from_broker(error, topic))
    }

    /// The reading side of a WebSocket's socket. It writes the handshake response; after that its
    /// writes go nowhere, because tungstenite's automatic pong and close replies must not interleave
    /// with the writer thread's frames: the reader forwards them as [`Outgoing`] items instead.
    struct ReaderSocket {
        socket: Arc<TcpStream>,
        handshake_done: bool,
        /// Bounds the handshake: each read before it is done gets only the time left, so headers
        /// that trickle in cannot stretch it.
        clock: HeadClock,
        /// Bytes of the handshake request read so far.
        received: usize,
    }

    impl Read for ReaderSocket {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.handshake_done {
                return (&*self.socket).read(buf);
            }
            self.socket
                .set_read_timeout(Some(self.clock.remaining(self.received)?))?;
            let n = (&*self.socket).read(buf)?;
            self.received += n;
            Ok(n)
        }
    }

    impl Write for ReaderSocket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.handshake_done {
                Ok(buf.len())
            } else {
                (&*self.socket).write(buf)
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The writer of one WebSocket: the only thread that writes to its socket after the handshake.
    struct Writer {
        ws: WebSocket<WriterSocket>,
        rx: Receiver<Outgoing>,
        control: Arc<SessionControl>,
        peer: Peer,
        shared: Arc<Shared>,
        /// When the live events written since the last flush were accepted ([`Shared::clock_us`]).
        unflushed: Vec<u32>,
    }

    impl Writer {
        /// Writes until the session closes, then drops the TCP connection, which also wakes the
        /// reader if it is still blocked on the socket.
        fn run(mut self) {
            self.control.register_writer(thread::current());
            let socket = Arc::clone(&self.ws.get_ref().socket);
            if let Err(error) = self.write_until_closed() {
                log::debug!("{}: writer stopped: {error}", self.peer);
                // Nothing more can reach the peer: it leaves every topic now, not when its reader
                // notices, and the reader wakes up to end the session.
                self.shared.broker.close_session(self.peer.id);
                let _ = socket.shutdown(Shutdown::Both);
                return;
            }
            // Our Close frame is out (or cannot be sent): no more data from us. The reader sees the
            // client's Close reply or EOF and ends, dropping the last sender.
            let _ = socket.shutdown(Shutdown::Write);
            let deadline = Instant::now() + CLOSE_TIMEOUT;
            while let Ok(_) | Err(RecvTimeoutError::Timeout) = self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if Instant::now() >= deadline {
                    break;
                }
            }
            let _ = socket.shutdown(Shutdown::Both);
        }

        /// Writes queued items in batches, one flush per batch, and a heartbeat every interval.
        /// Returns once a Close frame has been sent or the queue is disconnected.
        fn write_until_closed(&mut self) -> tungstenite::Result<()> {
            let heartbeat = self.shared.config.heartbeat;
            let linger = self.shared.config.write_linger;
            let mut next_heartbeat = Instant::now() + heartbeat;
            loop {
                // One clock read per batch: the queue is tried before waiting on it (a wait with a
                // timeout reads the clock again), and the batch itself takes no time worth counting.
                let now = Instant::now();
                if now >= next_heartbeat {
                    self.ws.write(Message::Ping(Bytes::new()))?;
                    let ts = timestamp();
                    let frame = ServerMessage::Info {
                        topic: None,
                        msg: "ping",
                        ts: &ts,
                    }
                    .to_frame();
                    self.ws.write(Message::Text(frame))?;
                    self.flush()?;
                    next_heartbeat = now + heartbeat;
                }
                let first = match self.rx.try_recv() {
                    Ok(item) => Some(item),
                    Err(TryRecvError::Disconnected) => return Ok(()),
                    Err(TryRecvError::Empty) => {
                        // Asleep, then one last look: whoever queues after that look sees the flag
                        // and wakes this thread. Any wake-up, or the heartbeat, ends the sleep.
                        self.control.set_asleep(true);
                        let item = match self.rx.try_recv() {
                            Ok(item) => Some(item),
                            Err(TryRecvError::Disconnected) => return Ok(()),
                            Err(TryRecvError::Empty) => {
                                if self.control.ending() == Ending::Open {
                                    thread::park_timeout(
                                        next_heartbeat.saturating_duration_since(now),
                                    );
                                }
                                None
                            }
                        };
                        self.control.set_asleep(false);
                        item
                    }
                };
                if let Some(item) = first {
                    if self.write_item(item)? || self.write_ready()? {
                        return Ok(());
                    }
                    let events = self.unflushed.len();
                    self.flush()?;
                    // A lone event is never held back: only a batch says that more are coming.
                    if events >= 2 && !linger.is_zero() {
                        self.control.linger(linger);
                    }
                }
                let ending = self.control.ending();
                if ending != Ending::Open {
                    return self.finish(ending);
                }
            }
        }

        /// Writes every item already queued, without flushing; returns true once a Close frame
        /// has been sent or the queue is disconnected.
        fn write_ready(&mut self) -> tungstenite::Result<bool> {
            loop {
                match self.rx.try_recv() {
                    Ok(item) => {
                        if self.write_item(item)? {
                            return Ok(true);
                        }
                    }
                    Err(TryRecvError::Empty) => return Ok(false),
                    Err(TryRecvError::Disconnected) => {
                        self.flush()?;
                        return Ok(true);
                    }
                }
            }
        }

        /// Ends a session whose ending has been seen: writes everything queued before it, and the
        /// reply of a request the reader was executing when it came, then the last message
        /// (`SLOW_CONSUMER` or `server_shutdown`) and the Close frame. The ending was read before
        /// this drain starts, and nothing is queued for the session by the broker after it, so an
        /// empty queue with the reader idle means every event the session was sent is out.
        fn finish(&mut self, ending: Ending) -> tungstenite::Result<()> {
            /// How long the writer waits at a time for the reply of an executing request.
            const REPLY_POLL: Duration = Duration::from_millis(1);
            loop {
                let reader_idle = !self.control.is_executing();
                if self.write_ready()? {
                    return Ok(());
                }
                if reader_idle {
                    break;
                }
                self.flush()?;
                match self.rx.recv_timeout(REPLY_POLL) {
                    Ok(item) => {
                        if self.write_item(item)? {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let ts = timestamp();
            let (frame, code, reason) = match ending {
                Ending::SlowConsumer => {
                    let message = format!(
                    "outbound queue full (QUEUE_SIZE={}): every subscription of this connection was \
                     removed; events up to this message were delivered, none after; resubscribe \
                     with since_seq and epoch to resume",
                    self.shared.config.queue_size
                );
                    let failure = Failure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::SlowConsumer,
                        message,
                    );
                    let frame = failure.to_cut_frame(self.control.cut_position(), &ts);
                    (frame, CloseCode::Policy, "slow consumer")
                }
                Ending::Open => return self.close(CloseCode::Normal, ""),
                Ending::ShuttingDown => {
                    let frame = ServerMessage::Info {
                        topic: None,
                        msg: "server_shutdown",
                        ts: &ts,
                    }
                    .to_frame();
                    (frame, CloseCode::Away, "server shutdown")
                }
            };
            self.ws.write(Message::Text(frame))?;
            self.close(code, reason)
        }

        /// Encodes one item; returns true once a Close frame has been sent.
        fn write_item(&mut self, item: Outgoing) -> tungstenite::Result<bool> {
            match item {
                Outgoing::Event(event) => {
                    self.ws.write(Message::Text(event.frame.clone()))?;
                    self.unflushed.push(event.accepted_us);
                }
                Outgoing::Reply(reply) => match *reply {
                    Reply::Text(frame) => self.ws.write(Message::Text(frame))?,
                    Reply::Batch(frames) => {
                        for frame in frames {
                            self.ws.write(Message::Text(frame))?;
                        }
                    }
                    Reply::Pong(data) => self.ws.write(Message::Pong(data))?,
                    Reply::Slot(slot) => {
                        if let Some(item) = slot.take() {
                            return self.write_item(item);
                        }
                    }
                    Reply::Close(code, reason) => {
                        self.close(code, reason)?;
                        return Ok(true);
                    }
                },
                Outgoing::Wake => {}
            }
            Ok(false)
        }

        /// Sends everything written so far, then records how long its live events took since
        /// their publish was accepted.
        fn flush(&mut self) -> tungstenite::Result<()> {
            self.ws.flush()?;
            if !self.unflushed.is_empty() {
                self.control.count_written(self.unflushed.len());
                let now_us = self.shared.clock_us();
                let mut batch = LatencyBatch::default();
                for accepted_us in self.unflushed.drain(..) {
                    batch.record(now_us.wrapping_sub(accepted_us));
                }
                self.shared.metrics.publish_to_write.add(&batch);
            }
            Ok(())
        }

        fn close(&mut self, code: CloseCode, reason: &'static str) -> tungstenite::Result<()> {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            match self.ws.close(Some(frame)) {
                Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
                Err(error) => Err(error),
            }
        }
    }

    /// The writing side of a WebSocket's socket, owned by the writer thread. It never reads.
    struct WriterSocket {
        socket: Arc<TcpStream>,
        /// `WRITE_TIMEOUT_SEC`: how long one buffer may take to be taken whole by the kernel.
        timeout: Duration,
        /// Since when the buffer being written has been only partly taken. A peer that reads a
        /// little now and then makes every single write return within the timeout; the limit
        /// holds for the whole of a blocked write only because its start is remembered here.
        stalled_since: Option<Instant>,
        /// The session told when the writer is inside a socket write, if there is one.
        control: Option<Arc<SessionControl>>,
    }

    impl WriterSocket {
        fn new(
            socket: &Arc<TcpStream>,
            timeout: Duration,
            control: Option<Arc<SessionControl>>,
        ) -> WriterSocket {
            WriterSocket {
                socket: Arc::clone(socket),
                timeout,
                stalled_since: None,
                control,
            }
        }

        fn write_to_socket(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(control) = &self.control {
                control.set_in_write(true);
            }
            let written = (&*self.socket).write(buf);
            if let Some(control) = &self.control {
                control.set_in_write(false);
            }
            written
        }
    }

    impl Read for WriterSocket {
        fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the writer never reads",
            ))
        }
    }

    impl Write for WriterSocket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(since) = self.stalled_since {
                let left = (since + self.timeout).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write timed out: blocked for WRITE_TIMEOUT_SEC",
                    ));
                }
                self.socket.set_write_timeout(Some(left))?;
            }
            let started = Instant::now();
            let written = match self.write_to_socket(buf) {
                // SO_SNDTIMEO expired: the kernel reports it as EAGAIN.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write timed out: blocked for WRITE_TIMEOUT_SEC",
                    ))
                }
                other => other?,
            };
            if written < buf.len() {
                // The stall began when this call did: it may have blocked for most of the timeout
                // before the kernel took part of the buffer.
                self.stalled_since.get_or_insert(started);
            } else if self.stalled_since.take().is_some() {
                self.socket.set_write_timeout(Some(self.timeout))?;
            }
            Ok(written)
        }

        fn flush(&mut self) -> io::Result<()> {
            (&*self.socket).flush()
        }
    }
}

mod rest_proxy {
    //! The hand-off of REST requests to tiny_http, which cannot adopt a socket it did not accept:
    //! a [`RequestPump`] reads each request whole and checked (head limits, framing, body size),
    //! and [`RestBackends`] relays it over a pool of unix connections to tiny_http and the answer
    //! back.
    //!
    //! Owns: request framing and the pool. Must never: forward an ambiguous or partial request, or
    //! let one client's answer reach another.

    use std::io::{self, Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixStream};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    use tungstenite::http::StatusCode;

    use super::config::Config;
    use super::dispatch::{origin_form, send_failure, HeadClock, MAX_HEADERS, MAX_HEAD_BYTES};
    use super::protocol::{ErrorCode, Failure};
    use super::state::{Connections, Peer, Shared};

    /// How long a REST keep-alive connection may stay silent before it is closed.
    const REST_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    /// Serves a REST connection through tiny_http. tiny_http only serves connections it accepts
    /// itself and cannot adopt a socket we accepted, so it listens on a private unix socket. This
    /// thread reads the client's requests one at a time, each checked and whole (see
    /// [`RequestPump`]), has tiny_http answer each on one of the [`RestBackends`], and writes the
    /// answer back before reading the next request, so answers keep the order of requests.
    pub(crate) fn proxy_to_rest(
        client: &Arc<TcpStream>,
        peer: Peer,
        shared: &Shared,
        first_clock: HeadClock,
    ) -> io::Result<()> {
        let mut pump = RequestPump {
            client,
            buf: Vec::new(),
            config: &shared.config,
            connections: &shared.connections,
            id: peer.id,
        };
        let mut clock = Some(first_clock);
        let result = loop {
            let request = match pump.next_request(clock.take()) {
                Ok(Some(request)) => request,
                Ok(None) => break Ok(()),
                Err(PumpEnd::Refused(failure)) => {
                    log::debug!("{peer}: REST request refused: {}", failure.message);
                    break send_failure(client, &failure);
                }
                Err(PumpEnd::Failed(error)) => {
                    if error.kind() == io::ErrorKind::TimedOut {
                        shared.slow_heads.record("REST request too slow");
                    }
                    break Err(error);
                }
            };
            let answer = match shared.rest_backends.exchange(&request) {
                Ok(answer) => answer,
                // The error ends the connection, and is logged with its end.
                Err(error) => {
                    let message = "the request could not be served; retry later";
                    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
                    let _ = send_failure(
                        client,
                        &Failure::new(unavailable, ErrorCode::Internal, message),
                    );
                    break Err(error);
                }
            };
            (&**client).write_all(&answer.for_client(request.close_after))?;
            if request.close_after {
                break Ok(());
            }
            shared.connections.set_awaiting_head(peer.id, true);
        };
        let _ = client.shutdown(Shutdown::Both);
        result
    }

    /// One checked request, ready for tiny_http.
    struct ForwardedRequest {
        bytes: Vec<u8>,
        /// A `HEAD` request, whose answer has a `Content-Length` but no body.
        is_head: bool,
        /// The client asked to close after this request (`Connection: close`, or HTTP/1.0
        /// without `keep-alive`).
        close_after: bool,
    }

    /// Why the request pump stopped.
    #[derive(Debug)]
    enum PumpEnd {
        /// A request the server answers itself with this error, then closes the connection.
        Refused(Failure),
        /// The client went away, fell silent or sent half a request: close quietly.
        Failed(io::Error),
    }

    impl From<io::Error> for PumpEnd {
        fn from(error: io::Error) -> PumpEnd {
            PumpEnd::Failed(error)
        }
    }

    impl From<Failure> for PumpEnd {
        fn from(failure: Failure) -> PumpEnd {
            PumpEnd::Refused(failure)
        }
    }

    /// How a request's body is delimited (RFC 9112 6.3).
    enum BodyFraming {
        Length(usize),
        Chunked,
    }

    /// Reads a REST client's requests one at a time and forwards each to tiny_http whole, head and
    /// body, once it has checked it: a head of at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`],
    /// HTTP/1.0 or 1.1, unambiguous framing (one `Content-Length`, or `Transfer-Encoding: chunked`
    /// alone; RFC 9112 6.3 calls anything else a smuggling risk) and a body within
    /// `MAX_MESSAGE_BYTES`. Whole requests mean a tiny_http worker never waits on a slow client,
    /// and a client that trickles a request is cut at `HANDSHAKE_TIMEOUT_SEC`.
    struct RequestPump<'a> {
        client: &'a TcpStream,
        /// Bytes read from the client and not yet forwarded.
        buf: Vec<u8>,
        config: &'a Config,
        /// Told when a request head is complete, so the connection can no longer be evicted.
        connections: &'a Connections,
        id: u64,
    }

    impl RequestPump<'_> {
        /// The next request, or `None` when the client closes between requests.
        /// Reads the next request, its head timed by `clock` when given (the first request's,
        /// which started with the connection).
        fn next_request(
            &mut self,
            clock: Option<HeadClock>,
        ) -> Result<Option<ForwardedRequest>, PumpEnd> {
            let clock = match clock {
                Some(clock) => clock,
                None => {
                    // Waiting for the next request on a keep-alive connection may take a while;
                    // once it has begun, it must arrive within the handshake timeout.
                    self.client.set_read_timeout(Some(REST_IDLE_TIMEOUT))?;
                    if self.buf.is_empty() && !self.fill()? {
                        return Ok(None);
                    }
                    HeadClock::start(self.config.handshake_timeout)
                }
            };
            self.read_request(clock).map(Some)
        }

        /// Reads one whole request: the head as fast as [`HeadClock`] asks, then the body within
        /// the handshake timeout from when the request was awaited.
        fn read_request(&mut self, mut clock: HeadClock) -> Result<ForwardedRequest, PumpEnd> {
            let deadline = clock.awaited + clock.limit;
            let (head_len, head, framing, expects_continue, close_after, is_head) = loop {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&self.buf) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let (framing, expects_continue) = self.framing(request.headers)?;
                        // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing
                        // that may have fooled something on the way; the connection ends with it.
                        let close_after = wants_close(request.version, request.headers)
                            || request.version == Some(0)
                                && matches!(framing, BodyFraming::Chunked);
                        let is_head = request.method == Some("HEAD");
                        let head = forwarded_head(&request);
                        break (
                            head_len,
                            head,
                            framing,
                            expects_continue,
                            close_after,
                            is_head,
                        );
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(head_too_large())
                    }
                    Ok(httparse::Status::Partial) => {
                        let remaining = clock.remaining(self.buf.len())?;
                        self.fill_before(Instant::now() + remaining)?
                    }
                    Err(httparse::Error::TooManyHeaders) => return Err(head_too_large()),
                    Err(httparse::Error::Version) if names_another_http_version(&self.buf) => {
                        let message = "only HTTP/1.0 and HTTP/1.1 are served here";
                        return Err(PumpEnd::from(Failure::new(
                            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                            ErrorCode::BadRequest,
                            message,
                        )));
                    }
                    Err(error) => {
                        let message = format!("malformed request head: {error}");
                        return Err(PumpEnd::from(Failure::bad_request(message)));
                    }
                }
            };
            if head_len > MAX_HEAD_BYTES {
                return Err(head_too_large());
            }
            self.connections.set_awaiting_head(self.id, false);
            // tiny_http drops a connection whose head is not ASCII without an answer.
            if !self.buf[..head_len].is_ascii() {
                let message = "the request line and headers must be ASCII";
                return Err(PumpEnd::from(Failure::bad_request(message)));
            }
            if expects_continue && self.buf.len() == head_len {
                self.client_write(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            // tiny_http gets every body with a Content-Length: it leaves a chunked body that no
            // handler reads on the connection, to be parsed as the next request.
            let (body, wire_len) = match framing {
                BodyFraming::Length(length) => {
                    self.fill_to(head_len + length, deadline)?;
                    (self.buf[head_len..head_len + length].to_vec(), length)
                }
                BodyFraming::Chunked => self.chunked_body(head_len, deadline)?,
            };
            let mut bytes = head;
            append_header(
                &mut bytes,
                "Content-Length",
                body.len().to_string().as_bytes(),
            );
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&body);
            self.buf.drain(..head_len + wire_len);
            Ok(ForwardedRequest {
                bytes,
                is_head,
                close_after,
            })
        }

        /// The body's framing from the headers, and whether the client waits for `100 Continue`.
        fn framing(
            &self,
            headers: &[httparse::Header<'_>],
        ) -> Result<(BodyFraming, bool), PumpEnd> {
            let max = self.config.max_message_bytes;
            let bad = |message: &str| PumpEnd::from(Failure::bad_request(message));
            let values = |name: &'static str| {
                headers
                    .iter()
                    .filter(move |h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value.trim_ascii())
            };
            let lengths: Vec<&[u8]> = values("Content-Length").collect();
            let encodings: Vec<&[u8]> = values("Transfer-Encoding").collect();
            let expects_continue = match values("Expect").next() {
                None => false,
                Some(expect) if expect.eq_ignore_ascii_case(b"100-continue") => true,
                Some(_) => {
                    let message = "only `Expect: 100-continue` is supported";
                    return Err(PumpEnd::from(Failure::new(
                        StatusCode::EXPECTATION_FAILED,
                        ErrorCode::BadRequest,
                        message,
                    )));
                }
            };
            let framing = match (lengths.as_slice(), encodings.as_slice()) {
                ([], []) => BodyFraming::Length(0),
                ([], [encoding]) if encoding.eq_ignore_ascii_case(b"chunked") => {
                    BodyFraming::Chunked
                }
                ([], _) => return Err(bad("Transfer-Encoding must be exactly `chunked`")),
                (_, [_, ..]) => {
                    return Err(bad(
                        "Content-Length and Transfer-Encoding together are ambiguous",
                    ))
                }
                ([length], []) => {
                    let length = std::str::from_utf8(length)
                        .ok()
                        .filter(|digits| {
                            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
                        })
                        .and_then(|digits| digits.parse::<u64>().ok())
                        .ok_or_else(|| bad("Content-Length must be a number"))?;
                    match usize::try_from(length) {
                        Ok(length) if length <= max => BodyFraming::Length(length),
                        _ => return Err(PumpEnd::from(Failure::too_large(max))),
                    }
                }
                (_, []) => return Err(bad("more than one Content-Length")),
            };
            Ok((framing, expects_continue))
        }

        /// Reads a chunked body (RFC 9112 7.1) that starts at `start` until its last chunk and
        /// trailers; returns it decoded, and its length on the wire. The sum of its chunks counts
        /// against `MAX_MESSAGE_BYTES`. Chunk extensions and trailers are dropped.
        fn chunked_body(
            &mut self,
            start: usize,
            deadline: Instant,
        ) -> Result<(Vec<u8>, usize), PumpEnd> {
            let max = self.config.max_message_bytes;
            let bad = |message: &str| PumpEnd::from(Failure::bad_request(message));
            // The chunk lines, extensions and trailers around the data are held until the body
            // ends, so they count too: twice the data allowed, and a head's worth, is plenty for
            // chunks of a dozen bytes or more.
            let wire_max = max.saturating_mul(2).saturating_add(MAX_HEAD_BYTES);
            let too_long = || {
                let message = format!("chunked body over {wire_max} bytes on the wire");
                PumpEnd::from(Failure::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    message,
                ))
            };
            let (mut at, mut total) = (start, 0usize);
            let mut body = Vec::new();
            loop {
                if at - start > wire_max {
                    return Err(too_long());
                }
                let line_end = self.line_end(at, deadline)?;
                let line = &self.buf[at..line_end - 2];
                // RFC 9112 7.1: hex digits, then optional whitespace and `;extensions`.
                let (size, extensions) =
                    line.split_at(line.iter().position(|&b| b == b';').unwrap_or(line.len()));
                if extensions.iter().any(|&b| b == b'\r' || b == b'\n') {
                    return Err(bad("a chunk line holds a line break"));
                }
                let size = size.trim_ascii_end();
                let size = std::str::from_utf8(size)
                    .ok()
                    .filter(|hex| {
                        (1..=8).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
                    })
                    .and_then(|hex| usize::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| bad("malformed chunk size"))?;
                total = total.saturating_add(size);
                if total > max {
                    return Err(PumpEnd::from(Failure::too_large(max)));
                }
                at = line_end;
                if size == 0 {
                    // Trailer lines, then the empty line that ends the message.
                    loop {
                        if at - start > wire_max {
                            return Err(too_long());
                        }
                        let line_end = self.line_end(at, deadline)?;
                        let empty = line_end - at == 2;
                        at = line_end;
                        if empty {
                            return Ok((body, at - start));
                        }
                    }
                }
                self.fill_to(at + size + 2, deadline)?;
                if &self.buf[at + size..at + size + 2] != b"\r\n" {
                    return Err(bad("a chunk does not end with CRLF"));
                }
                body.extend_from_slice(&self.buf[at..at + size]);
                at += size + 2;
            }
        }

        /// The end (after CRLF) of the line starting at `at`, reading as needed; lines in a
        /// chunked body are short, so one longer than 4 KiB is refused.
        fn line_end(&mut self, at: usize, deadline: Instant) -> Result<usize, PumpEnd> {
            loop {
                if let Some(end) = self.buf[at..].windows(2).position(|pair| pair == b"\r\n") {
                    return Ok(at + end + 2);
                }
                if self.buf.len() - at > 4096 {
                    let message = "chunk line longer than 4 KiB";
                    return Err(PumpEnd::from(Failure::bad_request(message)));
                }
                self.fill_before(deadline)?;
            }
        }

        fn fill_to(&mut self, len: usize, deadline: Instant) -> Result<(), PumpEnd> {
            while self.buf.len() < len {
                self.fill_before(deadline)?;
            }
            Ok(())
        }

        /// Reads more before the deadline; the end of the stream in the middle of a request is
        /// an error (the half request is dropped, never executed).
        fn fill_before(&mut self, deadline: Instant) -> Result<(), PumpEnd> {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request not received in time",
                )
                .into());
            }
            self.client.set_read_timeout(Some(remaining))?;
            if self.fill()? {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request",
                )
                .into())
            }
        }

        /// Appends what the client has sent; false at the end of the stream.
        fn fill(&mut self) -> io::Result<bool> {
            let mut chunk = [0u8; 8192];
            let n = (&*self.client).read(&mut chunk)?;
            self.buf.extend_from_slice(&chunk[..n]);
            Ok(n > 0)
        }

        fn client_write(&self, bytes: &[u8]) -> io::Result<()> {
            (&*self.client).write_all(bytes)
        }
    }

    /// The head as tiny_http gets it, rebuilt from what httparse read (so a line ending in a bare
    /// LF reaches tiny_http as CRLF), without the final empty line: the pump appends the
    /// `Content-Length` of the body it forwards, which replaces the client's framing headers. Also
    /// without `Expect` (tiny_http would answer `100-continue` only once a handler reads the body,
    /// which is forwarded whole, so the pump answers it) and the client's hop-by-hop headers, and
    /// with `Connection: keep-alive`, since the connection to tiny_http is the pool's (see
    /// [`RestBackends`]), not the client's. (`TE` would let a client ask for a chunked answer,
    /// which [`ask`] does not read.)
    fn forwarded_head(request: &httparse::Request<'_, '_>) -> Vec<u8> {
        let mut rebuilt = format!(
            "{} {} HTTP/1.{}\r\n",
            request.method.unwrap_or_default(),
            origin_form(request.path.unwrap_or_default()),
            request.version.unwrap_or(1)
        )
        .into_bytes();
        let dropped = |h: &&httparse::Header<'_>| {
            [
                "Expect",
                "Connection",
                "Keep-Alive",
                "TE",
                "Content-Length",
                "Transfer-Encoding",
            ]
            .iter()
            .any(|name| h.name.eq_ignore_ascii_case(name))
        };
        for header in request.headers.iter().filter(|h| !dropped(h)) {
            append_header(&mut rebuilt, header.name, header.value);
        }
        append_header(&mut rebuilt, "Connection", b"keep-alive");
        rebuilt
    }

    /// Whether a request line ends in a well-formed version other than 1.0 and 1.1, such as
    /// `HTTP/2.0` (505); anything else that httparse calls a bad version is a malformed line (400).
    fn names_another_http_version(head: &[u8]) -> bool {
        let line = head
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let words: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        matches!(words.as_slice(), [_, _, version]
        if version.len() == 8
            && version.starts_with(b"HTTP/")
            && version[5].is_ascii_digit()
            && version[6] == b'.'
            && version[7].is_ascii_digit())
    }

    /// Whether the client wants the connection closed after this request (RFC 9112 9.3).
    fn wants_close(version: Option<u8>, headers: &[httparse::Header<'_>]) -> bool {
        let tokens = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .map(|token| token.trim_ascii().to_ascii_lowercase())
            .collect::<Vec<_>>();
        let has = |token: &[u8]| tokens.iter().any(|t| t == token);
        has(b"close") || (version == Some(0) && !has(b"keep-alive"))
    }

    fn head_too_large() -> PumpEnd {
        let message =
            format!("request head larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers");
        PumpEnd::from(Failure::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::BadRequest,
            message,
        ))
    }

    /// How many keep-alive connections to tiny_http the REST hand-off holds: more than the
    /// [`REST_WORKERS`](crate::REST_WORKERS) that answer, so that the next requests are parsed while they work.
    const REST_BACKENDS: usize = 4;

    /// The unix connections to tiny_http, each carrying one request at a time and reused (a fresh
    /// connection per request cost 62 µs of CPU more than tiny_http alone; reused, 25 µs). They
    /// are opened one at a time, each
    /// confirmed served before the next: tiny_http 0.12's thread pool counts its idle threads
    /// racily and can queue a new connection behind long-lived ones with no thread free to take
    /// it, forever. The answer is read whole before the connection goes back to the pool, so a
    /// client that reads slowly holds only its own thread.
    pub(crate) struct RestBackends {
        addr: UnixSocketAddr,
        pool: Mutex<BackendPool>,
        returned: Condvar,
    }

    #[derive(Default)]
    struct BackendPool {
        idle: Vec<UnixStream>,
        /// Connections open, idle or in use.
        open: usize,
        /// A connection is being opened and confirmed (one at a time).
        opening: bool,
    }

    /// A connection taken from the pool.
    struct Backend {
        stream: UnixStream,
        /// Used before, so tiny_http may have closed it since.
        reused: bool,
    }

    /// tiny_http's whole answer to one request.
    struct BackendAnswer {
        /// The status line and headers, without `Connection` and without the final empty line.
        head: Vec<u8>,
        body: Vec<u8>,
    }

    impl BackendAnswer {
        /// The answer as the client gets it, its `Connection` header saying what the client asked.
        fn for_client(&self, close_after: bool) -> Vec<u8> {
            let mut bytes = Vec::with_capacity(self.head.len() + self.body.len() + 24);
            bytes.extend_from_slice(&self.head);
            if close_after {
                append_header(&mut bytes, "Connection", b"close");
            }
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&self.body);
            bytes
        }
    }

    /// What a new connection to tiny_http asks first: an answer proves that a thread of
    /// tiny_http's pool serves it (`rest::handle_rest` answers it without counting it).
    const BACKEND_PROBE: &[u8] = b"OPTIONS * HTTP/1.1\r\n\r\n";

    impl RestBackends {
        /// A pool for tiny_http at `addr`, with no connection open yet.
        pub(crate) fn new(addr: UnixSocketAddr) -> RestBackends {
            RestBackends {
                addr,
                pool: Mutex::default(),
                returned: Condvar::new(),
            }
        }

        /// Opens every connection of the pool (the REST workers must be running), so that the
        /// server's descriptors and threads stay the same from start-up on.
        pub(crate) fn open_all(&self) -> io::Result<()> {
            let opened = (0..REST_BACKENDS)
                .map(|_| self.checkout())
                .collect::<io::Result<Vec<_>>>()?;
            for backend in opened {
                self.checkin(Some(backend.stream));
            }
            Ok(())
        }

        /// Has tiny_http answer `request`. A reused connection that tiny_http has closed since
        /// (it closes after a request it cannot parse) fails before a byte of answer; the request
        /// never ran, so it is sent again on another connection.
        fn exchange(&self, request: &ForwardedRequest) -> io::Result<BackendAnswer> {
            loop {
                let backend = self.checkout()?;
                match ask(&backend.stream, &request.bytes, request.is_head) {
                    Ok(Some(answer)) => {
                        self.checkin(Some(backend.stream));
                        return Ok(answer);
                    }
                    Ok(None) if backend.reused => self.checkin(None),
                    Ok(None) => {
                        self.checkin(None);
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tiny_http closed without answering",
                        ));
                    }
                    Err(error) => {
                        self.checkin(None);
                        return Err(error);
                    }
                }
            }
        }

        fn lock(&self) -> MutexGuard<'_, BackendPool> {
            self.pool.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// An idle connection, or a new one while the pool has room, or the next one returned.
        fn checkout(&self) -> io::Result<Backend> {
            let mut pool = self.lock();
            loop {
                if let Some(stream) = pool.idle.pop() {
                    drop(pool);
                    if is_quiet(&stream) {
                        return Ok(Backend {
                            stream,
                            reused: true,
                        });
                    }
                    self.checkin(None);
                    pool = self.lock();
                    continue;
                }
                if pool.open < REST_BACKENDS && !pool.opening {
                    pool.opening = true;
                    drop(pool);
                    let opened = self.open();
                    pool = self.lock();
                    pool.opening = false;
                    pool.open += usize::from(opened.is_ok());
                    self.returned.notify_all();
                    return opened.map(|stream| Backend {
                        stream,
                        reused: false,
                    });
                }
                let (guard, timeout) = self
                    .returned
                    .wait_timeout(pool, REST_IDLE_TIMEOUT)
                    .unwrap_or_else(PoisonError::into_inner);
                pool = guard;
                if timeout.timed_out() && pool.idle.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection to tiny_http came free",
                    ));
                }
            }
        }

        /// Gives a connection back, or `None` for one that is closed or out of step.
        fn checkin(&self, stream: Option<UnixStream>) {
            let mut pool = self.lock();
            match stream {
                Some(stream) => pool.idle.push(stream),
                None => pool.open -= 1,
            }
            self.returned.notify_one();
        }

        fn open(&self) -> io::Result<UnixStream> {
            let stream = UnixStream::connect_addr(&self.addr)?;
            stream.set_read_timeout(Some(REST_IDLE_TIMEOUT))?;
            match ask(&stream, BACKEND_PROBE, false)? {
                Some(_) => Ok(stream),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tiny_http closed a new connection",
                )),
            }
        }
    }

    /// Whether an idle connection to tiny_http has nothing to read. Bytes there would be an answer
    /// to no request of ours, which would shift every later answer on it to the wrong client
    /// (tiny_http can be made to see two requests in one, as a chunked body it did not read once
    /// made it); the end of the stream means tiny_http closed it. Either way it is replaced.
    fn is_quiet(stream: &UnixStream) -> bool {
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let waiting = (&*stream).read(&mut [0u8; 1]);
        let blocking_again = stream.set_nonblocking(false).is_ok();
        match waiting {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => blocking_again,
            Ok(0) => {
                log::debug!("tiny_http closed an idle connection: replacing it");
                false
            }
            _ => {
                log::warn!(
                    "an idle connection to tiny_http held an answer to no request: replacing it"
                );
                false
            }
        }
    }

    /// Sends one request on `backend` and reads tiny_http's answer whole: `None` if the
    /// connection turns out closed before a byte of it.
    fn ask(
        backend: &UnixStream,
        request: &[u8],
        is_head: bool,
    ) -> io::Result<Option<BackendAnswer>> {
        let closed = |error: &io::Error| {
            matches!(
                error.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            )
        };
        match (&*backend).write_all(request) {
            Err(error) if closed(&error) => return Ok(None),
            result => result?,
        }
        let (mut buf, mut received) = (Vec::new(), false);
        let (head, head_len, body_len) = loop {
            if received {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut response = httparse::Response::new(&mut headers);
                match response.parse(&buf) {
                    // An interim answer (RFC 9110 15.2) is not relayed: the final one follows.
                    Ok(httparse::Status::Complete(head_len))
                        if matches!(response.code, Some(100..=199)) =>
                    {
                        buf.drain(..head_len);
                        continue;
                    }
                    Ok(httparse::Status::Complete(head_len)) => {
                        break answer_head(&buf, &response, head_len, is_head)?;
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
                    _ => {
                        return Err(io::Error::other(
                            "tiny_http answered with an unreadable head",
                        ))
                    }
                }
            }
            let mut chunk = [0u8; 8192];
            let n = match (&*backend).read(&mut chunk) {
                Ok(0) if !received => return Ok(None),
                Err(error) if !received && closed(&error) => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tiny_http closed in the middle of an answer",
                    ))
                }
                result => result?,
            };
            buf.extend_from_slice(&chunk[..n]);
            received = true;
        };
        let end = head_len + body_len;
        buf.reserve(end.saturating_sub(buf.len()));
        while buf.len() < end {
            let mut chunk = [0u8; 8192];
            let n = (&*backend).read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tiny_http closed in the middle of an answer",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if buf.len() > end {
            return Err(io::Error::other(
                "tiny_http answered more than it announced",
            ));
        }
        buf.drain(..head_len);
        Ok(Some(BackendAnswer { head, body: buf }))
    }

    /// A final answer's head as the client gets it (without `Connection`), with where its body
    /// starts and how long it is.
    fn answer_head(
        buf: &[u8],
        response: &httparse::Response<'_, '_>,
        head_len: usize,
        is_head: bool,
    ) -> io::Result<(Vec<u8>, usize, usize)> {
        let body_len = if is_head || matches!(response.code, Some(204 | 304)) {
            0
        } else {
            content_length(response.headers)
                .ok_or_else(|| io::Error::other("tiny_http answered without a Content-Length"))?
        };
        let status_line_end = buf
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .map_or(0, |end| end + 2);
        let mut head = buf[..status_line_end].to_vec();
        for header in response
            .headers
            .iter()
            .filter(|h| !h.name.eq_ignore_ascii_case("Connection"))
        {
            append_header(&mut head, header.name, header.value);
        }
        // RFC 9110 15.5.22: a 426 names the protocol to upgrade to. tiny_http refuses to send an
        // `Upgrade` header, and the only 426 is `/ws`'s, so it is added here.
        if response.code == Some(426) {
            append_header(&mut head, "Upgrade", b"websocket");
        }
        Ok((head, head_len, body_len))
    }

    fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
        let header = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("Content-Length"))?;
        std::str::from_utf8(header.value).ok()?.trim().parse().ok()
    }

    fn append_header(head: &mut Vec<u8>, name: &str, value: &[u8]) {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::io;
        use std::os::unix::net::UnixStream;
        use std::time::{Duration, Instant};

        #[test]
        fn an_idle_backend_with_bytes_waiting_or_closed_is_not_quiet() {
            let (ours, theirs) = UnixStream::pair().unwrap();
            assert!(is_quiet(&ours), "nothing sent yet");
            (&theirs).write_all(b"H").unwrap();
            assert!(!is_quiet(&ours), "a byte waiting");
            let (ours, theirs) = UnixStream::pair().unwrap();
            drop(theirs);
            assert!(!is_quiet(&ours), "closed");
            // Still blocking after the check: a read waits (here, up to its timeout).
            let (ours, _theirs) = UnixStream::pair().unwrap();
            assert!(is_quiet(&ours));
            ours.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let started = Instant::now();
            let error = (&ours).read(&mut [0u8; 1]).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "{error}");
            assert!(
                started.elapsed() >= Duration::from_millis(15),
                "did not wait"
            );
        }
    }
}

mod rest {
    //! The REST routes and their handlers, run by tiny_http's workers: topics, history and HTTP
    //! publish, health, stats, the Prometheus `/metrics`, CORS, and the console page.
    //!
    //! Owns: routing and the shape of REST answers. Must never: take the broker lock for longer
    //! than one broker call, or answer without counting the request in `/metrics`.

    use std::borrow::Cow;
    use std::fmt::Write as _;
    use std::io::Read;
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::PoisonError;

    use serde::{Deserialize, Serialize};
    use serde_json::value::RawValue;
    use tungstenite::http::StatusCode;

    use super::auth;
    use super::broker::{self, BrokerError};
    use super::console::CONSOLE_HTML;
    use super::protocol::{
        check_payload, is_valid_topic_name, parse_object, required_message_id, required_string,
        ErrorCode, Failure, RawMessage, TOPIC_NAME_RULE,
    };
    use super::state::{Shared, LATENCY_BUCKETS_US};

    /// Serves REST requests that tiny_http has parsed, until shutdown unblocks it.
    pub(crate) fn run_rest_worker(server: &tiny_http::Server, shared: &Shared) {
        while let Ok(request) = server.recv() {
            handle_rest(request, shared);
        }
    }

    /// A REST answer: status, body and its type, and any extra headers.
    #[derive(Debug)]
    struct RestReply {
        status: u16,
        body: String,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
    }

    const JSON: &str = "application/json";

    /// The Prometheus text exposition format, version 0.0.4.
    const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

    const HTML: &str = "text/html; charset=utf-8";

    /// The REST API as OpenAPI 3.1, served at `GET /openapi.json` as it is in the repository.
    const OPENAPI: &str = include_str!("docs/openapi.json");

    /// The WebSocket protocol as AsyncAPI 3.0, served at `GET /asyncapi.json`.
    const ASYNCAPI: &str = include_str!("docs/asyncapi.json");

    impl RestReply {
        fn json(status: u16, body: String) -> RestReply {
            RestReply {
                status,
                body,
                content_type: JSON,
                headers: Vec::new(),
            }
        }

        /// A failure's answer; a 405 names the methods `allow`ed (RFC 9110 15.5.6).
        fn failure(failure: &Failure, allow: Option<&str>) -> RestReply {
            let allow = allow.filter(|_| failure.status == StatusCode::METHOD_NOT_ALLOWED);
            RestReply {
                headers: allow
                    .map(|allow| ("Allow", allow.to_string()))
                    .into_iter()
                    .collect(),
                ..RestReply::json(failure.status.as_u16(), failure.to_body())
            }
        }
    }

    /// The REST routes, parsed from a request path.
    #[derive(Debug, PartialEq, Eq)]
    enum RestRoute<'a> {
        Console,
        /// `/ws` without an upgrade: the dispatcher sends upgrades to the WebSocket handshake.
        WebSocket,
        Topics,
        Topic(&'a str),
        Messages(&'a str),
        Health,
        Stats,
        Metrics,
        /// This API as OpenAPI 3.1 (`docs/openapi.json`).
        OpenApi,
        /// The WebSocket protocol as AsyncAPI 3.0 (`docs/asyncapi.json`).
        AsyncApi,
    }

    impl<'a> RestRoute<'a> {
        fn parse(path: &'a str) -> Option<RestRoute<'a>> {
            match path {
                "/" => Some(RestRoute::Console),
                "/metrics" => Some(RestRoute::Metrics),
                "/topics" => Some(RestRoute::Topics),
                "/health" => Some(RestRoute::Health),
                "/stats" => Some(RestRoute::Stats),
                "/openapi.json" => Some(RestRoute::OpenApi),
                "/asyncapi.json" => Some(RestRoute::AsyncApi),
                "/ws" => Some(RestRoute::WebSocket),
                _ => match path.strip_prefix("/topics/")?.split_once('/') {
                    None => Some(RestRoute::Topic(&path["/topics/".len()..])),
                    Some((name, "messages")) => Some(RestRoute::Messages(name)),
                    Some(_) => None,
                }
                .filter(|route| !matches!(route, RestRoute::Topic("") | RestRoute::Messages(""))),
            }
        }

        /// The `Allow` header of a 405 on this route.
        fn allowed_methods(&self) -> &'static str {
            match self {
                RestRoute::Topics | RestRoute::Messages(_) => "GET, HEAD, POST",
                RestRoute::Topic(_) => "DELETE",
                RestRoute::WebSocket => "GET",
                RestRoute::Health
                | RestRoute::Stats
                | RestRoute::Metrics
                | RestRoute::Console
                | RestRoute::OpenApi
                | RestRoute::AsyncApi => "GET, HEAD",
            }
        }

        /// The route as a metrics label: names in paths become `{name}`, so a million topics make
        /// one series, not a million.
        fn label(&self) -> &'static str {
            match self {
                RestRoute::Console => "/",
                RestRoute::WebSocket => "/ws",
                RestRoute::Topics => "/topics",
                RestRoute::Topic(_) => "/topics/{name}",
                RestRoute::Messages(_) => "/topics/{name}/messages",
                RestRoute::Health => "/health",
                RestRoute::Stats => "/stats",
                RestRoute::Metrics => "/metrics",
                RestRoute::OpenApi => "/openapi.json",
                RestRoute::AsyncApi => "/asyncapi.json",
            }
        }
    }

    /// Answers one REST request; a failed answer means the client has gone.
    fn handle_rest(mut request: tiny_http::Request, shared: &Shared) {
        // `OPTIONS *` asks about the server as a whole (RFC 9110 9.3.7). The hand-off sends it to
        // confirm each new connection to tiny_http, so it is not counted.
        if *request.method() == tiny_http::Method::Options && request.url() == "*" {
            let mut response = tiny_http::Response::empty(204);
            let allow = "GET, HEAD, POST, DELETE, OPTIONS";
            if let Ok(allow) = tiny_http::Header::from_bytes("Allow", allow) {
                response.add_header(allow);
            }
            let _ = request.respond(response);
            return;
        }
        let path = request
            .url()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        let parsed = RestRoute::parse(&path);
        let route = parsed.as_ref().map_or("other", RestRoute::label);
        let allow = parsed.as_ref().map(RestRoute::allowed_methods);
        let origin =
            header_value(&request, "Origin").filter(|origin| shared.config.cors_allows(origin));
        // A handler that panics (a bug) must not take the worker with it.
        let reply = panic::catch_unwind(AssertUnwindSafe(|| route_rest(&mut request, shared)))
            .unwrap_or_else(|_| {
                log::error!("a REST handler panicked: answered 500");
                Err(Failure::internal("the request failed; see the server log"))
            })
            .unwrap_or_else(|failure| RestReply::failure(&failure, allow));
        log::debug!("REST {} {path} -> {}", request.method(), reply.status);
        shared.metrics.count_rest_request(route, reply.status);

        // Never chunked: the hand-off reads answers by their Content-Length (see [`ask`]).
        let mut response = tiny_http::Response::from_string(reply.body)
            .with_status_code(reply.status)
            .with_chunked_threshold(usize::MAX);
        let is_preflight = *request.method() == tiny_http::Method::Options;
        let cors = origin.into_iter().flat_map(|origin| {
            let mut headers = vec![
                ("Access-Control-Allow-Origin", origin),
                ("Vary", "Origin".into()),
            ];
            if is_preflight {
                headers.extend([
                    (
                        "Access-Control-Allow-Methods",
                        "GET, POST, DELETE, OPTIONS".into(),
                    ),
                    (
                        "Access-Control-Allow-Headers",
                        "Content-Type, X-API-Key, Authorization".into(),
                    ),
                    ("Access-Control-Max-Age", "600".into()),
                ]);
            }
            headers
        });
        let headers = [("Content-Type", reply.content_type.to_string())]
            .into_iter()
            .chain(reply.headers)
            .chain(cors);
        for (name, value) in headers {
            // Our own values are ASCII; a header that cannot be built is left out, not a panic.
            if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                response.add_header(header);
            }
        }
        if let Err(error) = request.respond(response) {
            log::debug!("REST response not delivered: {error}");
        }
    }

    fn header_value(request: &tiny_http::Request, name: &'static str) -> Option<String> {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.to_string())
    }

    fn route_rest(request: &mut tiny_http::Request, shared: &Shared) -> Result<RestReply, Failure> {
        use tiny_http::Method;
        let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
        let (path, query) = (path.to_string(), query.to_string());
        // HEAD is GET without the body (RFC 9110 9.3.2), which tiny_http leaves out by itself.
        let method = match request.method() {
            Method::Head => Method::Get,
            method => method.clone(),
        };
        let route = RestRoute::parse(&path);
        // Liveness probes, the console page (which asks for the key), the API's descriptions
        // (what the code in the repository says anyway) and CORS preflights (which browsers send
        // without credentials) work without the key. Everything else needs it, unknown routes
        // included, so that nothing of the data shows without the key.
        let open_to_all = method == Method::Options
            || method == Method::Get
                && matches!(
                    route,
                    Some(
                        RestRoute::Health
                            | RestRoute::Console
                            | RestRoute::OpenApi
                            | RestRoute::AsyncApi
                    )
                );
        let headers = request
            .headers()
            .iter()
            .map(|h| (h.field.as_str().as_str(), h.value.as_str().as_bytes()));
        let presented = auth::presented_key(headers, None);
        if !open_to_all && !auth::is_authorized(shared.config.api_key.as_deref(), presented) {
            return Err(auth::unauthorized(false));
        }
        let not_found = || {
            let message = "no such route: see README.md for the REST API";
            Failure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
        };
        let route = route.ok_or_else(not_found)?;
        if route == RestRoute::Console && !shared.config.console {
            return Err(not_found());
        }
        if method == Method::Options {
            return Ok(preflight(&route));
        }
        match (&route, method) {
            (RestRoute::Topics, Method::Get) => Ok(list_topics(shared)),
            (RestRoute::Topics, Method::Post) => {
                let body = read_body(request, shared.config.max_message_bytes)?;
                create_topic(&body, shared)
            }
            (RestRoute::Topic(name), Method::Delete) => delete_topic(name, shared),
            (RestRoute::Messages(name), Method::Get) => get_messages(name, &query, shared),
            (RestRoute::Messages(name), Method::Post) => {
                let body = read_body(request, shared.config.max_message_bytes)?;
                post_message(name, &body, shared)
            }
            // RFC 9110 15.5.22: a plain request to `/ws`, which serves WebSocket upgrades only.
            (RestRoute::WebSocket, Method::Get) => Err(Failure::new(
                StatusCode::UPGRADE_REQUIRED,
                ErrorCode::BadRequest,
                "/ws serves WebSocket upgrades only: send Upgrade: websocket",
            )),
            (RestRoute::Health, Method::Get) => Ok(health(shared)),
            (RestRoute::Stats, Method::Get) => Ok(stats(shared)),
            (RestRoute::Metrics, Method::Get) => Ok(render_metrics(shared)),
            (RestRoute::Console, Method::Get) => Ok(RestReply {
                content_type: HTML,
                ..RestReply::json(200, CONSOLE_HTML.to_string())
            }),
            (RestRoute::OpenApi, Method::Get) => Ok(RestReply::json(200, OPENAPI.to_string())),
            (RestRoute::AsyncApi, Method::Get) => Ok(RestReply::json(200, ASYNCAPI.to_string())),
            _ => Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                format!(
                    "method not allowed here; allowed: {}",
                    route.allowed_methods()
                ),
            )),
        }
    }

    /// Answers `OPTIONS` with the route's methods. What makes it a successful CORS preflight is
    /// added by [`handle_rest`], and only for an allowed origin.
    fn preflight(route: &RestRoute<'_>) -> RestReply {
        let headers = vec![("Allow", format!("{}, OPTIONS", route.allowed_methods()))];
        RestReply {
            headers,
            ..RestReply::json(204, String::new())
        }
    }

    /// Reads a request body of at most `limit` bytes, whatever its Content-Type.
    fn read_body(request: &mut tiny_http::Request, limit: usize) -> Result<Vec<u8>, Failure> {
        if request.body_length().is_some_and(|length| length > limit) {
            return Err(Failure::too_large(limit));
        }
        let mut body = Vec::new();
        request
            .as_reader()
            .take(limit as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|error| {
                Failure::bad_request(format!("could not read the request body: {error}"))
            })?;
        if body.len() > limit {
            return Err(Failure::too_large(limit));
        }
        // The dispatcher forwards only whole requests; a short body means the client vanished.
        if request
            .body_length()
            .is_some_and(|length| body.len() < length)
        {
            return Err(Failure::bad_request("body shorter than its Content-Length"));
        }
        Ok(body)
    }

    /// A request body as UTF-8 text; an empty one is refused with what was `expected`.
    fn body_text<'a>(body: &'a [u8], expected: &str) -> Result<&'a str, Failure> {
        let text = std::str::from_utf8(body)
            .map_err(|_| Failure::bad_request("body is not UTF-8".to_string()))?;
        if text.trim().is_empty() {
            return Err(Failure::bad_request(format!(
                "empty body: expected {expected}"
            )));
        }
        Ok(text)
    }

    fn list_topics(shared: &Shared) -> RestReply {
        let topics: Vec<_> = shared
            .broker
            .topic_stats()
            .into_iter()
            .map(|t| serde_json::json!({"name": t.name, "subscribers": t.subscribers}))
            .collect();
        RestReply::json(200, serde_json::json!({ "topics": topics }).to_string())
    }

    fn create_topic(body: &[u8], shared: &Shared) -> Result<RestReply, Failure> {
        #[derive(Deserialize)]
        struct CreateTopic<'a> {
            #[serde(borrow, default, deserialize_with = "super::protocol::present")]
            name: Option<&'a RawValue>,
        }
        let text = body_text(body, r#"{"name": "<topic>"}"#)?;
        let request: CreateTopic<'_> = parse_object(text).map_err(Failure::bad_request)?;
        let name = required_string(request.name, "name").map_err(Failure::bad_request)?;
        if !is_valid_topic_name(&name) {
            return Err(Failure::bad_request(format!(
                "invalid topic name {name:?}: {TOPIC_NAME_RULE}"
            )));
        }
        shared.create_topic(&name)?;
        log::info!("topic {name:?} created");
        Ok(RestReply::json(
            201,
            serde_json::json!({"status": "created", "topic": name}).to_string(),
        ))
    }

    fn delete_topic(name: &str, shared: &Shared) -> Result<RestReply, Failure> {
        match shared.delete_topic(name) {
            Ok(()) => {
                log::info!("topic {name:?} deleted");
                Ok(RestReply::json(
                    200,
                    serde_json::json!({"status": "deleted", "topic": name}).to_string(),
                ))
            }
            Err(failure) => Err(failure),
        }
    }

    /// `POST /topics/{name}/messages`: publishes exactly like a WebSocket `publish`; the `id` is
    /// generated when absent.
    fn post_message(name: &str, body: &[u8], shared: &Shared) -> Result<RestReply, Failure> {
        #[derive(Serialize)]
        struct HttpPublished<'a> {
            status: &'static str,
            topic: &'a str,
            id: &'a str,
            seq: u64,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            duplicate: bool,
        }
        let text = body_text(body, r#"{"payload": <any JSON>, "id": "<optional UUID>"}"#)?;
        let message: RawMessage<'_> = parse_object(text).map_err(Failure::bad_request)?;
        let payload = message
            .payload
            .ok_or_else(|| Failure::bad_request("missing field `payload`"))?;
        check_payload(payload, "payload").map_err(Failure::bad_request)?;
        let id = match message.id {
            None => uuid::Uuid::new_v4().hyphenated().to_string(),
            Some(id) => required_message_id(Some(id), "id").map_err(Failure::bad_request)?,
        };
        let published = shared.publish(name, &id, payload)?;
        let answer = HttpPublished {
            status: "published",
            topic: name,
            id: &id,
            seq: published.seq,
            duplicate: published.duplicate,
        };
        // A duplicate created nothing: 200, where a new message is 201.
        Ok(RestReply::json(
            if published.duplicate { 200 } else { 201 },
            serde_json::to_string(&answer).unwrap_or_default(),
        ))
    }

    /// `GET /topics/{name}/messages?last_n=N` or `?since_seq=N`: the ring's events, oldest first;
    /// neither parameter means all the ring holds.
    fn get_messages(name: &str, query: &str, shared: &Shared) -> Result<RestReply, Failure> {
        #[derive(Serialize)]
        struct HistoryReply<'a> {
            topic: &'a str,
            epoch: &'a str,
            /// The topic's last `seq`, so that an empty answer to `since_seq` is unambiguous.
            seq: u64,
            /// The oldest `seq` the topic still holds (`seq + 1` when it holds none): what came
            /// before it is gone.
            first_seq: u64,
            /// With `since_seq`: whether every message after it is in the answer.
            #[serde(skip_serializing_if = "Option::is_none")]
            recovered: Option<bool>,
            messages: Vec<HistoryMessage<'a>>,
        }
        #[derive(Serialize, Deserialize)]
        struct HistoryMessage<'a> {
            #[serde(borrow)]
            id: Cow<'a, str>,
            #[serde(borrow)]
            payload: &'a RawValue,
            #[serde(default)]
            seq: u64,
            #[serde(borrow, default)]
            ts: Cow<'a, str>,
        }
        /// The parts of a stored event frame that history shows.
        #[derive(Deserialize)]
        struct StoredEvent<'a> {
            #[serde(borrow)]
            message: HistoryMessage<'a>,
            #[serde(borrow)]
            ts: Cow<'a, str>,
        }

        let (mut last_n, mut since_seq) = (None, None);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "last_n" => &mut last_n,
                "since_seq" => &mut since_seq,
                _ => continue,
            };
            if slot.is_some() {
                return Err(Failure::bad_request(format!(
                    "query parameter `{key}` given twice"
                )));
            }
            // Digits only: `u64::from_str` would take `+5` too.
            let number = Some(value)
                .filter(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|value| value.parse::<u64>().ok());
            *slot = Some(number.ok_or_else(|| {
                Failure::bad_request(format!(
                    "query parameter `{key}` must be a non-negative integer (digits only)"
                ))
            })?);
        }
        if last_n.is_some() && since_seq.is_some() {
            return Err(Failure::bad_request(
                "give either `last_n` or `since_seq`, not both",
            ));
        }
        let last_n = last_n.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let read = || shared.broker.history(name, since_seq.unwrap_or(0), last_n);
        let mut history = read();
        // A topic created on another instance a moment ago may not be mirrored yet.
        if matches!(history, Err(BrokerError::TopicNotFound)) && shared.refresh(name) {
            history = read();
        }
        let history = history.map_err(|error| Failure::from_broker(error, name))?;
        let messages = history
            .entries
            .iter()
            .map(|entry| {
                let stored: StoredEvent<'_> =
                    serde_json::from_str(&entry.frame).map_err(|error| {
                        Failure::internal(format!("stored event {} unreadable: {error}", entry.seq))
                    })?;
                Ok(HistoryMessage {
                    seq: entry.seq,
                    ts: stored.ts,
                    ..stored.message
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let reply = HistoryReply {
            topic: name,
            epoch: &history.epoch,
            seq: history.last_seq,
            first_seq: history.first_seq,
            recovered: since_seq
                .map(|since| since <= history.last_seq && since + 1 >= history.first_seq),
            messages,
        };
        Ok(RestReply::json(
            200,
            serde_json::to_string(&reply).unwrap_or_default(),
        ))
    }

    /// `GET /health`: 200 with a few counts; in cluster mode also the backplane's state, and
    /// 503 while it is down, so that a load balancer drains this instance.
    fn health(shared: &Shared) -> RestReply {
        #[derive(Serialize)]
        struct Health<'a> {
            uptime_sec: u64,
            topics: usize,
            subscribers: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            backplane: Option<BackplaneHealth<'a>>,
        }
        #[derive(Serialize)]
        struct BackplaneHealth<'a> {
            redis: &'a str,
            up: bool,
        }
        let (topics, subscribers) = shared.broker.totals();
        let backplane = shared.backplane.as_ref().map(|backplane| BackplaneHealth {
            redis: backplane.address(),
            up: backplane.is_up(),
        });
        let status = match &backplane {
            Some(backplane) if !backplane.up => 503,
            _ => 200,
        };
        let health = Health {
            uptime_sec: shared.started.elapsed().as_secs(),
            topics,
            subscribers,
            backplane,
        };
        RestReply::json(status, serde_json::to_string(&health).unwrap_or_default())
    }

    fn stats(shared: &Shared) -> RestReply {
        let topics: serde_json::Map<String, serde_json::Value> = shared
            .broker
            .topic_stats()
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    serde_json::json!({"messages": t.messages, "subscribers": t.subscribers}),
                )
            })
            .collect();
        RestReply::json(200, serde_json::json!({ "topics": topics }).to_string())
    }

    /// Topics shown one by one in `/metrics` (the first by name); the rest are counted in
    /// `pubsub_metrics_topics_omitted`, so that a million topics cannot blow up a scrape.
    const MAX_TOPIC_SERIES: usize = 100;

    /// What one scrape of `/metrics` reads, each source once.
    struct Scrape<'a> {
        shared: &'a Shared,
        broker: broker::Snapshot,
        open_connections: usize,
        websockets: usize,
    }

    /// Samples of one family: labels (without braces; empty for none) and value.
    type Samples = Vec<(String, u64)>;

    /// One metric family of `/metrics`: its name, type and help, and how a scrape reads it.
    struct Family {
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        samples: fn(&Scrape<'_>) -> Samples,
    }

    fn one(value: impl TryInto<u64>) -> Samples {
        vec![(String::new(), value.try_into().unwrap_or(u64::MAX))]
    }

    fn per_topic(scrape: &Scrape<'_>, value: fn(&broker::TopicStats) -> u64) -> Samples {
        let topics = scrape.broker.first_topics.iter();
        topics
            .map(|t| (format!("topic=\"{}\"", t.name), value(t)))
            .collect()
    }

    fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every family `/metrics` shows but the latency histogram, in order.
    const FAMILIES: &[Family] = &[
        Family {
            name: "pubsub_uptime_seconds",
            kind: "gauge",
            help: "Seconds since the server started.",
            samples: |s| one(s.shared.started.elapsed().as_secs()),
        },
        Family {
            name: "pubsub_connections_open",
            kind: "gauge",
            help: "Open client connections, by kind.",
            samples: |s| {
                let http = s.open_connections - s.websockets;
                vec![
                    ("kind=\"websocket\"".to_string(), s.websockets as u64),
                    ("kind=\"http\"".to_string(), http as u64),
                ]
            },
        },
        Family {
            name: "pubsub_connections_refused_total",
            kind: "counter",
            help: "Connections refused at MAX_CONNECTIONS or without a thread.",
            samples: |s| one(load(&s.shared.refusals.total)),
        },
        Family {
            name: "pubsub_connections_slow_head_cut_total",
            kind: "counter",
            help: "Connections cut because their request head came too slowly, or evicted for \
                   room at MAX_CONNECTIONS while waiting for one.",
            samples: |s| one(load(&s.shared.slow_heads.total)),
        },
        Family {
            name: "pubsub_topics",
            kind: "gauge",
            help: "Topics.",
            samples: |s| one(s.broker.topics),
        },
        Family {
            name: "pubsub_subscriptions",
            kind: "gauge",
            help: "Active subscriptions.",
            samples: |s| one(s.broker.subscriptions),
        },
        Family {
            name: "pubsub_messages_published_total",
            kind: "counter",
            help: "Messages published.",
            samples: |s| one(s.broker.published),
        },
        Family {
            name: "pubsub_events_delivered_total",
            kind: "counter",
            help: "Events queued for subscribers.",
            samples: |s| one(s.broker.delivered),
        },
        Family {
            name: "pubsub_metrics_topics_omitted",
            kind: "gauge",
            help: "Topics beyond the first 100 by name, not shown one by one.",
            samples: |s| one(s.broker.topics - s.broker.first_topics.len()),
        },
        Family {
            name: "pubsub_topic_subscriptions",
            kind: "gauge",
            help: "Active subscriptions per topic.",
            samples: |s| per_topic(s, |t| t.subscribers as u64),
        },
        Family {
            name: "pubsub_topic_messages_published_total",
            kind: "counter",
            help: "Messages published per topic.",
            samples: |s| per_topic(s, |t| t.messages),
        },
        Family {
            name: "pubsub_topic_events_delivered_total",
            kind: "counter",
            help: "Events queued for subscribers per topic.",
            samples: |s| per_topic(s, |t| t.delivered),
        },
        Family {
            name: "pubsub_retained_bytes",
            kind: "gauge",
            help: "Bytes of event frames held in all topics' rings together.",
            samples: |s| one(s.broker.retained_bytes),
        },
        Family {
            name: "pubsub_retained_bytes_limit",
            kind: "gauge",
            help: "MAX_RETAINED_BYTES: beyond it the oldest events of all topics are dropped.",
            samples: |s| one(s.shared.config.max_retained_bytes),
        },
        Family {
            name: "pubsub_slow_consumer_disconnects_total",
            kind: "counter",
            help: "Connections cut because their queue was full.",
            samples: |s| one(s.broker.slow_consumer_cuts),
        },
        Family {
            name: "pubsub_heartbeat_reaps_total",
                kind: "counter",
                help: "Connections dropped after two silent heartbeat intervals.",
                samples: |s| one(load(&s.shared.metrics.heartbeat_reaps)),
            },
            Family {
                name: "pubsub_backplane_up",
                kind: "gauge",
                help: "Cluster mode: 1 while this instance follows Redis, else 0; absent in memory mode.",
                samples: |s| match &s.shared.backplane {
                    Some(backplane) => one(u64::from(backplane.is_up())),
                    None => Vec::new(),
                },
            },
            Family {
                name: "pubsub_backplane_subscription_gaps_total",
                kind: "counter",
                help: "Cluster mode: times a topic's subscribers here were told to resume \
                       (SUBSCRIPTION_GAP) because Redis no longer held what they missed or the epoch changed.",
                samples: |s| match &s.shared.backplane {
                    Some(backplane) => one(load(&backplane.resets)),
                    None => Vec::new(),
                },
            },
        Family {
            name: "pubsub_rest_requests_total",
            kind: "counter",
            help: "REST requests answered, by route and status.",
            samples: |s| {
                let requests = s.shared.metrics.rest_requests.lock();
                let requests = requests.unwrap_or_else(PoisonError::into_inner).clone();
                requests
                    .into_iter()
                    .map(|((route, status), n)| {
                        (format!("route=\"{route}\",status=\"{status}\""), n)
                    })
                    .collect()
            },
        },
    ];

    /// `GET /metrics`: the Prometheus text exposition format.
    fn render_metrics(shared: &Shared) -> RestReply {
        let (open_connections, websockets) = shared.connections.counts();
        let scrape = Scrape {
            shared,
            broker: shared.broker.snapshot(MAX_TOPIC_SERIES),
            open_connections,
            websockets,
        };
        let mut out = String::new();
        // Writing to a String cannot fail.
        for family in FAMILIES {
            let name = family.name;
            let _ = writeln!(
                out,
                "# HELP {name} {}\n# TYPE {name} {}",
                family.help, family.kind
            );
            for (labels, value) in (family.samples)(&scrape) {
                let labels = match labels.is_empty() {
                    true => labels,
                    false => format!("{{{labels}}}"),
                };
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }

        // Buckets are cumulative in the exposition format.
        let histogram = &shared.metrics.publish_to_write;
        let counts: Vec<u64> = histogram.counts.iter().map(load).collect();
        let bounds = LATENCY_BUCKETS_US
            .iter()
            .map(|&us| format!("le=\"{}\"", us as f64 / 1e6))
            .chain(["le=\"+Inf\"".into()]);
        let cumulative = counts.iter().scan(0, |total, n| {
            *total += n;
            Some(*total)
        });
        let name = "pubsub_publish_to_write_seconds";
        let help = "Time from accepting a publish to writing its event to a subscriber's socket.";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in bounds.zip(cumulative) {
            let _ = writeln!(out, "{name}_bucket{{{bound}}} {count}");
        }
        let _ = writeln!(out, "{name}_sum {}", load(&histogram.sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", counts.iter().sum::<u64>());
        RestReply {
            content_type: PROMETHEUS_TEXT,
            ..RestReply::json(200, out)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A request path for a documented path template: `{name}` becomes a topic name.
        fn concrete(template: &str) -> String {
            template.replace("{name}", "orders")
        }

        /// Every route the server answers is in `docs/openapi.json`, with the methods it
        /// answers, and every path and method there is a route of the server's.
        #[test]
        fn the_openapi_document_lists_exactly_the_routes_served() {
            let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
            let paths = document["paths"].as_object().expect("paths");
            let mut documented: Vec<(String, String)> = Vec::new();
            for (template, operations) in paths {
                let path = concrete(template);
                let route = RestRoute::parse(&path)
                    .unwrap_or_else(|| panic!("{template} is documented but not served"));
                assert_eq!(route.label(), template.as_str(), "{template}");
                // HEAD is answered as GET wherever GET is (RFC 9110 9.3.2), OPTIONS everywhere.
                let methods = route.allowed_methods();
                let head = if methods.contains("GET") {
                    ", HEAD"
                } else {
                    ""
                };
                let allowed = format!("{methods}{head}, OPTIONS");
                for method in operations.as_object().unwrap().keys() {
                    if ["parameters", "summary", "description"].contains(&method.as_str()) {
                        continue;
                    }
                    let method = method.to_ascii_uppercase();
                    assert!(
                        allowed.split(", ").any(|m| m == method),
                        "{method} {template} is documented but answered 405 (allowed: {allowed})"
                    );
                    documented.push((template.clone(), method));
                }
            }
            let served = [
                "/",
                "/ws",
                "/topics",
                "/topics/{name}",
                "/topics/{name}/messages",
                "/health",
                "/stats",
                "/metrics",
                "/openapi.json",
                "/asyncapi.json",
            ];
            for template in served {
                let path = concrete(template);
                let route = RestRoute::parse(&path).unwrap();
                for method in route.allowed_methods().split(", ") {
                    assert!(
                        documented.contains(&(template.to_string(), method.to_string())),
                        "{method} {template} is served but not documented"
                    );
                }
            }
        }

        /// The AsyncAPI document is JSON and version 3.0.
        #[test]
        fn the_asyncapi_document_is_asyncapi_3() {
            let document: serde_json::Value = serde_json::from_str(ASYNCAPI).unwrap();
            assert!(document["asyncapi"].as_str().unwrap().starts_with("3.0"));
        }
    }
}

mod backplane {
    //! Cluster mode: several instances that point at one Redis (`REDIS_URL`) share the set of
    //! topics, each topic's `epoch` and numbering, its history and its events. Redis is the
    //! backplane, in the way Centrifugo uses it: a Lua script numbers each publish (`HINCRBY`),
    //! appends it to the topic's stream under that number (`XADD`, trimmed to `RING_SIZE`) and
    //! `PUBLISH`es it to every instance, all atomically; creating and deleting topics are
    //! scripts too. Each instance's broker keeps its rings as a mirror of the streams: one
    //! backplane thread applies the events of the channel in order, fills a gap from the stream
    //! (`XRANGE`), and when the stream no longer covers a gap, or the epoch changed, tells that
    //! topic's local subscribers where they were so that they resume.
    //!
    //! Owns: the Redis connections, the scripts and the mirror's catching up. Must never: hold
    //! the broker lock across a Redis call, retry a publish whose outcome is unknown, or log
    //! the URL's credentials. What stays per instance: connections, queues, slow-consumer cuts,
    //! heartbeats, `MAX_CONNECTIONS`, subscriber counts and `/metrics`.

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::thread;
    use std::time::Duration;

    use redis::{Connection, RedisError, RedisResult, Script};
    use tungstenite::http::StatusCode;
    use tungstenite::Utf8Bytes;

    use super::broker::{new_epoch, Applied};
    use super::protocol::{timestamp, ErrorCode, Failure, ServerMessage, Unfinished};
    use super::state::Shared;

    /// The longest a Redis call may take: connecting, or one command's round trip. A publish,
    /// create or delete fails after it rather than hang.
    const TIMEOUT: Duration = Duration::from_secs(1);

    /// How long a publisher waits for the backplane thread to apply its own event, so that a
    /// subscriber on this instance has it before the publisher's ack, as in memory mode.
    pub(crate) const APPLY_WAIT: Duration = Duration::from_secs(1);

    /// Reconnection backoff: from the first to the last, doubling.
    const BACKOFF_FIRST: Duration = Duration::from_millis(50);
    const BACKOFF_LAST: Duration = Duration::from_secs(2);

    /// Command connections kept for reuse; more are opened while every one is busy.
    const IDLE_CONNECTIONS: usize = 64;

    /// The channel every instance subscribes to: `E name epoch seq frame` for an event,
    /// `C name epoch` for a topic created (or given a new epoch), `D name epoch` for one
    /// deleted. Topic names hold no spaces.
    const CHANNEL: &str = "pubsub:events";
    const TOPICS_KEY: &str = "pubsub:topics";

    /// Formats Redis's clock, in milliseconds, as the RFC 3339 `ts` every event carries
    /// (days to civil date: Howard Hinnant's algorithm).
    const LUA_RFC3339: &str = r"
local function rfc3339(ms)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, ms % 1000)
end
";

    /// KEYS: meta, stream, ids. ARGV: the event without its closing brace, the message id
    /// ('' for none), RING_SIZE, the channel, the topic. Returns {1, seq, epoch} when
    /// published, {2, seq, epoch} for an id the stream still holds (nothing published), {0, 0,
    /// ''} when the topic does not exist. `ts` is Redis's clock, never behind the topic's last.
    const LUA_PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then return {0, 0, ''} end
if ARGV[2] ~= '' then
  local seen = redis.call('HGET', KEYS[3], ARGV[2])
  if seen then return {2, tonumber(seen), epoch} end
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'ms') or '0')
if ms < last then ms = last end
redis.call('HSET', KEYS[1], 'ms', ms)
local frame = ARGV[1] .. ',"ts":"' .. rfc3339(ms) .. '","seq":' .. seq .. '}'
local ring = tonumber(ARGV[3])
if ring > 0 then
  redis.call('XADD', KEYS[2], seq .. '-0', 'f', frame, 'i', ARGV[2])
  local over = redis.call('XLEN', KEYS[2]) - ring
  if over > 0 then
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)) do
      if entry[2][4] ~= '' then redis.call('HDEL', KEYS[3], entry[2][4]) end
    end
    redis.call('XTRIM', KEYS[2], 'MAXLEN', ring)
  end
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], seq) end
end
redis.call('PUBLISH', ARGV[4], 'E ' .. ARGV[5] .. ' ' .. epoch .. ' ' .. seq .. ' ' .. frame)
return {1, seq, epoch}
"#;

    /// KEYS: meta, stream, ids, the topic set. ARGV: name, epoch, MAX_TOPICS, the channel.
    /// Returns 1 when created, 0 when it exists, -1 at MAX_TOPICS.
    const LUA_CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[3]) then return -1 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', 0)
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[4], 'C ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
";

    /// KEYS: meta, stream, ids, the topic set. ARGV: name, the channel. Returns 1 when
    /// deleted, 0 when there was no such topic.
    const LUA_DELETE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'D ' .. ARGV[1] .. ' ' .. epoch)
return 1
";

    /// KEYS: meta, stream. ARGV: the first seq wanted. Returns {} for no such topic, else
    /// {epoch, last seq, then stream id and frame of each entry from that seq on}.
    const LUA_READ: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then return {} end
local out = {epoch, redis.call('HGET', KEYS[1], 's')}
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+')) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
end
return out
";

    /// KEYS: meta, stream, ids. ARGV: the epoch seen, a new epoch, name, the channel. Gives a
    /// topic whose Redis came back older than what was seen of it a new epoch, so that no
    /// `seq` is ever reused within one; only while it still has the epoch seen. Returns 1
    /// when it did.
    const LUA_REBASE: &str = r"
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'e', ARGV[2])
redis.call('PUBLISH', ARGV[4], 'C ' .. ARGV[3] .. ' ' .. ARGV[2])
return 1
";

    /// The connection to Redis, shared by every thread of an instance.
    pub(crate) struct Backplane {
        client: redis::Client,
        /// `redis://host:port/db`, without credentials: for logs and errors.
        address: String,
        idle: Mutex<Vec<Connection>>,
        /// Set while the backplane thread is subscribed and has caught up.
        linked: AtomicBool,
        /// Cleared by a command that failed for want of Redis; set by one that got an answer.
        reachable: AtomicBool,
        /// Times a topic's subscribers were told to resume because the stream no longer held
        /// what they missed or the epoch changed.
        pub(crate) resets: AtomicU64,
        publish: Script,
        create: Script,
        delete: Script,
        read: Script,
        rebase: Script,
        ring_size: usize,
        max_topics: usize,
    }

    /// What a publish's script did.
    pub(crate) enum Numbered {
        Published { epoch: String, seq: u64 },
        Duplicate { seq: u64 },
        NoTopic,
    }

    /// A topic as Redis holds it: its epoch, last seq, and the stream's entries asked for.
    pub(crate) struct Held {
        epoch: String,
        last_seq: u64,
        entries: Vec<(u64, Utf8Bytes)>,
    }

    /// Why a Redis call failed: before anything was sent, or after, when what it did is
    /// unknown.
    pub(crate) enum CallError {
        Unavailable(RedisError),
        Unknown(RedisError),
    }

    impl Backplane {
        /// A backplane for `url` (checked by `config`), with no connection open yet.
        pub(crate) fn new(
            url: &str,
            ring_size: usize,
            max_topics: usize,
        ) -> RedisResult<Backplane> {
            let client = redis::Client::open(url)?;
            let info = client.get_connection_info();
            let address = format!("redis://{}/{}", info.addr, info.redis.db);
            let script = |body: &str| Script::new(body);
            Ok(Backplane {
                client,
                address,
                idle: Mutex::default(),
                linked: AtomicBool::new(false),
                reachable: AtomicBool::new(true),
                resets: AtomicU64::new(0),
                publish: script(&format!("{LUA_RFC3339}{LUA_PUBLISH}")),
                create: script(LUA_CREATE),
                delete: script(LUA_DELETE),
                read: script(LUA_READ),
                rebase: script(LUA_REBASE),
                ring_size,
                max_topics,
            })
        }

        /// `redis://host:port/db`, without credentials.
        pub(crate) fn address(&self) -> &str {
            &self.address
        }

        /// Whether this instance follows the cluster: subscribed, caught up, and Redis
        /// answering.
        pub(crate) fn is_up(&self) -> bool {
            self.linked.load(Ordering::SeqCst) && self.reachable.load(Ordering::SeqCst)
        }

        /// Waits up to `limit` for the backplane thread's first link; true once linked.
        pub(crate) fn wait_linked(&self, limit: Duration) -> bool {
            let deadline = std::time::Instant::now() + limit;
            while !self.linked.load(Ordering::SeqCst) {
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(5));
            }
            true
        }

        /// The failure a client gets when Redis cannot be used.
        pub(crate) fn unavailable(&self, error: &CallError) -> Failure {
            let message = match error {
                CallError::Unavailable(error) => format!(
                    "the cluster backplane (Redis at {}) is unavailable: {error}",
                    self.address
                ),
                CallError::Unknown(error) => format!(
                    "the cluster backplane (Redis at {}) did not answer ({error}): whether it \
                     was done is unknown",
                    self.address
                ),
            };
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                message,
            )
        }

        /// Runs `call` on an idle connection, or a new one. A connection that failed is
        /// dropped; one that answered, even with an error, is kept.
        fn with_connection<T>(
            &self,
            call: impl FnOnce(&mut Connection) -> RedisResult<T>,
        ) -> Result<T, CallError> {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut connection = match idle {
                Some(connection) => connection,
                None => self.connect().map_err(|error| {
                    self.reachable.store(false, Ordering::SeqCst);
                    CallError::Unavailable(error)
                })?,
            };
            match call(&mut connection) {
                Err(error) if error.is_io_error() || error.is_connection_dropped() => {
                    self.reachable.store(false, Ordering::SeqCst);
                    Err(CallError::Unknown(error))
                }
                result => {
                    self.reachable.store(true, Ordering::SeqCst);
                    let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                    if idle.len() < IDLE_CONNECTIONS {
                        idle.push(connection);
                    }
                    drop(idle);
                    result.map_err(CallError::Unavailable)
                }
            }
        }

        fn connect(&self) -> RedisResult<Connection> {
            let connection = self.client.get_connection_with_timeout(TIMEOUT)?;
            connection.set_read_timeout(Some(TIMEOUT))?;
            connection.set_write_timeout(Some(TIMEOUT))?;
            Ok(connection)
        }

        /// Creates a topic cluster-wide: `Ok(true)` when created, `Ok(false)` when it exists;
        /// `None` at `MAX_TOPICS`.
        pub(crate) fn create(&self, name: &str, epoch: &str) -> Result<Option<bool>, CallError> {
            let [meta, stream, ids] = keys(name);
            let created: i64 = self.with_connection(|connection| {
                self.create
                    .key(meta)
                    .key(stream)
                    .key(ids)
                    .key(TOPICS_KEY)
                    .arg(name)
                    .arg(epoch)
                    .arg(self.max_topics)
                    .arg(CHANNEL)
                    .invoke(connection)
            })?;
            Ok(match created {
                1 => Some(true),
                0 => Some(false),
                _ => None,
            })
        }

        /// Deletes a topic cluster-wide; false when there was none.
        pub(crate) fn delete(&self, name: &str) -> Result<bool, CallError> {
            let [meta, stream, ids] = keys(name);
            let deleted: i64 = self.with_connection(|connection| {
                self.delete
                    .key(meta)
                    .key(stream)
                    .key(ids)
                    .key(TOPICS_KEY)
                    .arg(name)
                    .arg(CHANNEL)
                    .invoke(connection)
            })?;
            Ok(deleted == 1)
        }

        /// Numbers a publish cluster-wide, stores it in the topic's stream and sends it to
        /// every instance. `event` is the event without `ts` and `seq`; `id` the message's
        /// canonical UUID.
        pub(crate) fn number(
            &self,
            name: &str,
            id: &str,
            event: &Unfinished,
        ) -> Result<Numbered, CallError> {
            let [meta, stream, ids] = keys(name);
            let (status, seq, epoch): (i64, u64, String) = self.with_connection(|connection| {
                self.publish
                    .key(meta)
                    .key(stream)
                    .key(ids)
                    .arg(&event.0)
                    .arg(id)
                    .arg(self.ring_size)
                    .arg(CHANNEL)
                    .arg(name)
                    .invoke(connection)
            })?;
            Ok(match status {
                1 => Numbered::Published { epoch, seq },
                2 => Numbered::Duplicate { seq },
                _ => Numbered::NoTopic,
            })
        }

        /// The topic as Redis holds it, with its stream's entries from seq `from` on; `None`
        /// when there is no such topic.
        fn read(&self, name: &str, from: u64) -> Result<Option<Held>, CallError> {
            let [meta, stream, _] = keys(name);
            let reply: Vec<String> = self.with_connection(|connection| {
                self.read
                    .key(meta)
                    .key(stream)
                    .arg(from.max(1))
                    .invoke(connection)
            })?;
            let mut reply = reply.into_iter();
            let (Some(epoch), Some(last_seq)) = (reply.next(), reply.next()) else {
                return Ok(None);
            };
            let mut entries = Vec::new();
            while let (Some(id), Some(frame)) = (reply.next(), reply.next()) {
                let seq = id.split('-').next().and_then(|seq| seq.parse().ok());
                entries.extend(seq.map(|seq| (seq, Utf8Bytes::from(frame))));
            }
            Ok(Some(Held {
                epoch,
                last_seq: last_seq.parse().unwrap_or(0),
                entries,
            }))
        }

        fn rebase(&self, name: &str, seen: &str, epoch: &str) -> Result<bool, CallError> {
            let [meta, stream, ids] = keys(name);
            let done: i64 = self.with_connection(|connection| {
                self.rebase
                    .key(meta)
                    .key(stream)
                    .key(ids)
                    .arg(seen)
                    .arg(epoch)
                    .arg(name)
                    .arg(CHANNEL)
                    .invoke(connection)
            })?;
            Ok(done == 1)
        }

        fn topics(&self) -> Result<Vec<String>, CallError> {
            self.with_connection(|connection| {
                redis::cmd("SMEMBERS").arg(TOPICS_KEY).query(connection)
            })
        }
    }

    /// A topic's keys: its hash (`e` epoch, `s` last seq, `ms` last time), its stream, and the
    /// message ids its stream holds (id → seq).
    fn keys(name: &str) -> [String; 3] {
        [
            format!("pubsub:topic:{name}"),
            format!("pubsub:stream:{name}"),
            format!("pubsub:ids:{name}"),
        ]
    }

    /// The backplane thread: subscribes to the channel, catches the mirror up with every
    /// topic's stream, then applies the channel's messages in order. When the link drops, it
    /// reconnects with backoff and catches up again. Runs until shutdown.
    pub(crate) fn run_backplane(shared: &Arc<Shared>) {
        let Some(backplane) = shared.backplane.as_ref() else {
            return;
        };
        let mut backoff = BACKOFF_FIRST;
        while !shared.is_shutting_down() {
            let error = follow(shared, backplane, &mut backoff);
            let was_linked = backplane.linked.swap(false, Ordering::SeqCst);
            if shared.is_shutting_down() {
                return;
            }
            if was_linked {
                log::warn!(
                    "backplane {}: link lost ({error}); reconnecting",
                    backplane.address
                );
            } else {
                log::debug!("backplane {}: cannot link: {error}", backplane.address);
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// Follows the channel until the link fails; returns why.
    fn follow(shared: &Shared, backplane: &Backplane, backoff: &mut Duration) -> RedisError {
        let mut connection = match backplane.client.get_connection_with_timeout(TIMEOUT) {
            Ok(connection) => connection,
            Err(error) => return error,
        };
        if let Err(error) = connection.set_read_timeout(Some(TIMEOUT)) {
            return error;
        }
        let mut channel = connection.as_pubsub();
        if let Err(error) = channel.subscribe(CHANNEL) {
            return error;
        }
        // Subscribed first: whatever happens from now on arrives on the channel, and what came
        // before is in the streams; events seen both ways are applied once, by seq.
        if let Err(error) = catch_up_all(shared, backplane) {
            return match error {
                CallError::Unavailable(error) | CallError::Unknown(error) => error,
            };
        }
        backplane.linked.store(true, Ordering::SeqCst);
        *backoff = BACKOFF_FIRST;
        log::info!("backplane {}: linked and caught up", backplane.address);
        // A quiet channel is normal: no read timeout from here on. A dropped link ends the
        // read at once; a hung Redis shows in the commands' timeouts.
        if let Err(error) = channel.set_read_timeout(None) {
            return error;
        }
        loop {
            let message = match channel.get_message() {
                Ok(message) => message,
                Err(error) => return error,
            };
            let text = String::from_utf8_lossy(message.get_payload_bytes());
            if let Err(error) = handle(shared, backplane, &text) {
                match error {
                    CallError::Unavailable(error) | CallError::Unknown(error) => return error,
                }
            }
        }
    }

    /// Applies one message of the channel.
    fn handle(shared: &Shared, backplane: &Backplane, message: &str) -> Result<(), CallError> {
        let mut parts = message.splitn(5, ' ');
        let (kind, name, epoch) = (parts.next(), parts.next(), parts.next());
        let (Some(kind), Some(name), Some(epoch)) = (kind, name, epoch) else {
            log::warn!("backplane: unreadable message {:?}", truncate(message));
            return Ok(());
        };
        match kind {
            "E" => {
                let (Some(seq), Some(frame)) = (parts.next(), parts.next()) else {
                    log::warn!("backplane: unreadable event {:?}", truncate(message));
                    return Ok(());
                };
                let Ok(seq) = seq.parse::<u64>() else {
                    return Ok(());
                };
                let frame = Utf8Bytes::from(frame.to_string());
                let applied = shared
                    .broker
                    .apply(name, epoch, seq, frame, shared.clock_us());
                match applied {
                    Applied::Delivered | Applied::Duplicate => Ok(()),
                    Applied::Gap { .. } | Applied::Unknown => catch_up(shared, backplane, name),
                }
            }
            "C" => catch_up(shared, backplane, name),
            "D" => {
                let _ = shared
                    .broker
                    .remove_topic(name, Some(epoch), deletion_notice(name));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn truncate(text: &str) -> &str {
        let end = text.char_indices().nth(80).map_or(text.len(), |(i, _)| i);
        &text[..end]
    }

    /// Catches every topic up: those Redis holds, and those only this instance still has
    /// (deleted meanwhile, or all of them when Redis came back empty).
    fn catch_up_all(shared: &Shared, backplane: &Backplane) -> Result<(), CallError> {
        let mut names = backplane.topics()?;
        names.extend(shared.broker.topic_stats().into_iter().map(|t| t.name));
        names.sort_unstable();
        names.dedup();
        for name in names {
            catch_up(shared, backplane, &name)?;
        }
        Ok(())
    }

    /// Makes the mirror of topic `name` match Redis: adds it, delivers what it lacks, starts
    /// it again from Redis's state (its subscribers told where they were), or removes it.
    /// When Redis holds less of a topic than was seen of it in the same epoch (it came back
    /// from an older state), the topic gets a new epoch first, so that no seq is reused.
    pub(crate) fn catch_up(
        shared: &Shared,
        backplane: &Backplane,
        name: &str,
    ) -> Result<(), CallError> {
        let position = shared.broker.position(name);
        let from = position.as_ref().map_or(1, |(_, last)| last + 1);
        let mut held = backplane.read(name, from)?;
        if let (Some((epoch, last)), Some(now)) = (&position, &held) {
            if now.epoch == *epoch && now.last_seq < *last {
                let fresh = new_epoch();
                log::warn!(
                    "backplane {}: topic {name:?} is at seq {} in Redis, behind the {last} seen: \
                     Redis lost data; the topic takes a new epoch",
                    backplane.address,
                    now.last_seq
                );
                backplane.rebase(name, epoch, &fresh)?;
                held = backplane.read(name, 1)?;
            } else if now.epoch != *epoch {
                held = backplane.read(name, 1)?;
            }
        }
        let Some(held) = held else {
            if let Some((epoch, _)) = position {
                let _ = shared
                    .broker
                    .remove_topic(name, Some(&epoch), deletion_notice(name));
            }
            return Ok(());
        };
        let notice = resume_notice(name);
        let mirrored =
            shared
                .broker
                .mirror(name, &held.epoch, held.last_seq, held.entries, &notice);
        if mirrored == super::broker::Mirrored::Reset {
            backplane.resets.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "backplane {}: topic {name:?} starts again at epoch {} seq {}; its subscribers \
                 here were told to resume",
                backplane.address,
                held.epoch,
                held.last_seq
            );
        }
        Ok(())
    }

    fn deletion_notice(name: &str) -> Utf8Bytes {
        ServerMessage::Info {
            topic: Some(name),
            msg: "topic_deleted",
            ts: &timestamp(),
        }
        .to_frame()
    }

    /// What a subscriber is told when its topic cannot go on without a gap here; the broker
    /// finishes it with the last `seq` the subscriber was sent.
    fn resume_notice(name: &str) -> Unfinished {
        let message = format!(
            "topic {name:?}: the events after `seq` cannot be delivered in order on this \
             server (the cluster no longer holds them, or the topic's epoch changed); this \
             subscription ended: subscribe again with since_seq and epoch to resume"
        );
        let failure = Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::SubscriptionGap,
            message,
        );
        Unfinished::new(&failure.to_message(Some(name), &timestamp()))
    }
}

mod cli {
    //! The binary is also a client: `pubsub-backend sub`, `pub`, `topics`, `create`, `delete`
    //! and `history`, for shells and scripts. `sub` prints every event as one JSON line, exactly
    //! as received, and resumes after anything that ends its connection (a restart, a
    //! slow-consumer cut, a gap in cluster mode) from the last `seq` it printed; `pub` publishes
    //! one payload or one per line of standard input, each waiting for its ack.
    //!
    //! Owns: the command line of those subcommands, a WebSocket client (tungstenite's) and a
    //! minimal HTTP/1.1 client over `TcpStream` and `httparse`, both already in the binary. Must
    //! never: print anything but events (`sub`) or acks (`pub`) on standard output, or publish a
    //! line twice.

    use std::io::{self, BufRead, Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use serde_json::value::RawValue;
    use serde_json::{json, Value};
    use signal_hook::consts::{SIGINT, SIGTERM};
    use tungstenite::client::IntoClientRequest;
    use tungstenite::http::HeaderValue;
    use tungstenite::stream::MaybeTlsStream;
    use tungstenite::{Message, WebSocket};

    /// The subcommands; the first argument selects one.
    pub(crate) const COMMANDS: [&str; 6] = ["sub", "pub", "topics", "create", "delete", "history"];

    /// How long connecting and each request may take before the client gives up on them.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// `sub`'s reconnection backoff: from the first to the last, doubling.
    const BACKOFF_FIRST: Duration = Duration::from_millis(100);
    const BACKOFF_LAST: Duration = Duration::from_secs(5);

    /// How often `sub` looks up from a quiet socket for Ctrl-C or SIGTERM.
    const SIGNAL_POLL: Duration = Duration::from_millis(200);

    const USAGE: &str = "\
Usage: pubsub-backend sub TOPIC [TOPIC...] [--last-n N | --since SEQ --epoch EPOCH] [--count N]
       pubsub-backend pub TOPIC [JSON]         (no JSON: one payload per line of stdin)
       pubsub-backend topics
       pubsub-backend create NAME
       pubsub-backend delete NAME
       pubsub-backend history NAME [--last-n N | --since SEQ]
Each also takes --url URL (default $PUBSUB_URL, else http://127.0.0.1:8000) and
--api-key KEY (default $API_KEY).";

    /// Where the server is and how to present the key.
    struct Target {
        /// `host:port`.
        authority: String,
        api_key: Option<String>,
    }

    /// A command line that cannot be run: a usage error (exit 2).
    struct Usage(String);

    /// Runs a client subcommand; `args` start with its name.
    pub(crate) fn main(args: Vec<String>, env: impl Fn(&str) -> Option<String>) -> ExitCode {
        let outcome = parse(args, &env).map(|(command, target)| command.run(&target));
        match outcome {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(message)) => {
                let _ = writeln!(io::stderr(), "pubsub-backend: {message}");
                ExitCode::FAILURE
            }
            Err(Usage(message)) if message.is_empty() => {
                let _ = writeln!(io::stdout(), "{USAGE}");
                ExitCode::SUCCESS
            }
            Err(Usage(message)) => {
                let _ = writeln!(io::stderr(), "pubsub-backend: {message}\n{USAGE}");
                ExitCode::from(2)
            }
        }
    }

    /// What to do.
    enum Command {
        Sub {
            topics: Vec<String>,
            start: Start,
            count: Option<u64>,
        },
        Pub {
            topic: String,
            payload: Option<String>,
        },
        Topics,
        Create(String),
        Delete(String),
        History {
            topic: String,
            query: String,
        },
    }

    /// Where `sub` starts: live, with the last N events, or after an event of an epoch.
    #[derive(Clone)]
    enum Start {
        LastN(u64),
        Since { seq: u64, epoch: String },
    }

    fn parse(
        args: Vec<String>,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(Command, Target), Usage> {
        let mut args = args.into_iter();
        let name = args.next().unwrap_or_default();
        let (mut positional, mut options) = (Vec::new(), Vec::<(String, String)>::new());
        while let Some(arg) = args.next() {
            match arg.strip_prefix("--") {
                Some("help") => return Err(Usage(String::new())),
                Some(option) => {
                    let (option, value) = match option.split_once('=') {
                        Some((option, value)) => (option.to_string(), value.to_string()),
                        None => {
                            let value = args
                                .next()
                                .ok_or_else(|| Usage(format!("--{option} needs a value")))?;
                            (option.to_string(), value)
                        }
                    };
                    options.push((option, value));
                }
                None => positional.push(arg),
            }
        }
        let mut take = |option: &str| {
            let found = options.iter().position(|(name, _)| name == option);
            found.map(|index| options.remove(index).1)
        };
        let number = |option: &str, value: Option<String>| -> Result<Option<u64>, Usage> {
            value
                .map(|value| {
                    value.parse::<u64>().map_err(|_| {
                        Usage(format!(
                            "--{option} must be a non-negative integer, got {value:?}"
                        ))
                    })
                })
                .transpose()
        };
        let url = take("url")
            .or_else(|| env("PUBSUB_URL"))
            .unwrap_or_else(|| "http://127.0.0.1:8000".to_string());
        let target = Target {
            authority: authority(&url).map_err(Usage)?,
            api_key: take("api-key").or_else(|| env("API_KEY")),
        };
        let one = |what: &str, positional: &[String]| match positional {
            [name] => Ok(name.clone()),
            _ => Err(Usage(format!("{name} takes one {what}"))),
        };
        let command = match name.as_str() {
            "sub" => {
                let last_n = number("last-n", take("last-n"))?;
                let since = number("since", take("since"))?;
                let start = match (last_n, since, take("epoch")) {
                    (None, None, None) => Start::LastN(0),
                    (Some(n), None, None) => Start::LastN(n),
                    (None, Some(seq), Some(epoch)) if positional.len() == 1 => {
                        Start::Since { seq, epoch }
                    }
                    (None, Some(_), Some(_)) => {
                        return Err(Usage("--since resumes one topic only".into()))
                    }
                    _ => {
                        return Err(Usage(
                            "give --last-n, or --since with --epoch, or neither".into(),
                        ))
                    }
                };
                if positional.is_empty() {
                    return Err(Usage("sub needs a topic".into()));
                }
                Command::Sub {
                    topics: positional,
                    start,
                    count: number("count", take("count"))?,
                }
            }
            "pub" => match positional.as_slice() {
                [topic] => Command::Pub {
                    topic: topic.clone(),
                    payload: None,
                },
                [topic, payload] => Command::Pub {
                    topic: topic.clone(),
                    payload: Some(payload.clone()),
                },
                _ => return Err(Usage("pub takes a topic and at most one payload".into())),
            },
            "topics" if positional.is_empty() => Command::Topics,
            "topics" => return Err(Usage("topics takes no argument".into())),
            "create" => Command::Create(one("topic name", &positional)?),
            "delete" => Command::Delete(one("topic name", &positional)?),
            "history" => {
                let topic = one("topic name", &positional)?;
                let query = match (take("last-n"), take("since")) {
                    (None, None) => String::new(),
                    (Some(n), None) => {
                        format!("?last_n={}", number("last-n", Some(n))?.unwrap_or(0))
                    }
                    (None, Some(seq)) => {
                        format!("?since_seq={}", number("since", Some(seq))?.unwrap_or(0))
                    }
                    _ => return Err(Usage("give --last-n or --since, not both".into())),
                };
                Command::History { topic, query }
            }
            other => return Err(Usage(format!("unknown command {other:?}"))),
        };
        if let Some((option, _)) = options.first() {
            return Err(Usage(format!("{name} takes no --{option}")));
        }
        Ok((command, target))
    }

    /// `host:port` of an `http://` or `ws://` URL (a path, if any, is ignored).
    fn authority(url: &str) -> Result<String, String> {
        let rest = ["http://", "ws://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
            .ok_or_else(|| {
                format!("--url {url:?}: expected http://HOST:PORT (TLS is not supported here)")
            })?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("--url {url:?} names no host"));
        }
        Ok(if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        })
    }

    impl Command {
        fn run(self, target: &Target) -> Result<(), String> {
            match self {
                Command::Sub {
                    topics,
                    start,
                    count,
                } => subscribe(target, &topics, &start, count),
                Command::Pub { topic, payload } => publish(target, &topic, payload),
                Command::Topics => rest(target, "GET", "/topics", None),
                Command::Create(name) => {
                    let body = json!({ "name": name }).to_string();
                    rest(target, "POST", "/topics", Some(&body))
                }
                Command::Delete(name) => rest(target, "DELETE", &format!("/topics/{name}"), None),
                Command::History { topic, query } => rest(
                    target,
                    "GET",
                    &format!("/topics/{topic}/messages{query}"),
                    None,
                ),
            }
        }
    }

    // ---- REST --------------------------------------------------------------------------

    /// One request; prints the JSON answer on stdout, or on stderr with a failure for a status
    /// of 400 or more.
    fn rest(target: &Target, method: &str, path: &str, body: Option<&str>) -> Result<(), String> {
        let (status, answer) = http(target, method, path, body)?;
        if status >= 400 {
            return Err(format!("{method} {path}: {status} {answer}"));
        }
        let mut out = io::stdout().lock();
        writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())
    }

    /// Sends one HTTP/1.1 request on a connection of its own and reads the whole answer: its
    /// status and body. The server answers with a `Content-Length` and closes on request.
    fn http(
        target: &Target,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let fail =
            |error: io::Error| format!("{method} http://{}{path}: {error}", target.authority);
        let mut stream = connect(&target.authority).map_err(fail)?;
        let body = body.unwrap_or("");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            target.authority,
            body.len()
        );
        if let Some(key) = &target.api_key {
            request += &format!("X-API-Key: {key}\r\n");
        }
        request += "\r\n";
        request += body;
        stream.write_all(request.as_bytes()).map_err(fail)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map_err(fail)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&answer) {
            Ok(httparse::Status::Complete(head_len)) => head_len,
            _ => return Err(format!("{method} {path}: not an HTTP answer")),
        };
        let status = response.code.unwrap_or(0);
        let text = String::from_utf8_lossy(&answer[head_len..])
            .trim_end()
            .to_string();
        Ok((status, text))
    }

    fn connect(authority: &str) -> io::Result<TcpStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in authority.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(TIMEOUT))?;
                    stream.set_write_timeout(Some(TIMEOUT))?;
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    // ---- WebSocket ---------------------------------------------------------------------

    type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

    fn open_websocket(target: &Target) -> Result<Socket, String> {
        let url = format!("ws://{}/ws", target.authority);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("{url}: {e}"))?;
        if let Some(key) = &target.api_key {
            let key =
                HeaderValue::from_str(key).map_err(|_| "the API key is not a header value")?;
            request.headers_mut().insert("x-api-key", key);
        }
        let stream = connect(&target.authority).map_err(|e| format!("{url}: {e}"))?;
        let (socket, _) =
            tungstenite::client(request, MaybeTlsStream::Plain(stream)).map_err(|e| match e {
                tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response)) => {
                    let body = response.body().as_deref().unwrap_or_default();
                    format!(
                        "{url}: {} {}",
                        response.status(),
                        String::from_utf8_lossy(body)
                    )
                }
                other => format!("{url}: {other}"),
            })?;
        Ok(socket)
    }

    fn send(socket: &mut Socket, request: &Value) -> Result<(), tungstenite::Error> {
        socket.send(Message::text(request.to_string()))
    }

    /// `pub`: publishes each payload under a new message id and waits for its ack before the
    /// next. A payload that is not JSON, or a refusal, stops it.
    fn publish(target: &Target, topic: &str, payload: Option<String>) -> Result<(), String> {
        let mut socket = open_websocket(target)?;
        let mut out = io::stdout().lock();
        let lines: Box<dyn Iterator<Item = io::Result<String>>> = match payload {
            Some(payload) => Box::new(std::iter::once(Ok(payload))),
            None => Box::new(io::stdin().lock().lines()),
        };
        for (index, line) in lines.enumerate() {
            let line = line.map_err(|e| format!("reading stdin: {e}"))?;
            let number = index + 1;
            if line.trim().is_empty() {
                continue;
            }
            let payload: &RawValue = serde_json::from_str(line.trim())
                .map_err(|e| format!("line {number}: invalid JSON: {e}; nothing more published"))?;
            let request_id = format!("pub-{number}");
            let request = json!({
                "type": "publish",
                "topic": topic,
                "request_id": request_id,
                "message": {"id": uuid::Uuid::new_v4().to_string(), "payload": payload},
            });
            send(&mut socket, &request).map_err(|e| format!("line {number}: {e}"))?;
            let reply = loop {
                let message = socket
                    .read()
                    .map_err(|e| format!("line {number}: no ack: {e}"))?;
                let Message::Text(text) = message else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap_or_default();
                if reply["request_id"] == request_id.as_str() {
                    break reply;
                }
            };
            match reply["type"].as_str() {
                Some("ack") => {
                    let seq = &reply["seq"];
                    writeln!(out, "{seq}")
                        .and_then(|()| out.flush())
                        .map_err(|e| e.to_string())?;
                }
                _ => {
                    let code = reply["error"]["code"].as_str().unwrap_or("?");
                    let message = reply["error"]["message"].as_str().unwrap_or("");
                    return Err(format!("line {number}: {code}: {message}"));
                }
            }
        }
        let _ = socket.close(None);
        Ok(())
    }

    /// What `sub` knows of one topic: where it is in it.
    struct Position {
        topic: String,
        epoch: Option<String>,
        /// The `seq` of the last event printed.
        last: Option<u64>,
        /// The `since_seq` of the last subscribe sent, if it resumed.
        asked: Option<u64>,
    }

    impl Position {
        /// The subscribe request that resumes after the last event printed, or starts as asked.
        fn request(&mut self, start: &Start) -> Value {
            let mut request = json!({
                "type": "subscribe",
                "topic": self.topic,
                "client_id": "pubsub-backend-sub",
                "request_id": format!("sub {}", self.topic),
            });
            let since = match (&self.epoch, self.last, start) {
                (Some(epoch), Some(seq), _) => Some((seq, epoch.clone())),
                (_, _, Start::Since { seq, epoch }) => Some((*seq, epoch.clone())),
                (_, _, Start::LastN(n)) => {
                    request["last_n"] = json!(n);
                    None
                }
            };
            self.asked = since.as_ref().map(|(seq, _)| *seq);
            if let Some((seq, epoch)) = since {
                request["since_seq"] = json!(seq);
                request["epoch"] = json!(epoch);
            }
            request
        }

        /// Takes in a subscribe ack: says what a resume could not recover, and notes where the
        /// subscription starts, so that a later resume continues from there.
        fn acked(&mut self, ack: &Value, start: &Start) {
            let now = ack["seq"].as_u64().unwrap_or(0);
            let epoch = ack["epoch"].as_str().map(str::to_string);
            if ack["recovered"] == false {
                let after = self
                    .asked
                    .map_or(String::new(), |seq| format!(" after seq {seq}"));
                let changed = match (&self.epoch, &epoch) {
                    (Some(old), Some(new)) if old != new => {
                        format!(" (the topic's epoch changed from {old} to {new})")
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    io::stderr(),
                    "pubsub-backend sub: {}: recovered false: the events{after} up to seq {now} \
                     could not be recovered{changed}; going on live from seq {}",
                    self.topic,
                    now + 1
                );
                self.last = Some(now);
            } else if self.last.is_none() {
                // The replay about to come (last_n), or nothing (a live start), comes after this.
                self.last = Some(match start {
                    Start::LastN(n) => now.saturating_sub(*n),
                    Start::Since { seq, .. } => *seq,
                });
            }
            self.epoch = epoch;
        }
    }

    /// `sub`: prints every event of `topics`, one JSON line each, until `count` events, Ctrl-C
    /// or SIGTERM; reconnects and resumes whenever the connection ends.
    fn subscribe(
        target: &Target,
        topics: &[String],
        start: &Start,
        count: Option<u64>,
    ) -> Result<(), String> {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|e| e.to_string())?;
        }
        let mut positions: Vec<Position> = topics
            .iter()
            .map(|topic| Position {
                topic: topic.clone(),
                epoch: None,
                last: None,
                asked: None,
            })
            .collect();
        let mut printed = 0u64;
        let mut backoff = BACKOFF_FIRST;
        let mut out = io::stdout().lock();
        while !stop.load(Ordering::SeqCst) {
            let ended = follow(
                target,
                &mut positions,
                start,
                &stop,
                count,
                &mut printed,
                &mut out,
                &mut backoff,
            );
            match ended {
                Ok(()) => return Ok(()),
                Err(Ended::Fatal(message)) => return Err(message),
                Err(Ended::Retry(why)) => {
                    let _ = writeln!(
                        io::stderr(),
                        "pubsub-backend sub: {why}; reconnecting in {backoff:?}"
                    );
                }
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                thread::sleep(SIGNAL_POLL.min(until.saturating_duration_since(Instant::now())));
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
        Ok(())
    }

    /// Why a connection of `sub` ended.
    enum Ended {
        /// Reconnect and resume.
        Retry(String),
        /// Give up.
        Fatal(String),
    }

    /// One connection of `sub`: subscribes (resuming where it can) and prints events until the
    /// connection ends (`Err`) or `sub` is done (`Ok`).
    #[allow(clippy::too_many_arguments)]
    fn follow(
        target: &Target,
        positions: &mut [Position],
        start: &Start,
        stop: &AtomicBool,
        count: Option<u64>,
        printed: &mut u64,
        out: &mut impl Write,
        backoff: &mut Duration,
    ) -> Result<(), Ended> {
        let mut socket = match open_websocket(target) {
            Ok(socket) => socket,
            // A refusal that retrying cannot mend: a wrong key, a forbidden origin.
            Err(message) if message.contains(" 401 ") || message.contains(" 403 ") => {
                return Err(Ended::Fatal(message))
            }
            Err(message) => return Err(Ended::Retry(message)),
        };
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            let _ = stream.set_read_timeout(Some(SIGNAL_POLL));
        }
        let retry = |e: tungstenite::Error| Ended::Retry(e.to_string());
        for position in positions.iter_mut() {
            send(&mut socket, &position.request(start)).map_err(retry)?;
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                let _ = socket.close(None);
                return Ok(());
            }
            let text = match socket.read() {
                Ok(Message::Text(text)) => text,
                Ok(Message::Close(frame)) => {
                    let why = frame.map_or("closed".to_string(), |f| {
                        format!("closed: {} {}", f.code, f.reason)
                    });
                    return Err(Ended::Retry(why));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(retry(e)),
            };
            let message: Value = serde_json::from_str(&text).unwrap_or_default();
            let topic = message["topic"].as_str().unwrap_or_default();
            let position = positions.iter_mut().find(|p| p.topic == topic);
            match (message["type"].as_str().unwrap_or_default(), position) {
                ("event", Some(position)) => {
                    writeln!(out, "{text}")
                        .and_then(|()| out.flush())
                        .map_err(|e| Ended::Fatal(format!("stdout: {e}")))?;
                    position.last = message["seq"].as_u64().or(position.last);
                    *printed += 1;
                    if count.is_some_and(|count| *printed >= count) {
                        let _ = socket.close(None);
                        return Ok(());
                    }
                }
                ("ack", Some(position)) => {
                    *backoff = BACKOFF_FIRST;
                    position.acked(&message, start);
                }
                ("error", Some(position)) if message["error"]["code"] == "SUBSCRIPTION_GAP" => {
                    let _ = writeln!(
                        io::stderr(),
                        "pubsub-backend sub: {topic}: {}; resuming",
                        message["error"]["message"]
                    );
                    send(&mut socket, &position.request(start)).map_err(retry)?;
                }
                ("error", _) if message["error"]["code"] == "SLOW_CONSUMER" => {
                    // The server closes next; the reconnection resumes from the last event printed.
                    let _ = writeln!(
                        io::stderr(),
                        "pubsub-backend sub: cut as a slow consumer; resuming"
                    );
                }
                ("error", Some(position)) if message["error"]["code"] == "TOPIC_NOT_FOUND" => {
                    return Err(Ended::Retry(format!(
                        "topic {:?} does not exist (yet)",
                        position.topic
                    )));
                }
                // Shutting down, or Redis away in cluster mode: it passes.
                ("error", _) if message["error"]["code"] == "INTERNAL" => {
                    return Err(Ended::Retry(format!("{}", message["error"]["message"])));
                }
                ("error", _) => {
                    return Err(Ended::Fatal(format!(
                        "{}: {}",
                        message["error"]["code"], message["error"]["message"]
                    )));
                }
                ("info", Some(position)) if message["msg"] == "topic_deleted" => {
                    let _ = writeln!(
                        io::stderr(),
                        "pubsub-backend sub: topic {:?} was deleted; waiting for it",
                        position.topic
                    );
                    position.epoch = None;
                    position.last = None;
                    return Err(Ended::Retry("topic deleted".into()));
                }
                _ => {}
            }
        }
    }
}

mod console {
    //! The live console served at `GET /` (unless `CONSOLE=off`): one self-contained page, no
    //! external resources, that lists topics with their counts, creates and deletes them,
    //! subscribes with `last_n`, publishes JSON and shows events as they arrive with `seq` and
    //! `ts`. It talks to this server's own REST API and `/ws`, with the API key typed into it.
    //!
    //! Owns: the page. Must never: load anything from another origin.

    // USES_console

    /// The live console served at `GET /` (unless `CONSOLE=off`): one self-contained page, no
    /// external resources, that lists topics with their counts, creates and deletes them,
    /// subscribes with `last_n`, publishes JSON and shows events as they arrive with `seq` and
    /// `ts`. It talks to this server's own REST API and `/ws`, with the API key typed into it.
    pub(crate) const CONSOLE_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pubsub-backend console</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#dde1e8; --accent:#2f6fed; --bad:#c62f3b; --good:#1f8a4c; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--ink); }
  header { display:flex; gap:16px; align-items:center; padding:12px 20px; background:var(--ink); color:#fff; }
  header h1 { font-size:16px; margin:0; font-weight:600; }
  header .spacer { flex:1; }
  header input { width:220px; }
  main { display:grid; grid-template-columns: minmax(320px, 1fr) minmax(360px, 1.3fr); gap:16px; padding:16px 20px; }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  h2 { font-size:13px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); margin:0 0 10px; }
  form { display:flex; gap:8px; flex-wrap:wrap; margin:0 0 12px; }
  input, textarea { font:inherit; padding:6px 8px; border:1px solid var(--line); border-radius:6px; }
  textarea { width:100%; min-height:70px; font-family:ui-monospace, Menlo, monospace; font-size:12px; }
  button { font:inherit; padding:6px 12px; border:0; border-radius:6px; background:var(--accent); color:#fff; cursor:pointer; }
  button.link { background:none; color:var(--bad); padding:2px 6px; }
  table { width:100%; border-collapse:collapse; }
  th, td { text-align:left; padding:5px 6px; border-bottom:1px solid var(--line); }
  th { color:var(--muted); font-weight:500; font-size:12px; }
  td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
  #events { list-style:none; margin:0; padding:0; max-height:420px; overflow:auto; }
  #events li { border-bottom:1px solid var(--line); padding:6px 2px; }
  #events .meta { color:var(--muted); font-size:12px; }
  #events pre { margin:2px 0 0; white-space:pre-wrap; word-break:break-all; font-size:12px; }
  #log { font:12px ui-monospace, Menlo, monospace; color:var(--muted); max-height:140px; overflow:auto; white-space:pre-wrap; margin:8px 0 0; }
  .status { font-size:12px; padding:2px 8px; border-radius:10px; background:#555; }
  .status.open { background:var(--good); }
  .status.closed { background:var(--bad); }
</style>
</head>
<body>
<header>
  <h1>pubsub-backend console</h1>
  <span class="spacer"></span>
  <a href="/openapi.json" style="color:#fff">OpenAPI</a>
  <a href="/asyncapi.json" style="color:#fff">AsyncAPI</a>
  <label>API key <input id="api-key" type="password" placeholder="only if API_KEY is set" autocomplete="off"></label>
  <span id="ws-status" class="status">WebSocket: not connected</span>
</header>
<main>
  <div>
    <section>
      <h2>Topics</h2>
      <form id="create-form"><input id="topic-name" placeholder="new topic, e.g. orders" required><button id="create-topic">Create</button></form>
      <table><thead><tr><th>Name</th><th class="num">Subscribers</th><th class="num">Messages</th><th></th></tr></thead><tbody id="topics"></tbody></table>
    </section>
    <section style="margin-top:16px">
      <h2>Publish</h2>
      <form id="publish-form">
        <input id="pub-topic" placeholder="topic" required>
        <textarea id="pub-payload">{"hello": "world"}</textarea>
        <button id="publish">Publish</button>
      </form>
      <div id="log"></div>
    </section>
  </div>
  <section>
    <h2>Subscribe</h2>
    <form id="subscribe-form">
      <input id="sub-topic" placeholder="topic" required>
      <input id="sub-last-n" type="number" min="0" value="10" style="width:90px" title="last_n: events to replay">
      <button id="subscribe">Subscribe</button>
    </form>
    <ul id="events"></ul>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("pubsub-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("pubsub-api-key", keyInput.value); reconnect(); refresh(); });
const apiKey = () => keyInput.value.trim();

function log(line) {
  const el = $("log");
  el.textContent = new Date().toISOString().slice(11, 23) + "  " + line + "\n" + el.textContent.slice(0, 8000);
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(response.status + " " + ((data.error && data.error.message) || response.statusText));
  return data;
}

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function refresh() {
  try {
    const stats = (await api("GET", "/stats")).topics;
    const rows = Object.keys(stats).sort().map((name) => {
      const t = stats[name];
      const tr = document.createElement("tr");
      tr.dataset.topic = name;
      tr.innerHTML = `<td></td><td class="num">${t.subscribers}</td><td class="num">${t.messages}</td><td><button class="link" title="delete">delete</button></td>`;
      tr.firstChild.textContent = name;
      tr.querySelector("button").onclick = async () => {
        try { await api("DELETE", "/topics/" + encodeURIComponent(name)); log("deleted " + name); refresh(); } catch (e) { log("delete failed: " + e.message); }
      };
      return tr;
    });
    $("topics").replaceChildren(...rows);
  } catch (e) { log("could not list topics: " + e.message); }
}

let ws = null;
const pending = [];
function connect() {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  ws = new WebSocket(url);
  const status = $("ws-status");
  ws.onopen = () => { status.textContent = "WebSocket: open"; status.className = "status open"; pending.splice(0).forEach((m) => ws.send(m)); };
  ws.onclose = (e) => { status.textContent = "WebSocket: closed (" + e.code + ")"; status.className = "status closed"; };
  ws.onmessage = (e) => show(JSON.parse(e.data));
}
function reconnect() { if (ws) ws.close(); ws = null; }
function send(message) {
  const text = JSON.stringify(message);
  if (!ws || ws.readyState > 1) connect();
  if (ws.readyState === 1) ws.send(text); else pending.push(text);
}

function show(m) {
  if (m.type === "event") {
    const li = document.createElement("li");
    li.innerHTML = `<div class="meta"></div><pre></pre>`;
    li.querySelector(".meta").textContent = `${m.topic}  seq ${m.seq}  ${m.ts}  id ${m.message.id}`;
    li.querySelector("pre").textContent = JSON.stringify(m.message.payload);
    $("events").prepend(li);
    refresh();
  } else if (m.type === "ack") {
    log(`ack ${m.request_id || ""} ${m.topic}` + (m.seq !== undefined ? ` seq ${m.seq}` : "") + (m.epoch ? ` epoch ${m.epoch}` : ""));
  } else if (m.type === "error") {
    log(`error ${m.error.code}: ${m.error.message}`);
  } else if (m.type === "info") {
    log(`info ${m.msg}` + (m.topic ? " " + m.topic : ""));
    if (m.msg === "topic_deleted") refresh();
  }
}

$("create-form").onsubmit = async (e) => {
  e.preventDefault();
  const name = $("topic-name").value.trim();
  try { await api("POST", "/topics", { name }); log("created " + name); $("topic-name").value = ""; refresh(); }
  catch (err) { log("create failed: " + err.message); }
};
$("subscribe-form").onsubmit = (e) => {
  e.preventDefault();
  const lastN = parseInt($("sub-last-n").value || "0", 10);
  send({ type: "subscribe", topic: $("sub-topic").value.trim(), client_id: "console", last_n: lastN, request_id: "sub-" + Date.now() });
};
$("publish-form").onsubmit = (e) => {
  e.preventDefault();
  let payload;
  try { payload = JSON.parse($("pub-payload").value); } catch (err) { log("payload is not JSON: " + err.message); return; }
  send({ type: "publish", topic: $("pub-topic").value.trim(), message: { id: uuid(), payload }, request_id: "pub-" + Date.now() });
};

refresh();
setInterval(refresh, 3000);
</script>
</body>
</html>
"##;
}
