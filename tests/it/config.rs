//! Settings and start-up: `--version`, `--help` and its settings table, which README.md's
//! configuration table must match name for name, flag for flag and default for default, the
//! settings the Dockerfile and docker-compose.yml set, the start-up log line, and refusal of
//! invalid values with one line naming the variable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::harness::{run_to_exit, Server};
use crate::http_client::health;

/// The exit code of a refused configuration: a usage error, as clap and most Unix tools use.
const CONFIG_ERROR_EXIT_CODE: i32 = 2;

/// One setting as documented: its flag and its default (`unset` when it has none, in `--help`
/// and in README.md alike).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    flag: String,
    default: String,
}

/// Settings by variable name.
type Settings = BTreeMap<String, Setting>;

/// A file of this repository, read whole.
fn repository_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Whether `word` is written like a setting: `PORT`, `MAX_MESSAGE_BYTES`.
fn is_setting_name(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The settings table of `--help`: rows of `  NAME  --flag  default  help text`, the default
/// being `unset` when there is none. Columns are separated by spaces, and a long name may push
/// the others right, so a row is read word by word.
fn help_settings(help: &str) -> Settings {
    let mut settings = Settings::new();
    for line in help.lines().filter(|line| line.starts_with("  ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [name, flag, default, ..] = words[..] else {
            continue;
        };
        if !is_setting_name(name) || !flag.starts_with("--") {
            continue;
        }
        let setting = Setting {
            flag: flag.to_owned(),
            default: default.to_owned(),
        };
        let previous = settings.insert(name.to_owned(), setting);
        assert!(previous.is_none(), "--help lists {name} twice:\n{help}");
    }
    settings
}

/// The configuration table of README.md: the table whose header names the columns
/// `variable`, `flag` and `default`; cells in backticks, `unset` for no default.
fn readme_settings(readme: &str) -> Settings {
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_start_matches('|')
            .split('|')
            .map(|cell| cell.trim().trim_matches('`').to_owned())
            .collect()
    };
    let is_separator = |row: &[String]| {
        row.iter()
            .all(|cell| cell.chars().all(|c| matches!(c, '-' | ':')))
    };
    let mut lines = readme.lines();
    lines
        .by_ref()
        .map(cells)
        .find(|header| header.starts_with(&["variable", "flag", "default"].map(String::from)))
        .expect("README.md has no table with the columns `variable | flag | default`");
    let mut settings = Settings::new();
    for line in lines.take_while(|line| line.trim_start().starts_with('|')) {
        let row = cells(line);
        if is_separator(&row) {
            continue;
        }
        assert!(row.len() >= 3, "README.md: a short row: {line}");
        let setting = Setting {
            flag: row[1].clone(),
            default: row[2].clone(),
        };
        let previous = settings.insert(row[0].clone(), setting);
        assert!(previous.is_none(), "README.md lists {} twice", row[0]);
    }
    settings
}

/// Every difference between two tables of settings, one line each; empty when they agree.
fn differences(help: &Settings, readme: &Settings) -> Vec<String> {
    let names: BTreeSet<&String> = help.keys().chain(readme.keys()).collect();
    let show = |setting: &Setting| format!("{} {}", setting.flag, setting.default);
    names
        .into_iter()
        .filter_map(|name| match (help.get(name), readme.get(name)) {
            (Some(help), None) => Some(format!(
                "  {name}: in --help ({}), not in README.md",
                show(help)
            )),
            (None, Some(readme)) => Some(format!(
                "  {name}: in README.md ({}), not in --help",
                show(readme)
            )),
            (Some(help), Some(readme)) if help != readme => Some(format!(
                "  {name}: --help says `{}`, README.md says `{}`",
                show(help),
                show(readme)
            )),
            _ => None,
        })
        .collect()
}

/// The settings table of `pubsub-backend --help`.
fn settings_of_the_binary() -> Settings {
    let run = run_to_exit(&["--help"], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let settings = help_settings(&run.stdout);
    assert!(
        !settings.is_empty(),
        "no settings table in --help:\n{}",
        run.stdout
    );
    settings
}

/// The setting names a Dockerfile's `ENV` instructions set (`ENV A=1 B=2`, continued over
/// lines with `\`, or the older `ENV A 1`).
fn dockerfile_settings(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    // Comment and empty lines are dropped before continuations are joined, as Docker does.
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
        .iter()
        .filter_map(|instruction| {
            let (keyword, rest) = instruction.trim().split_once(char::is_whitespace)?;
            keyword.eq_ignore_ascii_case("ENV").then_some(rest)
        })
        .flat_map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.first().is_some_and(|word| !word.contains('=')) {
                // `ENV NAME value`: one variable.
                vec![words[0].to_owned()]
            } else {
                words
                    .iter()
                    .filter_map(|word| word.split_once('='))
                    .map(|(name, _)| name.to_owned())
                    .collect()
            }
        })
        .collect()
}

/// The variable names under every `environment:` key of a compose file, in map form
/// (`NAME: value`, `NAME:`) or list form (`- NAME=value`, `- NAME`).
fn compose_settings(compose: &str) -> Vec<String> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut names = Vec::new();
    let mut environment_indent = None;
    for line in compose.lines() {
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if let Some(outer) = environment_indent {
            if indent(line) > outer {
                let entry = text.strip_prefix("- ").unwrap_or(text);
                let name = entry.split([':', '=']).next().unwrap_or_default().trim();
                names.push(name.trim_matches(['"', '\'']).to_owned());
                continue;
            }
            environment_indent = None;
        }
        if text == "environment:" {
            environment_indent = Some(indent(line));
        }
    }
    names
}

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
    let listed = help_settings(&run.stdout);
    // Every flag is its variable's name, lower case with hyphens: PORT is --port.
    for (name, setting) in &listed {
        let flag = format!("--{}", name.to_ascii_lowercase().replace('_', "-"));
        assert_eq!(setting.flag, flag, "{name}: {run:?}");
    }
    for variable in readme_settings(&repository_file("README.md")).keys() {
        assert!(
            listed.contains_key(variable),
            "--help omits {variable}: {run:?}"
        );
    }
}

#[test]
fn help_and_readme_list_the_same_settings_flags_and_defaults() {
    let help = settings_of_the_binary();
    let readme = readme_settings(&repository_file("README.md"));
    let differences = differences(&help, &readme);
    assert!(
        differences.is_empty(),
        "README.md's configuration table and `pubsub-backend --help` disagree:\n{}",
        differences.join("\n")
    );
}

#[test]
fn the_dockerfile_and_docker_compose_set_only_settings_the_binary_knows() {
    let known = settings_of_the_binary();
    let mut problems = Vec::new();
    for (file, names) in [
        (
            "Dockerfile",
            dockerfile_settings(&repository_file("Dockerfile")),
        ),
        (
            "docker-compose.yml",
            compose_settings(&repository_file("docker-compose.yml")),
        ),
    ] {
        if names.is_empty() {
            problems.push(format!(
                "  {file}: no setting found (has its format changed?)"
            ));
        }
        for name in names {
            if !is_setting_name(&name) {
                problems.push(format!("  {file}: {name:?} is not a setting name"));
            } else if !known.contains_key(&name) {
                problems.push(format!("  {file}: {name} is not a setting of the binary"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}
The binary's settings (`pubsub-backend --help`): {}",
        problems.join("\n"),
        known.keys().cloned().collect::<Vec<_>>().join(" ")
    );
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
fn an_invalid_console_or_cors_setting_stops_start_up() {
    for (variable, value) in [("CONSOLE", "maybe"), ("CORS_ORIGINS", " , ")] {
        let run = run_to_exit(&[], &[(variable, value)]);
        assert_eq!(
            run.code,
            Some(CONFIG_ERROR_EXIT_CODE),
            "{variable}={value:?}: {run:?}"
        );
        assert!(run.stderr.contains(variable), "{run:?}");
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
