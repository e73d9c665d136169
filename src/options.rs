//! Every option of the acceptor, declared once.
//!
//! Each field of [`Options`] and [`PoolOptions`] (and the sandbox's
//! [`SandboxArgs`], flattened into the pool) is at the same time a flag
//! (clap: `--min-workers`), a key of the config file (serde, kebab-case:
//! `min-workers`, in the `[pool]` table for [`PoolOptions`]) and, through
//! its `default_value`, the default both use and `--help` shows. Adding an
//! option is one field here (with its doc comment, which is its help) and,
//! if the acceptor reads it, one field of [`Config`] filled in
//! [`Options::into_config`].
//!
//! Layering: the file (if `--config` names one) gives every option it
//! sets; a flag given on the command line wins (a list flag replaces the
//! file's list). [`Loader`] keeps what the command line said and the file's
//! path, so that reload (SIGHUP, `ctl reload`) and `baton check` build the
//! configuration exactly the way start-up did.
//!
//! Options that are command-line only: `--config` itself and
//! `--no-control` (see [`crate::cli::RunArgs`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};

use crate::config::{
    check_pool_name, Balance, Config, ListenAddr, LogFormat, PoolConfig, WorkerCommand,
    DEFAULT_POOL,
};
use crate::sandbox::SandboxArgs;
use crate::ConfigError;

/// The options of the acceptor that are not per pool: its listeners (for
/// now), its sockets, its logs. Top-level keys of the config file.
#[derive(Debug, Clone, Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Address to accept connections on (repeatable): 127.0.0.1:8080,
    /// `[::1]:8080`, or :8080 for every IPv4 address. Port 0 picks a free port
    /// (the log says which).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: Vec<String>,

    /// Listen backlog: how many connections the kernel holds for us while
    /// every worker is busy.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub backlog: i32,

    /// On SIGTERM/SIGINT, how long workers may take to finish their
    /// connections before they are killed (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,

    /// Control socket for `baton ctl`, peers checked with SO_PEERCRED
    /// (mode 0600; 0666 with --control-allow-uid, where SO_PEERCRED alone
    /// decides). [default: /run/baton.sock as root, else
    /// $XDG_RUNTIME_DIR/baton.sock, else /tmp/baton-UID.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Also serve the control socket to this uid (repeatable); root and
    /// baton's own uid always are.
    #[arg(long, value_name = "UID")]
    pub control_allow_uid: Vec<u32>,

    /// A control client that sends no complete request for this long is
    /// disconnected.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub control_idle_timeout: Duration,

    /// Listen for workers that register themselves (SOCK_SEQPACKET): any
    /// allowed process that connects and says HELLO joins the pool. baton
    /// never restarts such a worker.
    #[arg(long, value_name = "PATH")]
    pub worker_socket: Option<PathBuf>,

    /// Also accept registering workers from this uid (repeatable); root and
    /// baton's own uid always are.
    #[arg(long, value_name = "UID")]
    pub worker_allow_uid: Vec<u32>,

    /// Log format of baton and of the workers it spawns (they get it in
    /// BATON_LOG_FORMAT): human-readable text (coloured only on a
    /// terminal), or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,

    /// Serve the metrics (Prometheus text format) over HTTP on this
    /// address, e.g. 127.0.0.1:9100. Operator-facing: bind it to loopback
    /// or a management network.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Serve a health check over HTTP on this address, e.g. 10.0.0.5:8404,
    /// for the L4 balancer in front of this host: `200 OK` while baton
    /// accepts and every pool has a ready worker, `503` with the reason
    /// otherwise (a pool with no ready worker, `baton ctl drain-host`,
    /// shutting down). Any path, GET or HEAD.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<String>,

    /// `baton ctl drain-host`: how long the health check fails while the
    /// listeners still accept, before they close and baton finishes what
    /// it holds and exits (as on SIGTERM). Give the balancer in front time
    /// to notice: more than its check interval times its fall count (5s
    /// covers HAProxy's `inter 1s fall 3`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub drain_grace: Duration,

    /// The pool: the `[pool]` table of the file (with several `[[pool]]`
    /// sections, the first; [`Loader::pools`] gives them all).
    #[command(flatten)]
    #[serde(deserialize_with = "sections::first")]
    pub pool: PoolOptions,
}

/// One pool's options: its workers, how connections reach them, their
/// sandbox. The `[pool]` table of the config file.
#[derive(Debug, Clone, Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolOptions {
    /// The pool's name, for `ctl --pool`, metrics and logs (file only;
    /// required with several `[[pool]]` sections, else "default").
    #[arg(skip)]
    pub name: Option<String>,

    /// The pool's own listeners (file only). With one pool the top-level
    /// `listen` (or `--listen`) may give them instead.
    #[arg(skip)]
    pub listen: Vec<String>,

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
    /// this long is retired.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub scale_idle_timeout: Duration,

    /// Most connections one worker holds at once; when every worker is at
    /// this limit the acceptor stops accepting until one finishes.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub worker_connections: u32,

    /// How to choose a worker for each connection.
    #[arg(long, value_enum, default_value_t = Balance::LeastConn)]
    pub balance: Balance,

    /// Serve this directory with the embedded static worker (when no worker
    /// command follows `--`). Checked at start-up as the workers will see
    /// it: it must exist, be readable by the worker user, and lie inside
    /// --chroot when one is given (the worker then gets its path inside
    /// the jail).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// A spawned worker must say HELLO within this time, or it is killed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub hello_timeout: Duration,

    /// A worker must acknowledge a connection within this time, or it is
    /// considered hung: it is disconnected (and killed if spawned) and its
    /// unacknowledged connections go to another worker.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub ack_timeout: Duration,

    /// A worker that holds as many connections as it may and reports none
    /// done for this long is logged as stalled (once, and in `ctl status`
    /// and the metrics); it keeps its connections and gets no new one, and
    /// the other workers serve.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub stall_timeout: Duration,

    /// How long a worker being removed may take to finish its connections
    /// (`baton ctl remove`, SIGTTOU, rolling restart) before it is stopped.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub drain_timeout: Duration,

    /// A spawned worker that exits this many times in a row, each time
    /// within --restart-window of its start, is not restarted again.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub max_restarts: u32,

    /// A worker that ran at least this long before exiting resets its
    /// crash count.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub restart_window: Duration,

    /// Serve TLS with this certificate chain (PEM, leaf first); repeatable,
    /// paired in order with --tls-key. With several, the client's SNI
    /// chooses (exact names, then `*.` wildcards); the first is the
    /// default.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Vec<PathBuf>,

    /// The private key (PEM) of the --tls-cert at the same position. Only
    /// baton's key process reads it; workers ask it to sign and never hold
    /// a key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Vec<PathBuf>,

    /// The lowest TLS version served: 1.2 or 1.3.
    #[arg(long, value_name = "VERSION", default_value = "1.2")]
    pub tls_min_version: String,

    #[command(flatten)]
    #[serde(flatten)]
    pub sandbox: SandboxArgs,

    /// Apply the sandbox check to workers that register themselves too:
    /// one whose /proc/PID/status does not match the pool's profile gets no
    /// connection.
    #[arg(long)]
    pub worker_require_sandbox: bool,

    /// The worker command and its arguments (`command = [...]` in the
    /// file). [default: the static file worker embedded in this binary,
    /// serving the demo site, or DIR with --root]
    #[arg(last = true, value_name = "WORKER COMMAND")]
    #[serde(with = "os_strings")]
    pub command: Vec<OsString>,
}

impl Default for Options {
    /// The defaults the flags declare.
    fn default() -> Self {
        defaults()
    }
}

impl Default for PoolOptions {
    /// The defaults the flags declare.
    fn default() -> Self {
        defaults()
    }
}

/// The value of a group of options when no flag is given: what the
/// `default_value`s of their declaration say. The file's missing keys get
/// these too, so a default is written once, in the declaration.
pub(crate) fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.get_matches_from(std::iter::empty::<OsString>());
    match T::from_arg_matches(&matches) {
        Ok(t) => t,
        // The declarations are fixed at compile time, and a unit test
        // builds every default: this cannot fail at run time.
        Err(e) => unreachable!("the options' defaults do not parse: {e}"),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10s or 500ms: {e}"))
}

/// Durations in the file: strings like `10s`, `500ms` or `2m`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

/// Values written in the file as the string the flag takes (`FromStr`)
/// and shown with `Display`: `seccomp = "default"`, `unshare = "ipc,uts"`.
pub(crate) mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer, T: Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
}

/// The worker command: a list of strings in the file; arguments on the
/// command line may be any bytes, but only UTF-8 ones can be layered over a
/// file.
mod os_strings {
    use std::ffi::OsString;

    use serde::ser::{Error, SerializeSeq};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OsString>, D::Error> {
        Ok(Vec::<String>::deserialize(d)?
            .into_iter()
            .map(OsString::from)
            .collect())
    }

    pub fn serialize<S: Serializer>(v: &[OsString], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for a in v {
            let a = a.to_str().ok_or_else(|| {
                S::Error::custom(format!("worker command argument {a:?} is not UTF-8"))
            })?;
            seq.serialize_element(a)?;
        }
        seq.end()
    }
}

/// The `pool` key of the file: one `[pool]` table, or an array of
/// `[[pool]]` sections. Every section is checked (so that an error points at
/// its line); [`Options::pool`] keeps the first, [`Loader::pools`] splits
/// them.
mod sections {
    use std::fmt;

    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    use super::PoolOptions;

    pub fn first<'de, D: Deserializer<'de>>(d: D) -> Result<PoolOptions, D::Error> {
        struct Sections;
        impl<'de> Visitor<'de> for Sections {
            type Value = PoolOptions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [pool] table or [[pool]] sections")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PoolOptions, A::Error> {
                PoolOptions::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PoolOptions, A::Error> {
                let first: Option<PoolOptions> = seq.next_element()?;
                while seq.next_element::<PoolOptions>()?.is_some() {}
                Ok(first.unwrap_or_default())
            }
        }
        d.deserialize_any(Sections)
    }
}

/// The command line's part of the configuration: the options it gave
/// explicitly, shaped like the config file, so that they can be laid over
/// one.
#[derive(Debug, Clone)]
pub struct Loader {
    /// `--config`: the file re-read by every [`Loader::load`].
    config: Option<PathBuf>,
    /// `--no-control`.
    no_control: bool,
    /// Every option as the command line gave it (defaults where it gave none).
    options: Options,
    /// Only the options given on the command line, as a file table.
    explicit: toml::Table,
}

impl Loader {
    /// What `baton`'s (or `baton check`'s) command line says; `matches`
    /// are the ones `run` was parsed from (they tell which flags were
    /// given, as opposed to defaulted).
    pub fn new(run: &crate::cli::RunArgs, matches: &ArgMatches) -> Result<Loader, ConfigError> {
        let all = toml::Table::try_from(&run.options)
            .map_err(|e| ConfigError::Invalid(format!("the command line: {e}")))?;
        let mut explicit = toml::Table::new();
        let pool_keys = all.get("pool").and_then(toml::Value::as_table);
        for id in matches.ids() {
            if matches.value_source(id.as_str()) != Some(ValueSource::CommandLine) {
                continue;
            }
            let key = id.as_str().replace('_', "-");
            if let Some(v) = all.get(&key).filter(|_| key != "pool") {
                explicit.insert(key, v.clone());
            } else if let Some(v) = pool_keys.and_then(|p| p.get(&key)) {
                let pool = explicit
                    .entry("pool")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(pool) = pool {
                    pool.insert(key, v.clone());
                }
            }
        }
        Ok(Loader {
            config: run.config.clone(),
            no_control: run.no_control,
            options: run.options.clone(),
            explicit,
        })
    }

    /// The config file this loader re-reads, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The options in force: the file's (read now), with every flag given
    /// on the command line over them; the declared defaults for the rest.
    /// Its `pool` is the first pool's.
    pub fn options(&self) -> Result<Options, ConfigError> {
        Ok(self.pools()?.0)
    }

    /// The options in force and every pool's: the file's `[pool]` table or
    /// each of its `[[pool]]` sections, with the command line's pool
    /// options over it (only when there is one pool: over several they
    /// would be ambiguous, and are refused).
    pub fn pools(&self) -> Result<(Options, Vec<PoolOptions>), ConfigError> {
        let Some(path) = &self.config else {
            let pool = self.options.pool.clone();
            return Ok((self.options.clone(), vec![pool]));
        };
        let bad = |why: String| ConfigError::File {
            path: path.clone(),
            why,
        };
        let mut table = crate::file::read(path)?;
        let sections: Vec<toml::Table> = match table.remove("pool") {
            None => vec![toml::Table::new()],
            Some(toml::Value::Table(t)) => vec![t],
            Some(toml::Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::Table(t) => Ok(t),
                    _ => Err(bad(
                        "`pool` must be a [pool] table or [[pool]] sections".into()
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad(
                    "`pool` must be a [pool] table or [[pool]] sections".into()
                ))
            }
        };
        let mut top = self.explicit.clone();
        let flags_pool = top.remove("pool").and_then(|v| match v {
            toml::Value::Table(t) if !t.is_empty() => Some(t),
            _ => None,
        });
        let top_listen = table.contains_key("listen") || top.contains_key("listen");
        let several = sections.len() > 1;
        if several {
            if let Some(flags) = &flags_pool {
                let names: Vec<String> = flags
                    .keys()
                    .map(|k| match k.as_str() {
                        "command" => "a worker command after --".to_string(),
                        k => format!("--{k}"),
                    })
                    .collect();
                return Err(bad(format!(
                    "the file has {} [[pool]] sections, so pool options on the command line ({}) would be ambiguous: set them in the sections",
                    sections.len(),
                    names.join(", ")
                )));
            }
            if top_listen {
                return Err(bad(format!(
                    "with {} [[pool]] sections each pool has its own `listen`: move the top-level `listen` (or --listen) into them",
                    sections.len()
                )));
            }
        }
        overlay(&mut table, &top);
        let mut pools = Vec::with_capacity(sections.len());
        let mut first: Option<Options> = None;
        for mut section in sections {
            if !several {
                if section.contains_key("listen") && self.explicit.contains_key("listen") {
                    // --listen wins over the file, as every flag does.
                    section.remove("listen");
                } else if section.contains_key("listen") && table.contains_key("listen") {
                    return Err(bad(
                        "`listen` is given both at the top and in [pool]: keep one".into(),
                    ));
                }
                if let Some(flags) = &flags_pool {
                    overlay(&mut section, flags);
                }
            }
            let mut whole = table.clone();
            whole.insert("pool".into(), toml::Value::Table(section));
            let o = Options::deserialize(toml::Value::Table(whole))
                .map_err(|e| bad(format!("with the command line over it: {e}")))?;
            pools.push(o.pool.clone());
            first.get_or_insert(o);
        }
        let options = first.ok_or_else(|| bad("no pool".into()))?;
        Ok((options, pools))
    }

    /// Reads, layers and validates: the acceptor's configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (options, pools) = self.pools()?;
        options.into_config(pools, self.no_control)
    }
}

/// Lays `top` over `base`: every key of `top` replaces `base`'s, tables
/// (the `[pool]` table) key by key.
fn overlay(base: &mut toml::Table, top: &toml::Table) {
    for (k, v) in top {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
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

impl Options {
    /// Validates the options and builds the acceptor's configuration, with
    /// `pools` (at least one; [`Loader::pools`] gives them).
    pub fn into_config(
        self,
        pools: Vec<PoolOptions>,
        no_control: bool,
    ) -> Result<Config, ConfigError> {
        let backlog = self.backlog;
        if backlog < 1 {
            return Err(ConfigError::Invalid(format!(
                "--backlog must be at least 1, got {backlog}"
            )));
        }
        let several = pools.len() > 1;
        let mut built: Vec<PoolConfig> = Vec::with_capacity(pools.len());
        for (i, p) in pools.into_iter().enumerate() {
            let name = match (&p.name, several) {
                (Some(n), _) => n.clone(),
                (None, false) => DEFAULT_POOL.to_string(),
                (None, true) => {
                    return Err(ConfigError::Invalid(format!(
                        "[[pool]] section {} has no `name`: with several pools each needs one",
                        i + 1
                    )))
                }
            };
            check_pool_name(&name)?;
            if built.iter().any(|b| b.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "two pools are named `{name}`: pool names must be unique"
                )));
            }
            // Registering workers join the first pool.
            let registering = i == 0 && self.worker_socket.is_some();
            let pool = p
                .into_pool(name.clone(), &self.listen, registering)
                .map_err(|e| if several { e.in_pool(&name) } else { e })?;
            for l in pool.listen.iter().filter(|l| l.0.port() != 0) {
                if let Some(other) = built.iter().find(|b| b.listen.contains(l)) {
                    return Err(ConfigError::Invalid(format!(
                        "listener {} is claimed by pool `{}` and by pool `{}`: give each address to one pool",
                        l.0, other.name, pool.name
                    )));
                }
            }
            built.push(pool);
        }
        let endpoint = |a: &Option<String>, flag: &str| {
            a.as_deref()
                .map(|a| {
                    ListenAddr::parse(a)
                        .map(|l| l.0)
                        .map_err(|e| ConfigError::Invalid(format!("--{flag}: {e}")))
                })
                .transpose()
        };
        let metrics_listen = endpoint(&self.metrics_listen, "metrics-listen")?;
        let health_listen = endpoint(&self.health_listen, "health-listen")?;
        Ok(Config {
            metrics_listen,
            health_listen,
            drain_grace: self.drain_grace,
            backlog,
            shutdown_timeout: self.shutdown_timeout,
            control: if no_control {
                None
            } else {
                Some(self.control.unwrap_or_else(crate::control::default_path))
            },
            control_allow_uid: self.control_allow_uid,
            control_idle_timeout: self.control_idle_timeout,
            worker_socket: self.worker_socket,
            worker_allow_uid: self.worker_allow_uid,
            log_format: self.log_format,
            log_level: self.log_level,
            pools: built,
        })
    }
}

impl PoolOptions {
    /// Validates one pool's options. `default_listen` is the top-level
    /// `listen` (used when the pool names none); `registering`: workers
    /// that register themselves join it, so it may start with none.
    fn into_pool(
        self,
        name: String,
        default_listen: &[String],
        registering: bool,
    ) -> Result<PoolConfig, ConfigError> {
        let p = self;
        let listen_from = if p.listen.is_empty() {
            default_listen
        } else {
            &p.listen
        };
        let listen = listen_from
            .iter()
            .map(|s| ListenAddr::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(ConfigError::Invalid(
                "no --listen address (the file's `listen` list is empty)".to_string(),
            ));
        }
        for (i, l) in listen.iter().enumerate() {
            // Port 0 asks for a free port: never the same listener twice.
            if l.0.port() != 0 && listen[..i].contains(l) {
                return Err(ConfigError::Invalid(format!(
                    "listener {} is given twice",
                    l.0
                )));
            }
        }
        let workers = match p.workers {
            Some(0) if !registering => {
                return Err(ConfigError::Invalid(
                    "--workers must be at least 1 (0 only with --worker-socket)".to_string(),
                ))
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let min_workers = p.min_workers.unwrap_or(workers);
        let max_workers = p.max_workers.unwrap_or(workers.max(min_workers));
        if min_workers > workers || workers > max_workers {
            return Err(ConfigError::Invalid(format!(
                "need --min-workers <= --workers <= --max-workers, got {min_workers} <= {workers} <= {max_workers}"
            )));
        }
        let worker_connections = p.worker_connections;
        if worker_connections == 0 {
            return Err(ConfigError::Invalid(
                "--worker-connections must be at least 1".to_string(),
            ));
        }
        let program = p.command.first().map(std::path::Path::new);
        let sandbox = p.sandbox.resolve(worker_connections, program)?;
        let command = match (p.command.split_first(), &p.root) {
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
                let root = crate::sandbox::check_root(root, &sandbox)?;
                embedded_static(vec!["--root".into(), root.into()])
            }
            (None, None) => embedded_static(vec!["--demo".into()]),
        };
        command.check()?;
        let tls = tls_config(&p.tls_cert, &p.tls_key, &p.tls_min_version)?;
        Ok(PoolConfig {
            tls,
            name,
            listen,
            sandbox,
            worker_require_sandbox: p.worker_require_sandbox,
            workers,
            min_workers,
            max_workers,
            scale_idle_timeout: p.scale_idle_timeout,
            worker_connections,
            balance: p.balance,
            command,
            hello_timeout: p.hello_timeout,
            ack_timeout: p.ack_timeout,
            stall_timeout: p.stall_timeout,
            max_restarts: p.max_restarts,
            restart_window: p.restart_window,
            drain_timeout: p.drain_timeout,
        })
    }
}

/// Checks a pool's TLS options: certificates and keys in pairs, every
/// certificate loads (it is public: baton reads it and hands the chain to
/// the workers), every key file is readable (the key process checks it
/// matches its certificate when it starts, and `baton check` does too).
fn tls_config(
    certs: &[PathBuf],
    keys: &[PathBuf],
    min_version: &str,
) -> Result<Option<crate::config::PoolTls>, ConfigError> {
    if certs.is_empty() && keys.is_empty() {
        return Ok(None);
    }
    if certs.len() != keys.len() {
        return Err(ConfigError::Invalid(format!(
            "--tls-cert is given {} time(s) and --tls-key {} time(s): give them in pairs, each key after its certificate",
            certs.len(),
            keys.len()
        )));
    }
    let min_version: baton_tls::MinVersion = min_version
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("--tls-min-version: {e}")))?;
    let abs = |p: &PathBuf| {
        std::path::absolute(p).map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))
    };
    let mut pairs = Vec::new();
    for (c, k) in certs.iter().zip(keys) {
        baton_tls::CertChain::load(c)
            .map_err(|e| ConfigError::Invalid(format!("--tls-cert {e}")))?;
        std::fs::File::open(k)
            .map_err(|e| ConfigError::Invalid(format!("--tls-key {}: {e}", k.display())))?;
        pairs.push((abs(c)?, abs(k)?));
    }
    Ok(Some(crate::config::PoolTls { pairs, min_version }))
}

/// Every long flag of `baton` (running the acceptor) that the file does
/// not take, with why.
pub const COMMAND_LINE_ONLY: &[(&str, &str)] = &[
    ("config", "names the file itself"),
    (
        "no-control",
        "turns off what the file's `control` key configures; kept to the command line",
    ),
    ("help", "clap's"),
    ("version", "clap's"),
];

/// The file keys of every option, as `(table, key)`: `None` for top-level
/// keys, `Some("pool")` for the `[pool]` table's. Generated from the flags,
/// so that error messages and tests list exactly what the file takes.
pub fn file_keys() -> Vec<(Option<&'static str>, String)> {
    let top = Options::augment_args(clap::Command::new("top"));
    let pool = PoolOptions::augment_args(clap::Command::new("pool"));
    let pool_ids: Vec<String> = pool
        .get_arguments()
        .map(|a| a.get_id().as_str().replace('_', "-"))
        .collect();
    let mut keys: Vec<(Option<&'static str>, String)> = top
        .get_arguments()
        .map(|a| a.get_id().as_str().replace('_', "-"))
        .filter(|k| !pool_ids.contains(k))
        .map(|k| (None, k))
        .collect();
    keys.extend(pool_ids.into_iter().map(|k| (Some("pool"), k)));
    // The pool's file-only keys.
    keys.extend(["name", "listen"].map(|k| (Some("pool"), k.to_string())));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Sub};
    use clap::CommandFactory;

    /// Parses a `baton` command line into its loader, with `file` (if any)
    /// written to a scratch file named by `--config`.
    fn loader(args: &[&str], file: Option<&str>) -> (Loader, Option<PathBuf>) {
        let path = file.map(|text| {
            let p = std::env::temp_dir().join(format!(
                "baton-options-test-{}-{}.toml",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::write(&p, text).expect("write the test file");
            p
        });
        let mut argv: Vec<String> = vec!["baton".into()];
        if let Some(p) = &path {
            argv.push("--config".into());
            argv.push(p.display().to_string());
        }
        argv.extend(args.iter().map(|s| s.to_string()));
        let matches = Cli::command().try_get_matches_from(&argv).expect("parses");
        let cli = Cli::from_arg_matches(&matches).expect("parses");
        assert!(cli.sub.is_none());
        (Loader::new(&cli.run, &matches).expect("loader"), path)
    }

    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn options(args: &[&str], file: Option<&str>) -> Options {
        let (l, path) = loader(args, file);
        let o = l.options();
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
        o.expect("options")
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        // Every default parses (what `defaults()` relies on).
        let _: Options = defaults();
    }

    #[test]
    fn flags_override_the_file() {
        let file = "listen = [\"127.0.0.1:1\"]\nbacklog = 7\nlog-level = \"debug\"\n\
                    [pool]\nworkers = 3\nbalance = \"round-robin\"\ndrain-timeout = \"1m\"\n\
                    command = [\"/bin/cat\"]\nseccomp = \"off\"\nno-fork = true\n";
        let o = options(
            &[
                "--listen",
                "127.0.0.1:2",
                "--listen",
                "127.0.0.1:3",
                "--workers",
                "5",
                "--balance",
                "least-conn",
                "--drain-timeout",
                "2s",
                "--seccomp",
                "default",
                "--",
                "/bin/true",
            ],
            Some(file),
        );
        assert_eq!(o.listen, ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(o.pool.workers, Some(5));
        assert_eq!(o.pool.balance, Balance::LeastConn);
        assert_eq!(o.pool.drain_timeout, Duration::from_secs(2));
        assert_eq!(o.pool.command, [OsString::from("/bin/true")]);
        assert_eq!(
            o.pool.sandbox.seccomp,
            crate::sandbox::SeccompChoice::Mode(baton_sdk::sandbox::SeccompMode::Default)
        );
        // What the flags left alone, the file gives.
        assert_eq!(o.backlog, 7);
        assert_eq!(o.log_level, "debug");
        assert!(o.pool.sandbox.no_fork);
    }

    #[test]
    fn the_file_gives_what_flags_leave_out_and_defaults_the_rest() {
        let o = options(
            &["--backlog", "9"],
            Some("[pool]\nbalance = \"round-robin\"\nstall-timeout = \"3s\"\n"),
        );
        assert_eq!(o.backlog, 9);
        assert_eq!(o.pool.balance, Balance::RoundRobin);
        assert_eq!(o.pool.stall_timeout, Duration::from_secs(3));
        // Neither flag nor file: the declared defaults.
        assert_eq!(o.listen, ["127.0.0.1:8080"]);
        assert_eq!(o.pool.worker_connections, 1024);
        assert_eq!(o.pool.drain_timeout, Duration::from_secs(30));
        assert_eq!(o.log_format, LogFormat::Text);
        // The same defaults without a file.
        let bare = options(&[], None);
        assert_eq!(bare.listen, o.listen);
        assert_eq!(bare.pool.drain_timeout, o.pool.drain_timeout);
        assert_eq!(bare.pool.balance, Balance::LeastConn);
    }

    #[test]
    fn every_flag_is_a_file_key() {
        let keys = file_keys();
        let cmd = Cli::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else {
                // The worker command: `command = [...]` in [pool].
                assert_eq!(arg.get_id().as_str(), "command");
                continue;
            };
            if COMMAND_LINE_ONLY.iter().any(|(k, _)| *k == long) {
                continue;
            }
            let table = keys.iter().find(|(_, k)| k == long).map(|(t, _)| *t);
            let Some(table) = table else {
                panic!("--{long} has no config file key: add it to Options or PoolOptions, or to COMMAND_LINE_ONLY with why");
            };
            // And the file really takes it, where file_keys() says.
            let value = match arg.get_action() {
                clap::ArgAction::SetTrue => "true".to_string(),
                clap::ArgAction::Append => match arg.get_default_values().first() {
                    Some(v) => format!("[{:?}]", v.to_string_lossy()),
                    None if arg.get_value_names().is_some_and(|n| n[0] == "FILE") => {
                        "[\"x\"]".to_string()
                    }
                    None => "[1000]".to_string(),
                },
                _ => match arg.get_default_values().first() {
                    Some(v) => {
                        let v = v.to_string_lossy();
                        if v.parse::<i64>().is_ok() {
                            v.to_string()
                        } else {
                            format!("{v:?}")
                        }
                    }
                    None if arg.get_value_names().is_some_and(|n| n[0] == "N") => "2".into(),
                    None => "\"x\"".into(),
                },
            };
            let text = match table {
                None => format!("{long} = {value}\n"),
                Some(t) => format!("[{t}]\n{long} = {value}\n"),
            };
            if let Err(e) = crate::file::parse(&text) {
                panic!("--{long}: the file refuses {text:?}: {e}");
            }
            checked += 1;
        }
        // The worker command too.
        crate::file::parse("[pool]\ncommand = [\"/bin/cat\", \"-u\"]\n").expect("command");
        assert!(checked > 30, "only {checked} flags checked");
        // `baton check` takes the same flags as `baton`.
        let check = cmd
            .find_subcommand("check")
            .expect("check subcommand")
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect::<Vec<_>>();
        for a in cmd.get_arguments().filter_map(|a| a.get_long()) {
            assert!(
                check.contains(&a) || a == "version",
                "baton check lacks --{a}"
            );
        }
    }

    #[test]
    fn check_takes_flags_alone() {
        let matches = Cli::command()
            .try_get_matches_from([
                "baton",
                "check",
                "--workers",
                "2",
                "--balance",
                "round-robin",
            ])
            .expect("parses");
        let cli = Cli::from_arg_matches(&matches).expect("parses");
        let (_, sub) = matches.subcommand().expect("check");
        let Some(Sub::Check(args)) = cli.sub else {
            panic!("not check")
        };
        let l = Loader::new(&args.run, sub).expect("loader");
        assert!(l.config_path().is_none());
        let o = l.options().expect("options");
        assert_eq!(o.pool.workers, Some(2));
        assert_eq!(o.pool.balance, Balance::RoundRobin);
    }

    #[test]
    fn names_users_read_are_the_config_names() {
        assert_eq!(Balance::RoundRobin.to_string(), "round-robin");
        assert_eq!(Balance::LeastConn.to_string(), "least-conn");
        assert_eq!(LogFormat::Json.to_string(), "json");
        for b in [Balance::LeastConn, Balance::RoundRobin] {
            let v = clap::ValueEnum::to_possible_value(&b).expect("named");
            assert_eq!(v.get_name(), b.as_str());
        }
    }
}
