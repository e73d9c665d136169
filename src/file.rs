//! The TOML config file (`--config baton.toml`): every option the flags
//! hold, with the same names ([`crate::options`] declares both), the
//! pool's in the `[pool]` table. Flags given on the command line override
//! it.
//!
//! ```toml
//! listen = ["127.0.0.1:8080", "[::1]:8080"]
//! backlog = 1024
//! control = "/run/baton.sock"
//! control-allow-uid = [1000]
//! worker-socket = "/run/baton-workers.sock"
//! shutdown-timeout = "10s"
//! log-format = "json"
//!
//! [pool]
//! command = ["/usr/local/bin/baton-static", "--root", "/srv/www"]
//! workers = 4
//! min-workers = 2
//! max-workers = 8
//! worker-connections = 1024
//! balance = "least-conn"
//! drain-timeout = "30s"
//! user = "www-data"
//! chroot = "/srv/www"
//! seccomp = "default"
//! unshare = "ipc,uts"
//! ```
//!
//! Several pools are `[[pool]]` sections, each with a `name` and its own
//! `listen` list (and any other pool key):
//!
//! ```toml
//! [[pool]]
//! name = "site"
//! listen = ["127.0.0.1:8080"]
//! root = "./public"
//! workers = 2
//!
//! [[pool]]
//! name = "echo"
//! listen = ["127.0.0.1:9000"]
//! command = ["target/release/baton-echo"]
//! workers = 1
//! user = "nobody"
//! ```
//!
//! Unknown keys are errors, reported with their line and column, so that a
//! typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::options::{Options, PoolOptions};
use crate::ConfigError;

/// Reads and checks `path`; returns its table as written (only the keys it
/// sets, so that the command line can be laid over it). Errors name the
/// file, line and column.
pub fn read(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|source| ConfigError::Syntax {
        path: path.to_path_buf(),
        source,
    })
}

/// A config file's text refused: where (1-based line and column, the
/// column in bytes) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct FileError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl FileError {
    /// The error `message` at byte `offset` of `text`.
    fn at(text: &str, offset: usize, message: String) -> FileError {
        let before = &text[..offset.min(text.len())];
        FileError {
            line: before.matches('\n').count() + 1,
            column: before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
            message,
        }
    }
}

/// Checks the text of a config file against the options' declaration and
/// returns its table.
pub fn parse(text: &str) -> Result<toml::Table, FileError> {
    if let Err(e) = toml::from_str::<Options>(text) {
        // The sandbox keys are flattened into `[pool]`, and serde reports
        // an error inside a flattened table at the table, not at the key:
        // find the key it is about.
        let (span, message) = in_pool(text)
            .filter(|(span, _)| {
                e.span()
                    .is_none_or(|s| s.start <= span.start && span.end <= s.end)
            })
            .unwrap_or_else(|| (e.span().unwrap_or(0..0), e.message().to_string()));
        return Err(FileError::at(text, span.start, message));
    }
    // Valid for `Options`, so valid TOML: this cannot fail, but say where
    // if it does.
    text.parse::<toml::Table>().map_err(|e| {
        FileError::at(
            text,
            e.span().map_or(0, |s| s.start),
            e.message().to_string(),
        )
    })
}

/// The first key of the `[pool]` table that [`PoolOptions`] refuses, with
/// the span to point at (the key when unknown, else its value) and why.
fn in_pool(text: &str) -> Option<(std::ops::Range<usize>, String)> {
    type Section = BTreeMap<Spanned<String>, Spanned<toml::Value>>;
    #[derive(Deserialize)]
    struct One {
        #[serde(default)]
        pool: Section,
    }
    #[derive(Deserialize)]
    struct Many {
        pool: Vec<Section>,
    }
    let sections = match toml::from_str::<One>(text) {
        Ok(one) => vec![one.pool],
        Err(_) => toml::from_str::<Many>(text).ok()?.pool,
    };
    sections.into_iter().find_map(pool_section_error)
}

/// The first key of one pool section that [`PoolOptions`] refuses.
fn pool_section_error(
    pool: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
) -> Option<(std::ops::Range<usize>, String)> {
    let mut entries: Vec<_> = pool.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries.into_iter().find_map(|(k, v)| {
        let (key, key_span) = (k.get_ref().clone(), k.span());
        let value_span = v.span();
        let one = toml::Table::from_iter([(key.clone(), v.into_inner())]);
        let e = PoolOptions::deserialize(toml::Value::Table(one)).err()?;
        let known = crate::options::file_keys()
            .into_iter()
            .filter(|(t, _)| *t == Some("pool"))
            .map(|(_, k)| format!("`{k}`"))
            .collect::<Vec<_>>();
        Some(if known.iter().any(|k| k == &format!("`{key}`")) {
            (value_span, format!("{key}: {}", e.message()))
        } else {
            (
                key_span,
                format!(
                    "unknown field `{key}`, expected one of {}",
                    known.join(", ")
                ),
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let t = parse(
            r#"
listen = ["127.0.0.1:0"]
log-format = "json"
[pool]
command = ["/bin/cat"]
workers = 3
balance = "round-robin"
drain-timeout = "1m"
user = "nobody"
unshare = "ipc,uts"
"#,
        )
        .unwrap();
        let o = Options::deserialize(toml::Value::Table(t)).unwrap();
        assert_eq!(o.listen, vec!["127.0.0.1:0"]);
        assert_eq!(o.pool.workers, Some(3));
        assert_eq!(o.pool.balance, crate::config::Balance::RoundRobin);
        assert_eq!(o.pool.drain_timeout, std::time::Duration::from_secs(60));
        assert_eq!(o.pool.sandbox.user.as_deref(), Some("nobody"));
        assert_eq!(o.pool.sandbox.unshare.to_string(), "ipc,uts");
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let e = parse("listen = [\"127.0.0.1:0\"]\n[pool]\nwrokers = 3\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        let e = e.to_string();
        assert!(e.starts_with("line 3, column 1:"), "{e}");
        assert!(e.contains("wrokers"), "{e}");
        assert!(e.contains("expected one of `workers`"), "{e}");
        let e = parse("[pool]\ndrain-timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2,"), "{e}");
        assert!(e.contains("not a duration"), "{e}");
        let e = parse("backlog = \"many\"\n").unwrap_err().to_string();
        assert!(e.starts_with("line 1,"), "{e}");
        let e = parse("[pool]\nworkers = 2\n\nseccomp = \"strict\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 4, column 11:"), "{e}");
        let e = parse("[pool]\nuser = 5\n").unwrap_err().to_string();
        assert!(e.starts_with("line 2, column 8:"), "{e}");
        let e = parse("wrokers = 3\n").unwrap_err().to_string();
        assert!(e.starts_with("line 1, column 1:"), "{e}");
    }
}
