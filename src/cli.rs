//! Command line of the `baton` binary: its subcommands, and the acceptor's
//! flags (declared in [`crate::options`], which also turns them into a
//! validated [`crate::config::Config`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::options::Options;

/// baton: a connection-handoff load balancer.
///
/// One acceptor process accepts TCP connections and hands each one, as a
/// file descriptor over a Unix socket, to one of a pool of worker processes,
/// which serve the client directly. The acceptor never reads a byte from a
/// client.
///
/// With no arguments, baton serves its embedded demo site on
/// 127.0.0.1:8080 with one `baton-static` worker per CPU.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "EXAMPLES:\n  \
        baton                                          demo site on 127.0.0.1:8080\n  \
        baton --root ./public                          serve a directory\n  \
        baton --listen 127.0.0.1:9000 --workers 4 -- baton-echo\n  \
        baton --listen [::]:80 --listen 0.0.0.0:80 -- baton-static --root /srv/www\n\n\
        SIGNALS: SIGTERM/SIGINT stop gracefully (a second one stops at once);\n\
        SIGTTIN adds a worker, SIGTTOU drains and removes one, SIGHUP reloads --config,\n\
        SIGUSR2 upgrades the binary in place (same pid, workers kept).\n\
        LOGS: RUST_LOG (e.g. RUST_LOG=debug) overrides --log-level."
)]
pub struct Cli {
    #[command(subcommand)]
    pub sub: Option<Sub>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands; without one, baton runs the acceptor.
#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Talk to a running baton through its control socket.
    #[command(version)]
    Ctl(CtlArgs),
    /// Validate the configuration the flags give, with the --config file
    /// under them if one is named, without starting anything; points at
    /// the line and column of any mistake in the file.
    #[command(version)]
    Check(Box<CheckArgs>),
    /// Start a probe worker under the sandbox these options give, let it
    /// try to break out, and print what it could and could not do
    /// (property, expected, observed, pass/fail). Exits 1 if any fails.
    #[command(version)]
    Audit(Box<crate::audit::AuditArgs>),
    /// The audit's probe worker (internal).
    #[command(hide = true)]
    Probe,
    /// baton's key process (internal): holds the TLS private keys and signs
    /// for the workers.
    #[command(hide = true)]
    Keyd {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Checks TLS certificate and key pairs (internal: a reload runs it so
    /// that the acceptor never reads a key): CERT KEY [CERT KEY ...].
    #[command(hide = true, name = "tls-check")]
    TlsCheck {
        #[arg(required = true, num_args = 2..)]
        files: Vec<PathBuf>,
    },
    /// Asked by a running baton of the binary it is about to execute for
    /// an upgrade (internal): can it take over this state?
    #[command(hide = true, name = "upgrade-check")]
    UpgradeCheck(Box<UpgradeCheckArgs>),
    /// The bundled static file worker, embedded (internal): what `baton`
    /// runs by default, so that `cargo run` needs no other binary.
    #[command(hide = true, name = "static-worker")]
    StaticWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `baton upgrade-check` (internal): what a running baton asks the binary
/// it is about to execute.
#[derive(Debug, clap::Args)]
pub struct UpgradeCheckArgs {
    /// The state version the running baton would hand over.
    #[arg(long)]
    pub state_version: u32,
    /// Its pools, each of which the configuration must still have.
    #[arg(long, value_delimiter = ',')]
    pub pools: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `baton check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

/// `baton ctl`: one request to a running acceptor.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The acceptor's control socket.
    #[arg(long, value_name = "PATH", global = true, default_value_os_t = crate::control::default_path())]
    pub control: PathBuf,

    /// Print the reply as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub verb: CtlVerb,
}

/// `--pool NAME`: which pool a verb acts on.
#[derive(Debug, Clone, clap::Args)]
pub struct PoolArg {
    /// The pool (its `name` in the config file); needed only when baton
    /// runs several.
    #[arg(long = "pool", value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlVerb {
    /// One row per worker: id, pool, pid, user, state, in-flight, handled, restarts, memory, age.
    Workers {
        /// Only this pool's workers (every pool's by default).
        #[arg(long = "pool", value_name = "NAME")]
        pool: Option<String>,
    },
    /// Totals: workers, connections, uptime.
    Status,
    /// Counters in the Prometheus text format.
    Metrics,
    /// Spawn N more workers from the pool's command.
    Add {
        /// How many.
        #[arg(default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Stop giving workers connections, let them finish, then stop them.
    Remove {
        /// The worker id (see `baton ctl workers`).
        #[arg(required_unless_present = "count", conflicts_with = "count")]
        id: Option<u32>,
        /// Remove this many workers, newest first, instead of one by id.
        #[arg(long, value_name = "N")]
        count: Option<u32>,
        /// How long a draining worker may take before it is stopped.
        #[arg(long, value_name = "DURATION", value_parser = crate::options::parse_duration)]
        drain_timeout: Option<Duration>,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Rolling restart: each worker of the pool is replaced, a new one ready before the old one drains.
    Restart {
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Re-read the config file and apply the difference (like SIGHUP).
    Reload,
    /// Take this host out of the L4 balancer in front, then stop: the
    /// health check (--health-listen) turns 503 at once, the listeners keep
    /// accepting for the grace (--drain-grace, 5s by default) so that the
    /// balancer notices and sends no more, then they close and baton
    /// finishes what it holds and exits as on SIGTERM.
    DrainHost {
        /// How long the listeners keep accepting while the health check
        /// fails [default: baton's --drain-grace].
        #[arg(long, value_name = "DURATION", value_parser = crate::options::parse_duration)]
        grace: Option<Duration>,
    },
    /// Replace baton's binary without a dropped connection: the new binary
    /// checks the configuration, then baton re-executes itself in place
    /// (same pid) and keeps every worker, listener and connection (like
    /// SIGUSR2).
    Upgrade {
        /// The new binary [default: the path baton was started from].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
}

/// The command line of the acceptor (and of `baton check`): the options
/// ([`Options`], declared once for flags and file alike) and the two
/// flags that only make sense on a command line.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML config file holding any of these options (see README); flags
    /// override it. `baton ctl reload` and SIGHUP re-read it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Do not open a control socket.
    #[arg(long, conflicts_with = "control")]
    pub no_control: bool,

    #[command(flatten)]
    pub options: Options,
}
