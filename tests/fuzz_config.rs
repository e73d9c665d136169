//! Fuzz target: the TOML config file (`baton::file::parse`, and the
//! options it declares, `baton::options::Options`).
//!
//! Properties:
//! * no panic for any text, nor for valid config files mutated byte by
//!   byte;
//! * a file that is not TOML at all is refused with the position toml
//!   reports, as "line N, column M: ", N and M counted from 1 in the text;
//! * every "line N, column M" an error names lies within the text;
//! * generated valid files parse to exactly the values written.

mod fuzzing;

use std::time::Duration;

use baton::file;
use baton::options::Options;
use proptest::prelude::*;

const EXAMPLE: &str = r#"listen = ["127.0.0.1:8080", "[::1]:8080"]
backlog = 1024
control = "/run/baton.sock"
control-allow-uid = [1000]
control-idle-timeout = "30s"
worker-socket = "/run/baton-workers.sock"
worker-allow-uid = [33, 1001]
shutdown-timeout = "10s"
log-format = "json"
log-level = "info"
metrics-listen = "127.0.0.1:9100"

[pool]
command = ["/usr/local/bin/baton-static", "--root", "/srv/www"]
workers = 4
min-workers = 2
max-workers = 8
scale-idle-timeout = "5m"
worker-connections = 1024
balance = "least-conn"
hello-timeout = "5s"
ack-timeout = "2s"
drain-timeout = "30s"
max-restarts = 5
restart-window = "1m"
user = "www-data"
group = "www-data"
chroot = "/srv/www"
seccomp = "default"
unshare = "ipc,uts"
no-fork = false
allow-root-workers = false
no-sandbox = false
worker-require-sandbox = true
"#;

/// The (line, column) of byte `at`, both from 1, columns in bytes.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = before.len()
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, col)
}

/// "line N, column M: ..." as (N, M).
fn prefix(e: &str) -> Option<(usize, usize)> {
    let rest = e.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(", column ")?;
    let (col, _) = rest.split_once(": ")?;
    Some((line.parse().ok()?, col.parse().ok()?))
}

fn check(text: &str) -> Result<(), TestCaseError> {
    let got = file::parse(text).map_err(|e| e.to_string());
    let syntax = toml::from_str::<toml::Table>(text);
    match (&got, &syntax) {
        (Ok(_), Err(e)) => prop_assert!(false, "not TOML ({}), yet accepted", e.message()),
        (Err(e), Err(te)) => {
            if let Some(span) = te.span() {
                let want = position(text, span.start);
                prop_assert_eq!(prefix(e), Some(want), "error {:?}", e);
            }
        }
        _ => {}
    }
    if let Err(e) = &got {
        prop_assert!(!e.is_empty());
        if let Some((line, col)) = prefix(e) {
            let lines: Vec<&str> = text.split('\n').collect();
            prop_assert!(line >= 1 && line <= lines.len(), "{:?}", e);
            prop_assert!(col >= 1 && col <= lines[line - 1].len() + 1, "{:?}", e);
        }
    }
    Ok(())
}

#[test]
fn arbitrary_text_never_panics() {
    fuzzing::run("config-bytes", 2000, fuzzing::bytes(0..200), |b| {
        check(&String::from_utf8_lossy(&b))
    });
}

#[test]
fn mutated_config_files_never_panic() {
    let seeds = vec![
        EXAMPLE.as_bytes().to_vec(),
        b"[pool]\ncommand = ['/bin/cat']\nworkers = 3\n".to_vec(),
        "listen = [\"127.0.0.1:0\"] # caf\u{e9}\n[pool]\nuser = \"\u{fc}ser\"\n"
            .as_bytes()
            .to_vec(),
    ];
    assert!(file::parse(EXAMPLE).is_ok());
    fuzzing::run("config-mutated", 2000, fuzzing::mutated(seeds, 6), |b| {
        check(&String::from_utf8_lossy(&b))
    });
}

/// Settings a generated file carries (the rest stays absent).
#[derive(Debug, Clone)]
struct Written {
    listen: Vec<String>,
    backlog: Option<i32>,
    allow: Vec<u32>,
    workers: Option<usize>,
    max_restarts: Option<u32>,
    drain_ms: Option<u64>,
    command: Vec<String>,
    user: Option<String>,
    no_fork: bool,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Written {
    fn text(&self) -> String {
        let mut t = String::new();
        let list = |v: &[String]| v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
        t += &format!("listen = [{}]\n", list(&self.listen));
        if let Some(b) = self.backlog {
            t += &format!("backlog = {b}\n");
        }
        let allow: Vec<String> = self.allow.iter().map(u32::to_string).collect();
        t += &format!("control-allow-uid = [{}]\n\n[pool]\n", allow.join(","));
        if let Some(w) = self.workers {
            t += &format!("workers = {w}\n");
        }
        if let Some(m) = self.max_restarts {
            t += &format!("max-restarts = {m}\n");
        }
        if let Some(d) = self.drain_ms {
            t += &format!("drain-timeout = \"{d}ms\"\n");
        }
        t += &format!("command = [{}]\n", list(&self.command));
        if let Some(u) = &self.user {
            t += &format!("user = {}\n", q(u));
        }
        t += &format!("no-fork = {}\n", self.no_fork);
        t
    }
}

fn written() -> impl Strategy<Value = Written> {
    let text = || prop_oneof![".{0,12}", "[a-z0-9:./\\[\\]-]{1,16}"];
    (
        prop::collection::vec(text(), 0..3),
        prop::option::of(any::<i32>()),
        prop::collection::vec(any::<u32>(), 0..3),
        // toml integers are i64.
        prop::option::of(0usize..=i64::MAX as usize),
        prop::option::of(any::<u32>()),
        prop::option::of(0u64..1 << 40),
        prop::collection::vec(text(), 0..4),
        prop::option::of(text()),
        any::<bool>(),
    )
        .prop_map(
            |(listen, backlog, allow, workers, max_restarts, drain_ms, command, user, no_fork)| {
                Written {
                    listen,
                    backlog,
                    allow,
                    workers,
                    max_restarts,
                    drain_ms,
                    command,
                    user,
                    no_fork,
                }
            },
        )
}

#[test]
fn generated_files_parse_to_what_was_written() {
    fuzzing::run("config-valid", 500, written(), |w| {
        let text = w.text();
        if let Err(e) = file::parse(&text) {
            prop_assert!(false, "{} refused: {}", text, e);
        }
        let f: Options = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                prop_assert!(
                    false,
                    "{} accepted by file::parse, refused by Options: {}",
                    text,
                    e
                );
                unreachable!()
            }
        };
        prop_assert_eq!(&f.listen, &w.listen);
        if let Some(b) = w.backlog {
            prop_assert_eq!(f.backlog, b);
        }
        prop_assert_eq!(&f.control_allow_uid, &w.allow);
        prop_assert_eq!(f.pool.workers, w.workers);
        if let Some(m) = w.max_restarts {
            prop_assert_eq!(f.pool.max_restarts, m);
        }
        if let Some(ms) = w.drain_ms {
            prop_assert_eq!(f.pool.drain_timeout, Duration::from_millis(ms));
        }
        let command: Vec<String> = f
            .pool
            .command
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        prop_assert_eq!(&command, &w.command);
        prop_assert_eq!(&f.pool.sandbox.user, &w.user);
        prop_assert_eq!(f.pool.sandbox.no_fork, w.no_fork);
        check(&text)
    });
}

/// Errors past multi-byte characters still name their line and column (in
/// bytes); out-of-range values and absurd durations are refused, not
/// wrapped or panicked on.
#[test]
fn hostile_files_are_refused_with_a_position() {
    let e = file::parse("user = \"\u{e9}\u{e9}\"\n[pool]\n\u{e9}x = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("line 3, column 1:"), "{e}");
    let e = file::parse("backlog = 99999999999\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("line 1,"), "{e}");
    let e = file::parse("[pool]\nworkers = -1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("line 2,"), "{e}");
    let e = file::parse("[pool]\ndrain-timeout = \"99999999999999999999999999s\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a duration"), "{e}");
    let deep = format!("listen = {}", "[".repeat(50_000));
    assert!(file::parse(&deep).is_err());
}
