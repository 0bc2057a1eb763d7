//! A `redis-server` of a test's own, for cluster mode: started on a free port of 127.0.0.1 with
//! no persistence unless asked, talked to over a raw socket (RESP), and stopped by its pid. No
//! test talks to a Redis it did not start.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::wait_until;

/// A running `redis-server`, killed when dropped.
pub struct Redis {
    pub port: u16,
    /// Its working directory: where `SAVE` writes the snapshot a restart loads.
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Starts one, or returns `None` when `redis-server` is not installed, so that `cargo test`
    /// runs on a machine without it. With `CI` set (as `.ci/run` does, after installing it)
    /// a missing `redis-server` fails the test instead.
    pub fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed (apt-get install redis-server)"
            );
            eprintln!("SKIP: redis-server is not installed; the cluster tests need it");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("pubsub-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut redis = Redis {
            port,
            dir,
            child: None,
        };
        redis.launch();
        Some(redis)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        self.child = Some(child);
        wait_until("redis-server answers PING", || {
            self.try_command(&["PING"])
                .is_some_and(|reply| reply == "PONG")
        });
    }

    /// Sends one command and returns its reply: a simple or bulk string, an integer as text,
    /// or an error as `ERR ...`; `None` when Redis does not answer.
    pub fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request += &format!("${}\r\n{arg}\r\n", arg.len());
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at(line.len().min(1));
        match kind {
            "+" | ":" => Some(rest.to_string()),
            "-" => Some(format!("ERR {rest}")),
            "$" => {
                let length: i64 = rest.parse().ok()?;
                if length < 0 {
                    return Some(String::new());
                }
                let mut body = vec![0u8; length as usize + 2];
                reader.read_exact(&mut body).ok()?;
                body.truncate(length as usize);
                String::from_utf8(body).ok()
            }
            _ => None,
        }
    }

    /// Sends one command and returns its reply; panics when Redis does not answer.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("redis-server did not answer {args:?}"))
    }

    /// Kills the process (SIGKILL, by its pid) and waits for it: what a crash looks like.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory: with the snapshot of the last `SAVE`
    /// if there was one, else empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
