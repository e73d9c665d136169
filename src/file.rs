//! The TOML config file (`--config baton.toml`): everything the flags hold,
//! with the same names. Flags given on the command line override it.
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
//! Unknown keys are errors, reported with their line and column, so that a
//! typo never silently falls back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use baton_sdk::sandbox::{SeccompMode, Unshare};

use crate::cli::{BalanceArg, LogFormatArg};
use crate::ConfigError;

/// A duration written like `10s`, `500ms` or `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 10s: {e}")))
    }
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    #[serde(default)]
    listen: Vec<String>,
    backlog: Option<i32>,
    control: Option<PathBuf>,
    #[serde(default)]
    control_allow_uid: Vec<u32>,
    control_idle_timeout: Option<HumanDuration>,
    worker_socket: Option<PathBuf>,
    #[serde(default)]
    worker_allow_uid: Vec<u32>,
    shutdown_timeout: Option<HumanDuration>,
    log_format: Option<LogFormatArg>,
    log_level: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    pool: Pool,
}

/// The `[pool]` table: the workers and how connections reach them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Pool {
    #[serde(default)]
    command: Vec<String>,
    root: Option<PathBuf>,
    workers: Option<usize>,
    min_workers: Option<usize>,
    max_workers: Option<usize>,
    scale_idle_timeout: Option<HumanDuration>,
    worker_connections: Option<u32>,
    balance: Option<BalanceArg>,
    hello_timeout: Option<HumanDuration>,
    ack_timeout: Option<HumanDuration>,
    stall_timeout: Option<HumanDuration>,
    drain_timeout: Option<HumanDuration>,
    max_restarts: Option<u32>,
    restart_window: Option<HumanDuration>,
    user: Option<String>,
    group: Option<String>,
    chroot: Option<PathBuf>,
    seccomp: Option<String>,
    unshare: Option<String>,
    #[serde(default)]
    no_fork: bool,
    #[serde(default)]
    allow_root_workers: bool,
    #[serde(default)]
    no_sandbox: bool,
    #[serde(default)]
    worker_require_sandbox: bool,
}

/// The file's settings, flattened to the flags' shape.
#[derive(Debug, Default)]
pub struct FileConfig {
    pub listen: Vec<String>,
    pub backlog: Option<i32>,
    pub control: Option<PathBuf>,
    pub control_allow_uid: Vec<u32>,
    pub control_idle_timeout: Option<HumanDuration>,
    pub worker_socket: Option<PathBuf>,
    pub worker_allow_uid: Vec<u32>,
    pub shutdown_timeout: Option<HumanDuration>,
    pub log_format: Option<LogFormatArg>,
    pub log_level: Option<String>,
    pub metrics_listen: Option<String>,
    pub command: Vec<String>,
    pub root: Option<PathBuf>,
    pub workers: Option<usize>,
    pub min_workers: Option<usize>,
    pub max_workers: Option<usize>,
    pub scale_idle_timeout: Option<HumanDuration>,
    pub worker_connections: Option<u32>,
    pub balance: Option<BalanceArg>,
    pub hello_timeout: Option<HumanDuration>,
    pub ack_timeout: Option<HumanDuration>,
    pub stall_timeout: Option<HumanDuration>,
    pub drain_timeout: Option<HumanDuration>,
    pub max_restarts: Option<u32>,
    pub restart_window: Option<HumanDuration>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub chroot: Option<PathBuf>,
    pub seccomp: Option<SeccompMode>,
    pub unshare: Option<Unshare>,
    pub no_fork: bool,
    pub allow_root_workers: bool,
    pub no_sandbox: bool,
    pub worker_require_sandbox: bool,
}

impl FileConfig {
    /// Reads and parses `path`; errors name the file, line and column.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        FileConfig::parse(&text).map_err(|why| ConfigError::File {
            path: path.to_path_buf(),
            why,
        })
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            format!("{at}{}", e.message())
        })?;
        let p = raw.pool;
        let seccomp = p
            .seccomp
            .as_deref()
            .map(str::parse::<SeccompMode>)
            .transpose()
            .map_err(|e| format!("[pool] seccomp: {e}"))?;
        let unshare = p
            .unshare
            .as_deref()
            .map(str::parse::<Unshare>)
            .transpose()
            .map_err(|e| format!("[pool] unshare: {e}"))?;
        Ok(FileConfig {
            user: p.user,
            group: p.group,
            chroot: p.chroot,
            seccomp,
            unshare,
            no_fork: p.no_fork,
            allow_root_workers: p.allow_root_workers,
            no_sandbox: p.no_sandbox,
            worker_require_sandbox: p.worker_require_sandbox,
            listen: raw.listen,
            backlog: raw.backlog,
            control: raw.control,
            control_allow_uid: raw.control_allow_uid,
            control_idle_timeout: raw.control_idle_timeout,
            worker_socket: raw.worker_socket,
            worker_allow_uid: raw.worker_allow_uid,
            shutdown_timeout: raw.shutdown_timeout,
            log_format: raw.log_format,
            log_level: raw.log_level,
            metrics_listen: raw.metrics_listen,
            command: p.command,
            root: p.root,
            workers: p.workers,
            min_workers: p.min_workers,
            max_workers: p.max_workers,
            scale_idle_timeout: p.scale_idle_timeout,
            worker_connections: p.worker_connections,
            balance: p.balance,
            hello_timeout: p.hello_timeout,
            ack_timeout: p.ack_timeout,
            stall_timeout: p.stall_timeout,
            drain_timeout: p.drain_timeout,
            max_restarts: p.max_restarts,
            restart_window: p.restart_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let f = FileConfig::parse(
            r#"
listen = ["127.0.0.1:0"]
log-format = "json"
[pool]
command = ["/bin/cat"]
workers = 3
balance = "round-robin"
drain-timeout = "1m"
"#,
        )
        .unwrap();
        assert_eq!(f.listen, vec!["127.0.0.1:0"]);
        assert_eq!(f.workers, Some(3));
        assert_eq!(f.balance, Some(BalanceArg::RoundRobin));
        assert_eq!(
            f.drain_timeout,
            Some(HumanDuration(Duration::from_secs(60)))
        );
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let e = FileConfig::parse("listen = [\"127.0.0.1:0\"]\n[pool]\nwrokers = 3\n").unwrap_err();
        assert!(e.starts_with("line 3, column 1:"), "{e}");
        assert!(e.contains("wrokers"), "{e}");
        let e = FileConfig::parse("[pool]\ndrain-timeout = \"soon\"\n").unwrap_err();
        assert!(e.starts_with("line 2,"), "{e}");
        assert!(e.contains("not a duration"), "{e}");
        let e = FileConfig::parse("backlog = \"many\"\n").unwrap_err();
        assert!(e.starts_with("line 1,"), "{e}");
    }
}
