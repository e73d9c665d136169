//! Command line of the `baton` binary, and its translation into a validated
//! [`Config`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config::{Balance, Config, ListenAddr, LogFormat, WorkerCommand};
use crate::file::FileConfig;
use crate::ConfigError;

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
        SIGTTIN adds a worker, SIGTTOU drains and removes one, SIGHUP reloads --config.\n\
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
    Ctl(CtlArgs),
    /// Validate a config file (and the flags given with it) without
    /// starting anything; points at the line of any mistake.
    Check(Box<CheckArgs>),
    /// Start a probe worker under the sandbox these options give, let it
    /// try to break out, and print what it could and could not do
    /// (property, expected, observed, pass/fail). Exits 1 if any fails.
    Audit(Box<crate::audit::AuditArgs>),
    /// The audit's probe worker (internal).
    #[command(hide = true)]
    Probe,
    /// The bundled static file worker, embedded (internal): what `baton`
    /// runs by default, so that `cargo run` needs no other binary.
    #[command(hide = true, name = "static-worker")]
    StaticWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
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

#[derive(Debug, clap::Subcommand)]
pub enum CtlVerb {
    /// One row per worker: id, pid, user, state, in-flight, handled, restarts, memory, age.
    Workers,
    /// Totals: workers, connections, uptime.
    Status,
    /// Counters in the Prometheus text format.
    Metrics,
    /// Spawn N more workers from the pool's command.
    Add {
        /// How many.
        #[arg(default_value_t = 1)]
        count: u32,
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
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        drain_timeout: Option<Duration>,
    },
    /// Rolling restart: each worker is replaced, a new one ready before the old one drains.
    Restart,
    /// Re-read the config file and apply the difference (like SIGHUP).
    Reload,
}

/// Options of the acceptor itself. Every one can also be set in the
/// `--config` file; a flag given on the command line wins.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML config file holding any of these options (see README); flags
    /// override it. `baton ctl reload` and SIGHUP re-read it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept connections on (repeatable): 127.0.0.1:8080,
    /// `[::1]:8080`, or :8080 for every IPv4 address. Port 0 picks a free port
    /// (the log says which). [default: 127.0.0.1:8080]
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Listen backlog: how many connections the kernel holds for us while
    /// every worker is busy. [default: 1024]
    #[arg(long, value_name = "N")]
    pub backlog: Option<i32>,

    /// Number of worker processes to spawn. [default: one per CPU]
    #[arg(long, short = 'w', value_name = "N")]
    pub workers: Option<usize>,

    /// Autoscaling floor: idle workers are retired down to this many.
    /// [default: --workers]
    #[arg(long, value_name = "N")]
    pub min_workers: Option<usize>,

    /// Autoscaling ceiling: while every worker is full and clients wait,
    /// workers are added up to this many. [default: --workers]
    #[arg(long, value_name = "N")]
    pub max_workers: Option<usize>,

    /// Autoscaling: a worker above --min-workers with no connection for
    /// this long is retired. [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub scale_idle_timeout: Option<Duration>,

    /// Most connections one worker holds at once; when every worker is at
    /// this limit the acceptor stops accepting until one finishes.
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub worker_connections: Option<u32>,

    /// How to choose a worker for each connection. [default: least-conn]
    #[arg(long, value_enum)]
    pub balance: Option<BalanceArg>,

    /// Serve this directory with the embedded static worker (when no worker
    /// command follows `--`).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// On SIGTERM/SIGINT, how long workers may take to finish their
    /// connections before they are killed (e.g. 10s, 500ms). [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// A spawned worker must say HELLO within this time, or it is killed.
    /// [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub hello_timeout: Option<Duration>,

    /// A worker must acknowledge a connection within this time, or it is
    /// considered hung: it is disconnected (and killed if spawned) and its
    /// unacknowledged connections go to another worker. [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ack_timeout: Option<Duration>,

    /// A worker that holds as many connections as it may and reports none
    /// done for this long is logged as stalled (once, and in `ctl status`
    /// and the metrics); it keeps its connections and gets no new one, and
    /// the other workers serve. [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stall_timeout: Option<Duration>,

    /// A spawned worker that exits this many times in a row, each time
    /// within --restart-window of its start, is not restarted again.
    /// [default: 5]
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,

    /// A worker that ran at least this long before exiting resets its
    /// crash count. [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub restart_window: Option<Duration>,

    /// Control socket for `baton ctl` (mode 0600, peers checked with
    /// SO_PEERCRED). [default: /run/baton.sock as root, else
    /// $XDG_RUNTIME_DIR/baton.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Do not open a control socket.
    #[arg(long, conflicts_with = "control")]
    pub no_control: bool,

    /// Also serve the control socket to this uid (repeatable); root and
    /// baton's own uid always are.
    #[arg(long, value_name = "UID")]
    pub control_allow_uid: Vec<u32>,

    /// A control client that sends no complete request for this long is
    /// disconnected. [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub control_idle_timeout: Option<Duration>,

    /// Listen for workers that register themselves (SOCK_SEQPACKET): any
    /// allowed process that connects and says HELLO joins the pool. baton
    /// never restarts such a worker.
    #[arg(long, value_name = "PATH")]
    pub worker_socket: Option<PathBuf>,

    /// Also accept registering workers from this uid (repeatable); root and
    /// baton's own uid always are.
    #[arg(long, value_name = "UID")]
    pub worker_allow_uid: Vec<u32>,

    /// How long a worker being removed may take to finish its connections
    /// (`baton ctl remove`, SIGTTOU, rolling restart) before it is stopped.
    /// [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Log format: human-readable text, or one JSON object per line.
    /// [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,

    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    /// [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Serve the metrics (Prometheus text format) over HTTP on this
    /// address, e.g. 127.0.0.1:9100. Operator-facing: bind it to loopback
    /// or a management network.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    #[command(flatten)]
    pub sandbox: crate::sandbox::SandboxArgs,

    /// Apply the sandbox check to workers that register themselves too:
    /// one whose /proc/PID/status does not match the pool's profile gets no
    /// connection.
    #[arg(long)]
    pub worker_require_sandbox: bool,

    /// The worker command and its arguments. [default: the static file
    /// worker embedded in this binary, serving the demo site, or DIR with
    /// --root]
    #[arg(last = true, value_name = "WORKER COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceArg {
    /// The worker with the fewest connections in flight.
    #[value(name = "least-conn")]
    LeastConn,
    /// Each worker in turn (skipping full ones).
    #[value(name = "round-robin")]
    RoundRobin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormatArg {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10s or 500ms: {e}"))
}

/// The bundled static worker, embedded in this binary: `baton
/// static-worker ARGS`.
fn embedded_static(args: Vec<OsString>) -> WorkerCommand {
    let mut all = vec![OsString::from("static-worker")];
    all.extend(args);
    WorkerCommand {
        program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("baton")),
        args: all,
    }
}

impl RunArgs {
    /// Fills every option the command line left unset from `file`.
    /// Flags win; lists given on the command line replace the file's.
    pub fn merged(mut self, file: FileConfig) -> RunArgs {
        if self.listen.is_empty() {
            self.listen = file.listen;
        }
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            backlog,
            workers,
            min_workers,
            max_workers,
            worker_connections,
            balance,
            root,
            control,
            metrics_listen,
            worker_socket,
            log_level,
            log_format,
            max_restarts
        );
        macro_rules! fill_duration {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f.map(|d| d.0); } )* };
        }
        fill_duration!(
            scale_idle_timeout,
            shutdown_timeout,
            hello_timeout,
            ack_timeout,
            stall_timeout,
            restart_window,
            control_idle_timeout,
            drain_timeout
        );
        if self.control_allow_uid.is_empty() {
            self.control_allow_uid = file.control_allow_uid;
        }
        if self.worker_allow_uid.is_empty() {
            self.worker_allow_uid = file.worker_allow_uid;
        }
        if self.command.is_empty() {
            self.command = file.command.into_iter().map(OsString::from).collect();
        }
        let sb = &mut self.sandbox;
        if sb.user.is_none() {
            sb.user = file.user;
        }
        if sb.group.is_none() {
            sb.group = file.group;
        }
        if sb.chroot.is_none() {
            sb.chroot = file.chroot;
        }
        if sb.seccomp.is_none() {
            sb.seccomp = file.seccomp;
        }
        if sb.unshare.is_none() {
            sb.unshare = file.unshare;
        }
        sb.no_fork |= file.no_fork;
        sb.allow_root_workers |= file.allow_root_workers;
        sb.no_sandbox |= file.no_sandbox;
        self.worker_require_sandbox |= file.worker_require_sandbox;
        self
    }

    /// Reads `--config` (if any), merges it under the flags, validates the
    /// result and builds the acceptor's configuration.
    pub fn load(self) -> Result<Config, ConfigError> {
        let args = match &self.config {
            Some(path) => {
                let file = FileConfig::read(path)?;
                self.merged(file)
            }
            None => self,
        };
        args.into_config()
    }

    /// Validates the command line and builds the acceptor's configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen = if self.listen.is_empty() {
            vec![ListenAddr::parse("127.0.0.1:8080")?]
        } else {
            self.listen
                .iter()
                .map(|s| ListenAddr::parse(s))
                .collect::<Result<_, _>>()?
        };
        let backlog = self.backlog.unwrap_or(1024);
        if backlog < 1 {
            return Err(ConfigError::Invalid(format!(
                "--backlog must be at least 1, got {backlog}"
            )));
        }
        let workers = match self.workers {
            Some(0) if self.worker_socket.is_none() => {
                return Err(ConfigError::Invalid(
                    "--workers must be at least 1 (0 only with --worker-socket)".to_string(),
                ))
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let min_workers = self.min_workers.unwrap_or(workers);
        let max_workers = self.max_workers.unwrap_or(workers.max(min_workers));
        if min_workers > workers || workers > max_workers {
            return Err(ConfigError::Invalid(format!(
                "need --min-workers <= --workers <= --max-workers, got {min_workers} <= {workers} <= {max_workers}"
            )));
        }
        let worker_connections = self.worker_connections.unwrap_or(1024);
        if worker_connections == 0 {
            return Err(ConfigError::Invalid(
                "--worker-connections must be at least 1".to_string(),
            ));
        }
        let command = match (self.command.split_first(), &self.root) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--root selects the bundled baton-static worker; it cannot be combined with a worker command after `--` (pass --root to that command instead)".to_string(),
                ))
            }
            (Some((program, args)), None) => WorkerCommand {
                program: program.into(),
                args: args.to_vec(),
            },
            (None, Some(root)) => {
                if !root.is_dir() {
                    return Err(ConfigError::Invalid(format!(
                        "--root {}: not a directory",
                        root.display()
                    )));
                }
                // Absolute: the worker may chroot, and does not share our cwd
                // assumptions.
                let root = root.canonicalize().map_err(|e| {
                    ConfigError::Invalid(format!("--root {}: {e}", root.display()))
                })?;
                embedded_static(vec!["--root".into(), root.into()])
            }
            (None, None) => embedded_static(vec!["--demo".into()]),
        };
        command.check()?;
        let sandbox = self.sandbox.resolve(worker_connections)?;
        let metrics_listen = match &self.metrics_listen {
            Some(a) => Some(
                ListenAddr::parse(a)
                    .map_err(|e| ConfigError::Invalid(format!("--metrics-listen: {e}")))?
                    .0,
            ),
            None => None,
        };
        Ok(Config {
            metrics_listen,
            sandbox,
            worker_require_sandbox: self.worker_require_sandbox,
            listen,
            backlog,
            workers,
            min_workers,
            max_workers,
            scale_idle_timeout: self.scale_idle_timeout.unwrap_or(Duration::from_secs(60)),
            worker_connections,
            balance: match self.balance.unwrap_or(BalanceArg::LeastConn) {
                BalanceArg::LeastConn => Balance::LeastConn,
                BalanceArg::RoundRobin => Balance::RoundRobin,
            },
            command,
            shutdown_timeout: self.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
            hello_timeout: self.hello_timeout.unwrap_or(Duration::from_secs(10)),
            ack_timeout: self.ack_timeout.unwrap_or(Duration::from_secs(5)),
            stall_timeout: self.stall_timeout.unwrap_or(Duration::from_secs(60)),
            max_restarts: self.max_restarts.unwrap_or(5),
            restart_window: self.restart_window.unwrap_or(Duration::from_secs(10)),
            control: if self.no_control {
                None
            } else {
                Some(self.control.unwrap_or_else(crate::control::default_path))
            },
            control_allow_uid: self.control_allow_uid,
            control_idle_timeout: self.control_idle_timeout.unwrap_or(Duration::from_secs(10)),
            worker_socket: self.worker_socket,
            worker_allow_uid: self.worker_allow_uid,
            drain_timeout: self.drain_timeout.unwrap_or(Duration::from_secs(30)),
            log_format: match self.log_format.unwrap_or(LogFormatArg::Text) {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
            log_level: self.log_level.unwrap_or_else(|| "info".to_string()),
        })
    }
}
