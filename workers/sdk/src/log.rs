//! One log line style for every baton process.
//!
//! The acceptor logs through `tracing` (text, or JSON with `--log-format
//! json`) and tells the workers it spawns which format it uses in
//! [`FORMAT_ENV`]. Workers that log through `tracing` (baton-static) set up
//! the same format from it; workers that do not (baton-echo, baton-chaos,
//! a worker of yours) write their lines with [`line`], which writes the same
//! shape `tracing-subscriber` does, with the program and pid where a span
//! would be:
//!
//! ```text
//! 2026-12-03T12:00:00.123456Z  INFO baton-echo{pid=4242}: worker 1 exiting after 3 connections
//! {"timestamp":"2026-12-03T12:00:00.123456Z","level":"INFO","fields":{"message":"worker 1 exiting after 3 connections"},"target":"baton-echo","span":{"pid":4242,"name":"baton-echo"}}
//! ```
//!
//! No colour: these lines usually go to a pipe or a file.

use std::fmt;
use std::io::Write;

/// The environment variable that carries the log format, `text` or `json`.
pub const FORMAT_ENV: &str = "BATON_LOG_FORMAT";

/// Whether [`FORMAT_ENV`] asks for JSON lines.
pub fn json_from_env() -> bool {
    std::env::var(FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// How bad it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
        }
    }
}

/// Formats one line (with its newline) of `program` in the process's log
/// format.
pub fn format(level: Level, program: &str, message: fmt::Arguments<'_>) -> String {
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    let pid = std::process::id();
    if json_from_env() {
        let v = serde_json::json!({
            "timestamp": now.to_string(),
            "level": level.as_str(),
            "fields": { "message": message.to_string() },
            "target": program,
            "span": { "pid": pid, "name": program },
        });
        format!("{v}\n")
    } else {
        format!(
            "{now} {:>5} {program}{{pid={pid}}}: {message}\n",
            level.as_str()
        )
    }
}

/// Writes one line to stderr in a single write(2), so that it never
/// interleaves with another process's lines on a shared stderr.
pub fn line(level: Level, program: &str, message: fmt::Arguments<'_>) {
    let _ = std::io::stderr().write_all(format(level, program, message).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_looks_like_tracing() {
        // The test process has no FORMAT_ENV unless someone exports it.
        if json_from_env() {
            return;
        }
        let l = format(Level::Info, "baton-echo", format_args!("hello {}", 1));
        let pid = std::process::id();
        assert!(
            l.ends_with(&format!("  INFO baton-echo{{pid={pid}}}: hello 1\n")),
            "{l}"
        );
    }
}
