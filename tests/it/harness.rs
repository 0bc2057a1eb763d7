//! Launching the server binary, signalling and reaping it, and waiting for conditions.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http_client::try_http_raw;

/// The longest any single wait in a test may take before it counts as a failure.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How long a refused start-up may take: a config error must stop the process at once.
const START_UP_REFUSAL_DEADLINE: Duration = Duration::from_secs(5);

/// How often [`wait_until`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The text before the address in the server's start-up log line.
const LISTENING_MARKER: &str = "listening on ";

/// A running server on a free port of 127.0.0.1, killed when dropped.
pub struct Server {
    /// Where the server accepts REST and WebSocket connections.
    pub addr: SocketAddr,
    child: Child,
    /// Every stderr line so far, appended by the `log_drain` thread.
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr until EOF, so the server never blocks on a full pipe.
    log_drain: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the server with the test defaults (`HOST=127.0.0.1 PORT=0 LOG_LEVEL=DEBUG`).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts the server with `overrides` on top of the test defaults and waits until it listens.
    pub fn start_with(overrides: &[(&str, &str)]) -> Server {
        Server::launch(server_command(overrides))
    }

    /// Starts the server through `wrapper`, a command that ends by exec'ing the binary given as
    /// its last argument (such as `["prlimit", "--nofile=128:128", "--"]`), so that the process,
    /// and [`Server::pid`], are the server's own.
    pub fn start_wrapped(wrapper: &[&str], overrides: &[(&str, &str)]) -> Server {
        let (program, args) = wrapper.split_first().expect("an empty wrapper");
        let mut command = Command::new(program);
        command.args(args).arg(env!("CARGO_BIN_EXE_pubsub-backend"));
        configure(&mut command, overrides);
        // A wrapper may run further programs by name (`prlimit ... -- setpriv ...`).
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        Server::launch(command)
    }

    fn launch(mut command: Command) -> Server {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot launch the server binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_drain = drain_lines(child.stderr.take().unwrap(), Arc::clone(&log));
        // Built before the wait so that `Drop` kills the child if the wait panics.
        let mut server = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            log,
            log_drain: Some(log_drain),
        };
        server.addr = server.await_listening_address();
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The server's threads, open file descriptors and resident memory, from `/proc`.
    pub fn usage(&self) -> Usage {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|error| panic!("cannot read /proc/{pid}/status: {error}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|error| panic!("cannot list /proc/{pid}/fd: {error}"))
            .count();
        Usage {
            threads: field("Threads:") as usize,
            fds,
            rss_kib: field("VmRSS:"),
        }
    }

    /// Waits until the server has served a request and holds no client connection any more:
    /// from then on its descriptors are those of an idle server. (The start-up line comes
    /// before the acceptor thread has opened the descriptor it keeps in reserve.)
    pub fn wait_until_accepting(&self) {
        wait_until("GET /health is served", || {
            try_http_raw(
                self.addr,
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .is_some_and(|response| response.status == 200)
        });
        wait_until("the server holds no client connection", || {
            self.client_connections() == 0
        });
    }

    /// How many TCP connections the server's descriptors hold (its listening socket aside).
    pub fn client_connections(&self) -> usize {
        let pid = self.pid();
        // Column 2 is the local address, 4 the state (0A: listening), 10 the inode.
        let connected: HashSet<String> = ["tcp", "tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
            .flat_map(|table| {
                table
                    .lines()
                    .skip(1)
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        (fields.get(3) != Some(&"0A"))
                            .then(|| fields.get(9).map(|s| s.to_string()))?
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|error| panic!("cannot list /proc/{pid}/fd: {error}"))
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .filter(|inode| connected.contains(inode))
            .count()
    }

    /// A copy of the stderr lines logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Every stderr line the server ever wrote; only valid once it has exited.
    pub fn log_lines_after_exit(&mut self) -> Vec<String> {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the server is still running"
        );
        if let Some(log_drain) = self.log_drain.take() {
            log_drain.join().unwrap();
        }
        self.log_lines()
    }

    /// Sends SIGTERM, as `docker stop` does.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (such as `"INT"`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for_exit(&mut self.child, timeout)
    }

    fn await_listening_address(&mut self) -> SocketAddr {
        let started = Instant::now();
        loop {
            let lines = self.log_lines();
            if let Some(addr) = lines.iter().find_map(|line| parse_listening_address(line)) {
                return addr;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the server exited ({status}) before listening; stderr:\n{lines:#?}");
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no `{LISTENING_MARKER}` line within {DEADLINE:?}; stderr:\n{lines:#?}"
            );
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGKILL: the process may already be gone, which is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `/proc` says a process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub threads: usize,
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: usize,
    /// Resident memory (`VmRSS`), in KiB.
    pub rss_kib: u64,
}

/// What a process that ran to its end printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` and `overrides` and waits for it to exit on its own, which it
/// must do promptly (flags, refused configuration).
pub fn run_to_exit(args: &[&str], overrides: &[(&str, &str)]) -> Finished {
    let mut child = server_command(overrides)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot launch the server binary");
    let stdout = read_in_background(child.stdout.take().unwrap());
    let stderr = read_in_background(child.stderr.take().unwrap());
    let status = wait_for_exit(&mut child, START_UP_REFUSAL_DEADLINE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let finished = Finished {
        code: status.and_then(|status| status.code()),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "{args:?} with {overrides:?} still ran after {START_UP_REFUSAL_DEADLINE:?}: {finished:?}"
    );
    finished
}

/// Polls `condition` until it holds; panics naming `what` after [`DEADLINE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting until {what}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// The binary with a clean configuration: test defaults, then `overrides`.
fn server_command(overrides: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pubsub-backend"));
    configure(&mut command, overrides);
    command
}

/// Gives `command` a clean configuration: an empty environment, so that nothing a developer's
/// shell exports can change what a test sees, then the test defaults, then `overrides`. Which
/// variables the server reads is its own business (`--help` lists them; config.rs checks that
/// list against README.md).
fn configure(command: &mut Command, overrides: &[(&str, &str)]) {
    command
        .env_clear()
        .envs([("HOST", "127.0.0.1"), ("PORT", "0"), ("LOG_LEVEL", "DEBUG")])
        .envs(overrides.iter().copied())
        .stdin(Stdio::null());
}

/// The address in a line such as `... listening on 127.0.0.1:41234 (ws://127.0.0.1:41234/ws)`;
/// `None` for other lines, including tiny_http's own `Server listening on "name" (abstract)`.
fn parse_listening_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(LISTENING_MARKER)?;
    let word = rest.split_whitespace().next()?;
    let word = word.trim_start_matches("http://");
    word.trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn drain_lines(stderr: ChildStderr, log: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut stderr = BufReader::new(stderr);
        let mut line = Vec::new();
        while stderr.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            log.lock().unwrap().push(text);
            line.clear();
        }
    })
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A small deterministic pseudo-random generator (xorshift64), so every run tries the same
/// inputs and a failure can be replayed.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// A number below `bound` (> 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    /// `input` with one to four random edits: a byte replaced, inserted or deleted, a run
    /// duplicated, or the tail cut off.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut output = input.to_vec();
        for _ in 0..1 + self.below(4) {
            if output.is_empty() {
                output.push(self.byte());
                continue;
            }
            let at = self.below(output.len());
            match self.below(5) {
                0 => output[at] = self.byte(),
                1 => output.insert(at, self.byte()),
                2 => {
                    output.remove(at);
                }
                3 => {
                    let end = (at + 1 + self.below(16)).min(output.len());
                    let run = output[at..end].to_vec();
                    output.splice(at..at, run);
                }
                _ => output.truncate(at),
            }
        }
        output
    }
}
