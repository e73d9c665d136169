//! The acceptor's validated configuration. Everything here has been checked;
//! the event loop never second-guesses it.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ConfigError;

/// How the acceptor picks a worker for a connection (`--balance`,
/// `balance = "..."` in the `[pool]` table). Its names are what the flag,
/// the file and every message use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The worker with the fewest connections in flight; ties go round the pool.
    LeastConn,
    /// Each worker in turn, skipping full ones.
    RoundRobin,
}

impl Balance {
    /// The name the flag and the file use.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConn => "least-conn",
            Balance::RoundRobin => "round-robin",
        }
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The log format of the acceptor and of every worker it spawns
/// (`--log-format`; workers read it from `BATON_LOG_FORMAT`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name the flag, the file and `BATON_LOG_FORMAT` use.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `:PORT` (every IPv4 address).
    /// A host name is resolved once, here, and must give one address.
    pub fn parse(s: &str) -> Result<ListenAddr, ConfigError> {
        let bad = |why: String| ConfigError::Listen {
            addr: s.to_string(),
            why,
        };
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| bad(format!("{port:?} is not a port number")))?;
            return Ok(ListenAddr(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(a));
        }
        if !s.contains(':') {
            return Err(bad("expected HOST:PORT, [IPV6]:PORT or :PORT".to_string()));
        }
        let mut addrs = s
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve: {e}")))?;
        match (addrs.next(), addrs.next()) {
            (Some(a), None) => Ok(ListenAddr(a)),
            (Some(a), Some(b)) => Err(bad(format!(
                "resolves to several addresses ({a}, {b}, ...): give one --listen per address"
            ))),
            (None, _) => Err(bad("resolves to no address".to_string())),
        }
    }
}

/// The program every worker of the pool runs.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// Checks that the program exists and is executable, so that a typo is
    /// a clear error at start-up instead of a crash loop.
    pub fn check(&self) -> Result<(), ConfigError> {
        let found = if self.program.components().count() > 1 {
            Some(self.program.clone())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(&self.program))
                    .find(|p| is_executable(p))
            })
        };
        match found {
            Some(p) if is_executable(&p) => Ok(()),
            Some(p) if p.exists() => Err(ConfigError::Command(format!(
                "{} is not an executable file",
                p.display()
            ))),
            _ => Err(ConfigError::Command(format!(
                "{} not found{}",
                self.program.display(),
                if self.program.components().count() > 1 {
                    " (build the workers with `cargo build --workspace --release`)"
                } else {
                    " in PATH"
                }
            ))),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Everything the acceptor needs to run: what is its own (sockets, logs,
/// shutdown) and its pools.
#[derive(Debug, Clone)]
pub struct Config {
    pub backlog: i32,
    pub shutdown_timeout: Duration,
    /// Control socket path; None when disabled.
    pub control: Option<PathBuf>,
    pub control_allow_uid: Vec<u32>,
    /// A control client silent this long is disconnected.
    pub control_idle_timeout: Duration,
    /// Socket for workers that register themselves (they join the first
    /// pool).
    pub worker_socket: Option<PathBuf>,
    pub worker_allow_uid: Vec<u32>,
    /// Prometheus endpoint address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Health check endpoint address (`--health-listen`).
    pub health_listen: Option<std::net::SocketAddr>,
    /// `ctl drain-host`: how long the listeners keep accepting after the
    /// health check turns 503.
    pub drain_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// At least one; names unique, listeners claimed by one pool each.
    pub pools: Vec<PoolConfig>,
}

impl Config {
    /// Every listener of every pool.
    pub fn listeners(&self) -> impl Iterator<Item = &ListenAddr> {
        self.pools.iter().flat_map(|p| p.listen.iter())
    }
}

/// A pool's TLS: certificate and key files in pairs (absolute paths; the
/// first pair is the default certificate), and the lowest version served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTls {
    pub pairs: Vec<(PathBuf, PathBuf)>,
    pub min_version: baton_tls::MinVersion,
}

/// One pool: its listeners, its workers and how they are run.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// TLS termination in its workers, if any.
    pub tls: Option<PoolTls>,
    /// Its name in `ctl --pool`, metrics and logs.
    pub name: String,
    pub listen: Vec<ListenAddr>,
    pub workers: usize,
    /// Autoscaling bounds (both equal to `workers` when not scaling).
    pub min_workers: usize,
    pub max_workers: usize,
    /// An idle worker above `min_workers` is retired after this long.
    pub scale_idle_timeout: Duration,
    pub worker_connections: u32,
    pub balance: Balance,
    pub command: WorkerCommand,
    pub hello_timeout: Duration,
    pub ack_timeout: Duration,
    /// A full worker that reports no DONE for this long is logged as stalled.
    pub stall_timeout: Duration,
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// Default drain timeout of a removed worker.
    pub drain_timeout: Duration,
    /// The workers' sandbox (resolved ids, checked paths).
    pub sandbox: crate::sandbox::Sandbox,
    /// Check self-registering workers against the profile too.
    pub worker_require_sandbox: bool,
}

/// The name a pool gets when the configuration gives it none (one pool).
pub const DEFAULT_POOL: &str = "default";

/// Checks a pool name: what `ctl --pool` and a metrics label can carry.
pub fn check_pool_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "pool name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            ListenAddr::parse("127.0.0.1:80").unwrap().0,
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            ListenAddr::parse("[::1]:0").unwrap().0,
            "[::1]:0".parse().unwrap()
        );
        assert_eq!(
            ListenAddr::parse(":8080").unwrap().0,
            "0.0.0.0:8080".parse().unwrap()
        );
        assert!(ListenAddr::parse("8080").is_err());
        assert!(ListenAddr::parse(":http").is_err());
        assert!(ListenAddr::parse("127.0.0.1:99999").is_err());
    }

    #[test]
    fn missing_command_is_a_clear_error() {
        let c = WorkerCommand {
            program: "/nonexistent/worker".into(),
            args: vec![],
        };
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/worker not found"), "{e}");
    }
}
