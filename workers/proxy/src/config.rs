//! The command line of `baton-proxy` (`--help` explains every option and
//! shows its default).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::balance::Policy;
use crate::upstream::UpstreamSpec;

/// What the proxy speaks with clients and upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// HTTP/1.1 reverse proxy: keep-alive pools to upstreams, forwarded
    /// headers, strict framing both ways (on baton-http).
    Http,
    /// A TCP relay: bytes both ways, spliced in the kernel; when the pool
    /// has --tls-cert, TLS is terminated here and the upstream gets
    /// plaintext (copied, not spliced).
    Tcp,
}

/// Which active health check runs against every upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HealthCheck {
    /// None: only passive checks (failures of real traffic).
    None,
    /// A TCP connect: the server is healthy if it accepts.
    Tcp,
    /// `GET PATH HTTP/1.1`: healthy if it answers 2xx or 3xx.
    Http,
}

/// PROXY protocol version sent to upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SendProxy {
    /// The text line (`PROXY TCP4 ...`).
    V1,
    /// The binary header.
    V2,
}

/// baton's front-end proxy worker: relays each client connection the
/// acceptor hands it to one of its upstream servers, chosen by a balancing
/// policy among the servers that are up, with passive and active health
/// checks shared by every worker of the pool.
///
/// Started by the acceptor (`baton --listen :5432 -- baton-proxy --mode tcp
/// --upstream 10.0.0.5:5432`), or joining a running acceptor with
/// --register. Logs go to stderr in the acceptor's format
/// (BATON_LOG_FORMAT: text or json). Upstream names are resolved once, at
/// start, before the sandbox is applied (a chrooted worker has no
/// resolver). Under baton's sandbox, run it with `--seccomp proxy`: the
/// default seccomp profile refuses to create sockets.
#[derive(Debug, Clone, Parser)]
#[command(name = "baton-proxy", version, about, long_about)]
pub struct Config {
    /// An upstream server, HOST:PORT, with optional comma-separated
    /// suffixes: `weight=N` (1 to 1000, default 1: a server of weight 3
    /// gets three times the share of one of weight 1) and `backup` (used
    /// only while no primary server is up). Repeat for each server.
    /// Examples: `127.0.0.1:9001`, `db.internal:5432,weight=3`,
    /// `[::1]:9003,backup`.
    #[arg(
        long = "upstream",
        value_name = "HOST:PORT[,weight=N][,backup]",
        required = true
    )]
    pub upstreams: Vec<UpstreamSpec>,

    /// What is proxied. `http` is the HTTP/1.1 reverse proxy (requests
    /// balanced one by one over keep-alive connections to the upstreams);
    /// `tcp` relays bytes both ways (any TCP protocol). Either mode
    /// terminates TLS when the pool has --tls-cert (the upstream gets
    /// plaintext; in tcp mode it is connected once the handshake is done,
    /// and plaintext sent to the TLS port is closed without an answer).
    #[arg(long, value_enum, default_value = "http")]
    pub mode: ModeArg,

    /// How a server is chosen for each connection, among those up:
    /// `round-robin` (smooth weighted, as nginx), `least-conn` (fewest
    /// connections in flight from this worker, relative to weight), `p2c`
    /// (power of two choices: the less loaded of two picked at random by
    /// weight) or `hash` (of the client's IP address: a client sticks to
    /// one server while it is up; weighted rendezvous hashing, so a server
    /// going down moves only its own clients).
    #[arg(long, value_enum, default_value = "least-conn")]
    pub balance: Policy,

    /// Time to establish a connection to an upstream. A server that does
    /// not answer in time counts as a failure, and another is tried.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How many other servers are tried, each once, when connecting to the
    /// chosen one fails (refused, unreachable, timed out), before the
    /// client is closed.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub retries: u32,

    /// A relayed connection on which no byte moved either way for this long
    /// is closed (TCP mode). In HTTP mode: a request whose body or response
    /// body stops moving for this long is cut.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Passive health: this many consecutive failures (connect or I/O
    /// errors) take a server out of rotation, in every worker of the pool.
    /// It is tried again after a backoff (see --fail-backoff), unless an
    /// active health check is on, which then decides when it is back.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_fails: u32,

    /// First wait before a server taken out is tried again; doubled each
    /// time the trial fails, up to --fail-backoff-max.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub fail_backoff: Duration,

    /// Longest wait before a server taken out is tried again.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub fail_backoff_max: Duration,

    /// Active health check of every upstream, by one worker of the pool per
    /// interval (the workers take turns through a lease in shared memory):
    /// `tcp` connects, `http` sends `GET --health-path` and wants 2xx/3xx.
    #[arg(long, value_enum, default_value = "none")]
    pub health_check: HealthCheck,

    /// Path of the `http` health check.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub health_path: String,

    /// Time between two probes of one server.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Time a probe has to succeed (at most --health-interval).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive successful probes that bring a server that is down back.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_rise: u32,

    /// Consecutive failed probes that take a server that is up out.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_fall: u32,

    /// Send a PROXY protocol header of this version to the upstream before
    /// any byte of the client's, carrying the client's address (the one
    /// from --accept-proxy, if on) and the address it connected to.
    #[arg(long, value_enum, value_name = "VERSION")]
    pub send_proxy: Option<SendProxy>,

    /// Every client connection must start with a PROXY protocol header (v1
    /// or v2; an L4 balancer in front sends it). A connection without one,
    /// or with a malformed one, is closed and logged; nothing is guessed.
    /// The header's client address replaces the peer's in logs, in hashing
    /// and in the header sent with --send-proxy.
    #[arg(long)]
    pub accept_proxy: bool,

    /// Time a client has to send its PROXY header (with --accept-proxy).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub accept_proxy_timeout: Duration,

    /// Size of the kernel pipe each direction of a relayed connection goes
    /// through (F_SETPIPE_SZ; the kernel rounds it to pages and caps it at
    /// /proc/sys/fs/pipe-max-size). It bounds what is in flight per
    /// direction: nothing is buffered in user space. Not used with TLS
    /// (nothing is spliced to or from a TLS client: at most 64 KiB per
    /// direction waits in user space, plus rustls's own buffer).
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub pipe_size: usize,

    /// After DRAIN (or SIGTERM), connections still open this long are
    /// closed and the worker exits. A relayed connection may last for
    /// hours; this bounds a rolling restart.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Instead of inheriting a channel from a spawning acceptor, connect to
    /// a running acceptor's worker socket at PATH and join its pool.
    #[arg(long, value_name = "PATH")]
    pub register: Option<PathBuf>,

    /// HTTP mode: longest wait for the upstream's response head once the
    /// request is sent (504 when it passes; the server counts a failure).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,

    /// HTTP mode: longest time one request may take, from its head to the
    /// end of its response (0: no limit). 504 if no response began.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// With TLS (the pool has --tls-cert): time a client has to finish its
    /// TLS handshake; a client that stalls in it is closed and logged. It
    /// starts after the PROXY header (--accept-proxy), which is plaintext.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// HTTP mode: a client connection idle between requests (or before its
    /// first) this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// HTTP mode: an Upgrade tunnel (WebSocket) on which nothing moved for
    /// this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub tunnel_timeout: Duration,

    /// HTTP mode: an idle pooled connection to an upstream is closed after
    /// this long (keep it below the upstream's own keep-alive timeout).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,

    /// HTTP mode: most idle keep-alive connections kept per upstream server
    /// by each worker (0: none, a connection per request).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub pool_size: usize,

    /// HTTP mode: largest request body accepted (413 beyond it).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    pub max_body_bytes: u64,

    /// HTTP mode: largest request head (start line and fields); beyond it
    /// 431 (414 for the request line). Also bounds a response head (502).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// HTTP mode: clients in this range (repeatable; ADDRESS[/BITS]) are
    /// proxies whose X-Forwarded-*, Forwarded and X-Real-IP fields are
    /// extended; every other client's are replaced.
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<crate::forward::Cidr>,

    /// HTTP mode: also send `X-Real-IP: <client address>`.
    #[arg(long)]
    pub x_real_ip: bool,

    /// HTTP mode: the `Host` sent upstream, instead of the client's.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,

    /// HTTP mode: no access log line per request.
    #[arg(long)]
    pub no_access_log: bool,

    /// Most connections this worker takes at once, announced to the
    /// acceptor in HELLO (0 leaves the limit to the acceptor). Each costs
    /// six fds: the two sockets and two pipes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub capacity: u32,
}

impl Config {
    /// Checks what clap cannot: relations between options.
    pub fn validate(&self) -> Result<(), String> {
        if self.health_timeout > self.health_interval {
            return Err(format!(
                "--health-timeout {} is longer than --health-interval {}: a probe must end before the next one",
                humantime::format_duration(self.health_timeout),
                humantime::format_duration(self.health_interval)
            ));
        }
        if self.health_interval < Duration::from_millis(10) {
            return Err("--health-interval must be at least 10ms".into());
        }
        if self.fail_backoff > self.fail_backoff_max {
            return Err("--fail-backoff is longer than --fail-backoff-max".into());
        }
        if self.connect_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("--connect-timeout and --idle-timeout must not be 0".into());
        }
        if !self.health_path.starts_with('/')
            || self.health_path.bytes().any(|b| b <= b' ' || b == 0x7f)
        {
            return Err(format!(
                "--health-path {:?}: must start with / and hold no space or control character",
                self.health_path
            ));
        }
        if self.response_timeout.is_zero()
            || self.keepalive_timeout.is_zero()
            || self.tls_handshake_timeout.is_zero()
        {
            return Err(
                "--response-timeout, --keepalive-timeout and --tls-handshake-timeout must not be 0"
                    .into(),
            );
        }
        if self.max_header_bytes < 256 {
            return Err("--max-header-bytes must be at least 256".into());
        }
        if let Some(h) = &self.host {
            if h.is_empty() || !baton_http::fields::valid_host(h.as_bytes()) {
                return Err(format!(
                    "--host {h:?}: not a valid Host value (HOST[:PORT])"
                ));
            }
        }
        if self.upstreams.len() > baton_sdk::shared::MAX_SLOTS {
            return Err(format!(
                "{} upstreams: at most {} are supported",
                self.upstreams.len(),
                baton_sdk::shared::MAX_SLOTS
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("baton-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_and_validation() {
        let c = parse(&["--upstream", "127.0.0.1:1"]).unwrap();
        assert_eq!(c.mode, ModeArg::Http);
        assert_eq!(c.balance, Policy::LeastConn);
        assert!(c.validate().is_ok());
        assert!(parse(&[]).is_err(), "an upstream is required");
        let c = parse(&[
            "--upstream",
            "127.0.0.1:1",
            "--health-timeout",
            "2s",
            "--health-interval",
            "1s",
        ])
        .unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--upstream", "127.0.0.1:1", "--health-path", "x y"]).unwrap();
        assert!(c.validate().is_err());
        assert!(parse(&["--upstream", "127.0.0.1:1", "--max-fails", "0"]).is_err());
    }

    #[test]
    fn help_shows_defaults() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        for s in [
            "[default: least-conn]",
            "[default: 2s]",
            "weight=N",
            "backup",
            "p2c",
        ] {
            assert!(help.contains(s), "--help lacks {s}:\n{help}");
        }
    }
}
