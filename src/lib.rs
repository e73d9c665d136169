//! # baton: a connection-handoff load balancer for Linux
//!
//! One small **acceptor** process (this crate) watches TCP listeners with
//! epoll (mio), accepts each connection, and hands the connected socket to
//! one of a pool of **worker** processes over an `AF_UNIX` `SOCK_SEQPACKET`
//! channel with `SCM_RIGHTS`. After the handoff the acceptor is out of the
//! data path: the worker talks to the client directly on the same socket.
//! The acceptor never reads a byte from a client.
//!
//! ```text
//!             TCP clients
//!                 |
//!         +---------------+   mio loop: listeners, worker channels, control
//!         |   acceptor    |   and worker sockets, signalfd
//!         +---------------+
//!          |      |      |    one SEQPACKET channel per worker;
//!       worker  worker  worker   a CONNS message carries a batch of fds;
//!                                idle keep-alives come back (PARK);
//!                                workers confine themselves (uid, chroot,
//!                                caps, no_new_privs, seccomp) before HELLO
//! ```
//!
//! Where to read, in order:
//!
//! * [`baton_sdk::proto`]: the handoff protocol, its wire format in one
//!   table. The worker library (`workers/sdk`) owns it; this crate uses the
//!   same codec.
//! * [`acceptor`]: the event loop, its event sources and timers, how
//!   connections move from listener to worker and back after a crash, and
//!   its pools (each with its own listeners, workers, sandbox and queue).
//! * `pool` (src/pool.rs, crate-private): one pool's per-worker accounting
//!   (in flight, unacknowledged) and the balancing and autoscaling
//!   decisions, pure and unit-tested.
//! * `supervisor` (src/supervisor.rs, crate-private): spawning workers,
//!   reaping them, restart backoff and crash-loop detection.
//! * [`sandbox`]: the workers' confinement as the acceptor sees it (options
//!   resolved to a `baton_sdk::sandbox::Profile`, checked from /proc on
//!   HELLO) and the acceptor's own capability drop; [`audit`] proves it
//!   from inside a probe worker.
//! * [`control`] and [`ctl`]: the control socket's JSON-lines protocol and
//!   its client; the server side is in the acceptor's named parts
//!   (`ctl_sessions`, `ops`: registration, add/remove/rolling restart,
//!   reload and autoscaling; `status`), listed in [`acceptor`]'s docs.
//! * [`options`]: every option declared once, as flag, file key and
//!   default; [`options::Loader`] lays the command line over the
//!   [`file`](mod@file) (TOML: one `[pool]` table or several `[[pool]]`
//!   sections) and builds the validated [`config`] (at start-up, for
//!   `baton check`, and on reload). [`cli`] holds the subcommands.
//! * [`systemd`]: socket activation and the notify protocol; the
//!   acceptor's `upgrade` part re-executes baton in place with its state
//!   ([`acceptor::upgrade`]); its `tls` part runs the key process and the
//!   TLS pools' bundles (crate `baton-tls`, `workers/tls`).
//! * `listener`, `unix` (crate-private), [`logging`]: the edges.
//!
//! Workers live under `workers/`: `baton-echo` (the smallest one, the
//! protocol's living example), `baton-static` (HTTP static files, TLS),
//! `baton-proxy` (the front-end proxy); `baton-http` is the HTTP crate both
//! HTTP workers share, `baton-tls` the TLS one.

pub mod acceptor;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod file;
mod listener;
pub mod logging;
pub mod options;
mod pool;
pub mod sandbox;
mod supervisor;
pub mod systemd;
mod unix;

use std::io;
use std::net::SocketAddr;

/// A configuration the acceptor refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {addr}: {why}")]
    Listen { addr: String, why: String },
    /// The config file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    /// The config file's text is refused, at a line and column.
    #[error("{}: {source}", path.display())]
    Syntax {
        path: std::path::PathBuf,
        source: file::FileError,
    },
    /// The config file parses, but does not make a configuration (its
    /// `pool` neither a table nor sections, options ambiguous or in
    /// conflict with the command line's).
    #[error("{}: {why}", path.display())]
    File {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("worker command: {0}")]
    Command(String),
    #[error("{0}")]
    Invalid(String),
    #[error("pool `{name}`: {source}")]
    InPool {
        name: String,
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The same error, said of pool `name`.
    pub fn in_pool(self, name: &str) -> ConfigError {
        ConfigError::InPool {
            name: name.to_string(),
            source: Box::new(self),
        }
    }
}

/// What to do about a local socket another process holds.
fn in_use_hint(what: &str, e: &io::Error) -> &'static str {
    match (what, e.kind()) {
        ("control socket", io::ErrorKind::AddrInUse) => {
            " (another baton is running there: give this one its own with --control PATH, or none with --no-control)"
        }
        (_, io::ErrorKind::AddrInUse) => {
            " (another process listens there: pick another path)"
        }
        _ => "",
    }
}

/// Why the acceptor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("epoll failed: {0}")]
    Poll(io::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot spawn worker {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot open the {what} {path}: {source}{}", in_use_hint(what, source))]
    UnixSocket {
        what: &'static str,
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("RLIMIT_NOFILE is {limit}: too low for baton's own fds, its workers' channels, a reserve of {reserve} and any connection (at least {needed}); raise it (ulimit -n, or LimitNOFILE= in a systemd unit)", reserve = crate::acceptor::FD_RESERVE)]
    FdLimit { limit: usize, needed: usize },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no worker left: every spawned worker crash-looped, could not apply its sandbox or was refused (a pool with TLS and a worker that does not terminate it), and none will be restarted (see the log above)")]
    NoWorkers,
}
