//! Start-up: flags, the start-up log line, and refusal of invalid configuration (SPEC section 1).

use crate::harness::{run_to_exit, Server, CONFIG_VARIABLES};
use crate::http_client::health;

/// The exit code of a refused configuration: a usage error, as clap and most Unix tools use.
const CONFIG_ERROR_EXIT_CODE: i32 = 2;

#[test]
fn version_flag_prints_the_version_and_exits_zero() {
    let run = run_to_exit(&["--version"], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("0.1.0"), "{run:?}");
}

#[test]
fn help_flag_lists_every_variable_and_exits_zero() {
    let run = run_to_exit(&["--help"], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for variable in CONFIG_VARIABLES {
        assert!(
            run.stdout.contains(variable),
            "--help omits {variable}: {run:?}"
        );
    }
}

#[test]
fn invalid_values_stop_start_up_with_one_line_naming_the_variable() {
    let invalid = [
        ("PORT", "70000"),
        ("PORT", "http"),
        ("RING_SIZE", "abc"),
        ("RING_SIZE", "-1"),
        ("QUEUE_SIZE", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("HEARTBEAT_SEC", "0"),
        ("HEARTBEAT_SEC", "-1"),
        ("HEARTBEAT_SEC", "often"),
        ("SHUTDOWN_GRACE_SEC", "soon"),
        ("WRITE_TIMEOUT_SEC", "ten"),
        ("WRITE_LINGER_MS", "-1"),
        ("WRITE_LINGER_MS", "1001"),
        ("WRITE_LINGER_MS", "2ms"),
        ("MAX_MESSAGE_BYTES", "1MB"),
        ("API_KEY", ""),
    ];
    for (variable, value) in invalid {
        let run = run_to_exit(&[], &[(variable, value)]);
        assert_eq!(
            run.code,
            Some(CONFIG_ERROR_EXIT_CODE),
            "{variable}={value:?}: {run:?}"
        );
        let lines: Vec<&str> = run
            .stderr
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{variable}={value:?}: not one line: {run:?}"
        );
        assert!(lines[0].contains(variable), "{variable}={value:?}: {run:?}");
    }
}

#[test]
fn valid_uncommon_values_are_accepted() {
    let server = Server::start_with(&[
        ("LOG_LEVEL", "debug"),
        ("HEARTBEAT_SEC", "0.75"),
        ("RING_SIZE", "1"),
        ("QUEUE_SIZE", "1"),
        ("WRITE_LINGER_MS", "0.5"),
    ]);
    health(server.addr);
}

#[test]
fn start_up_line_names_the_rest_and_websocket_addresses() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let lines = server.log_lines();
    let line = lines
        .iter()
        .find(|line| line.contains(&format!("listening on {addr}")))
        .unwrap();
    assert!(
        line.contains(&format!("{addr}/ws")),
        "no WebSocket address: {line}"
    );
    assert!(
        line.to_ascii_uppercase().contains("INFO"),
        "no level: {line}"
    );
}
