//! The acceptor's event loop: a single thread, one mio `Poll`, never blocks.
//!
//! Event sources, by token:
//!
//! | token                  | source                         | on readiness                          |
//! |------------------------|--------------------------------|---------------------------------------|
//! | `SIGNALS`              | signalfd (TERM, INT, CHLD, HUP, TTIN, TTOU) | stop, reap and restart, reload, add or remove a worker |
//! | `CONTROL`              | control socket (stream)        | accept `baton ctl` clients (SO_PEERCRED checked) |
//! | `WORKER_SOCKET`        | worker socket (SEQPACKET)      | accept self-registering workers        |
//! | `LISTENER_BASE + i`    | listener `i` (of one pool)     | accept until EAGAIN, hand off to that pool |
//! | `METRICS`              | `--metrics-listen` (TCP)       | accept Prometheus scrapers (`scrape`) |
//! | `HEALTH`               | `--health-listen` (TCP)        | accept health checks (`scrape`, answered by `health`) |
//! | `CTL_BASE + key`       | a control client               | JSON request lines → replies (`ops`) |
//! | `SCRAPE_BASE + key`    | a metrics scraper              | one GET → the metrics text, close     |
//! | `WORKER_BASE + (pool << 20) + key` | a worker's SEQPACKET channel | HELLO / ACK / DONE / PARK; EOF = worker gone (read to its end first) |
//! | `PARKED_BASE + key`    | a parked keep-alive connection | readable: back to `pending` for a worker; hang-up: closed |
//!
//! **Pools.** The acceptor runs one or more pools (`PoolState`), each
//! with its own listeners, worker command, sandbox, capacity, balancing,
//! supervisor slots, pending queue and rolling restart. A connection
//! accepted on a pool's listener goes only to that pool's workers (and,
//! parked, comes back to it). What is the acceptor's own is shared by all
//! pools: the fd budget, the parked set, the control and worker sockets
//! (registering workers join the first pool), the metrics endpoint. A
//! worker is named by its pool and its key there (`Wk`). Each pool has a
//! small shared memory file (memfd) that every worker it spawns inherits
//! (`BATON_SHARED_FD`): state the workers of one pool share, such as a
//! proxy's view of its upstreams' health.
//!
//! The loop and its state live here (`mod.rs`: start-up, signals and child
//! exits, shutdown, timers); the rest is in named parts, each an `impl
//! Acceptor` over the same state:
//!
//! | file          | part                                                            |
//! |---------------|-----------------------------------------------------------------|
//! | `intake.rs`   | listeners, the accept round, `pending`, the fd budget, batched hand-off (`pump`, `dispatch`, `flush`) |
//! | `sessions.rs` | worker sessions: HELLO and the sandbox check, ACK/DONE/PARK, how a worker leaves (`Gone`, `close_worker`) |
//! | `parked.rs`   | parked keep-alive connections: hold, re-dispatch, reap, expire, evict |
//! | `ctl_sessions.rs` | `baton ctl` clients: SO_PEERCRED, JSON lines, replies       |
//! | `ops.rs`      | registration, add/remove/restart/reload, autoscaling (`Pool::scale` decides) |
//! | `status.rs`   | `ctl workers`, `ctl status`, the metrics text                   |
//! | `scrape.rs`   | the `--metrics-listen` HTTP endpoint (and `--health-listen`'s)   |
//! | `health.rs`   | the health check's answer, `ctl drain-host`                     |
//!
//! Timers (restart backoff, EMFILE retry, HELLO, ACK and drain timeouts,
//! idle control clients, shutdown deadline) are deadlines kept in the state below; the poll timeout is the
//! nearest one, so nothing spins.
//!
//! After every batch of events, `Acceptor::pump` moves connections along:
//! first the ones waiting in `pending` (taken back from a dead worker,
//! unparked, or accepted while every worker was busy), then fresh ones from
//! the listeners. Connections are only assigned during the round; at its end
//! each worker gets one CONNS message with all of its new ones
//! (`Acceptor::flush`; one CONN each for a protocol v1 worker). When no
//! worker has room, or the connections held reach the fd budget, the
//! listeners are deregistered and the kernel's backlog holds new clients
//! until a DONE or an ACK frees room; idle parked connections are closed,
//! oldest first, to make room rather than refuse a new client.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use baton_sdk::Msg;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::SockType;
use nix::unistd::Pid;
use slab::Slab;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::pool::{Held, Pool, State};
use crate::supervisor::{self, After, Slot};
use crate::unix::UnixListener;
use crate::{listener, Error};

mod ctl_sessions;
mod health;
mod intake;
mod ops;
mod parked;
mod scrape;
mod sessions;
mod status;
mod tls;
pub mod upgrade;
use ctl_sessions::CtlClient;
use intake::{count_open_fds, raise_nofile};
use ops::OpError;
use parked::ParkedConn;
use scrape::{Endpoint, Scraper};
use sessions::Gone;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const WORKER_SOCKET: Token = Token(2);
const METRICS: Token = Token(3);
const HEALTH: Token = Token(4);
const LISTENER_BASE: usize = 16;
const SCRAPE_BASE: usize = 1 << 24;
const CTL_BASE: usize = 2 << 24;
const PARKED_BASE: usize = 1 << 32;
const WORKER_BASE: usize = 1 << 40;
/// A worker's token: `WORKER_BASE + (pool << POOL_SHIFT) + key`.
const POOL_SHIFT: u32 = 20;
/// A parked connection whose worker gave no idle time left is closed after
/// this long without a request.
const PARKED_IDLE: Duration = Duration::from_secs(60);

/// How long accepting pauses after EMFILE/ENFILE before it is retried.
const EMFILE_RETRY: Duration = Duration::from_millis(100);
/// EMFILE is logged at most this often.
const EMFILE_LOG_EVERY: Duration = Duration::from_secs(60);
/// File descriptors the acceptor keeps free for itself, whatever the load:
/// spawning a worker (a socket pair, std's exec-error pipe, /dev/null),
/// reading its /proc files for the sandbox check, one control client and
/// one metrics scraper, with room to spare. Connections held (pending, or
/// sent and not yet acknowledged) are bounded by the fd limit less this
/// and the fds the acceptor holds anyway.
pub const FD_RESERVE: usize = 32;
/// A stop signal from the same sender within this long of the first is the
/// same signal delivered twice (to the process and to its group).
const DUPLICATE_SIGNAL: Duration = Duration::from_secs(1);
/// A spawn that failed for want of resources is retried after this long.
const RESOURCE_RETRY: Duration = Duration::from_millis(500);

/// Counters for logs, `ctl status` and metrics.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub accepted: u64,
    pub handed_off: u64,
    /// Connections taken back from a worker that left before acknowledging
    /// them, and given to another.
    pub redispatched: u64,
    /// Acknowledged connections whose worker died before it finished them.
    pub lost: u64,
    pub capacity_pauses: u64,
    pub emfile_pauses: u64,
    /// Times accepting paused because the connections held reached the fd
    /// budget.
    pub fd_pauses: u64,
    /// Connections still open in workers killed at the shutdown timeout.
    pub cut_at_shutdown: u64,
    /// CONN/CONNS messages sent (with `handed_off`: the batch size).
    pub sends: u64,
    /// Idle connections handed back by workers (PARK).
    pub parked: u64,
    /// Parked connections whose client sent its next request: handed to a
    /// worker again.
    pub unparked: u64,
    /// Parked connections the client closed (or that could not be held at
    /// shutdown).
    pub parked_closed: u64,
    /// Parked connections closed at their idle timeout.
    pub parked_expired: u64,
    /// Parked connections closed to make room for new ones.
    pub parked_evicted: u64,
}

struct Listener {
    sock: mio::net::TcpListener,
    addr: SocketAddr,
    /// The address it was configured with (port 0 before binding), which
    /// reload compares.
    spec: SocketAddr,
    registered: bool,
    /// The pool whose workers get its connections.
    pool: usize,
}

/// A worker: its pool and its key in that pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wk {
    pub(super) pool: usize,
    pub(super) key: usize,
}

impl Wk {
    fn token(self) -> Token {
        Token(WORKER_BASE + (self.pool << POOL_SHIFT) + self.key)
    }

    fn from_token(t: usize) -> Wk {
        let x = t - WORKER_BASE;
        Wk {
            pool: x >> POOL_SHIFT,
            key: x & ((1 << POOL_SHIFT) - 1),
        }
    }
}

/// Counters of one pool (the acceptor's [`Stats`] has the totals).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    pub accepted: u64,
    pub handed_off: u64,
    pub redispatched: u64,
    pub lost: u64,
}

/// One pool as the acceptor runs it: its configuration, its connected
/// workers ([`Pool`]), the supervisor slots of the workers it spawned, and
/// the connections waiting for one of them.
pub(super) struct PoolState {
    pub(super) cfg: crate::config::PoolConfig,
    pub(super) pool: Pool,
    pub(super) slots: Slab<Slot>,
    /// Accepted connections waiting for a worker, oldest first.
    pub(super) pending: VecDeque<Held>,
    /// Rolling restart: slots still to replace, and the (old, new) pair
    /// under way (the old one drains once the new one is ready).
    pub(super) rolling: VecDeque<usize>,
    pub(super) rolling_current: Option<(usize, usize)>,
    pub(super) paused_for_capacity: bool,
    /// DRAIN was sent to its workers (shutdown, or the pool is removed).
    pub(super) drain_sent: bool,
    /// Removed by a reload: its listeners are closed, its workers drain,
    /// and it goes once they have.
    pub(super) removing: bool,
    /// The memory file its spawned workers share (`BATON_SHARED_FD`).
    pub(super) shared: Option<std::os::fd::OwnedFd>,
    /// Its TLS (key ids and bundle), when it terminates TLS.
    pub(super) tls: Option<tls::PoolTlsState>,
    pub(super) stats: PoolStats,
}

impl PoolState {
    fn new(cfg: crate::config::PoolConfig) -> PoolState {
        let shared = shared_memory(&cfg.name)
            .map_err(|e| warn!(pool = %cfg.name, error = %e, "cannot create the pool's shared memory; its workers share no state"))
            .ok();
        PoolState::new_with_shared(cfg, shared)
    }

    fn new_with_shared(
        cfg: crate::config::PoolConfig,
        shared: Option<std::os::fd::OwnedFd>,
    ) -> PoolState {
        PoolState {
            pool: Pool::new(cfg.balance),
            cfg,
            slots: Slab::new(),
            pending: VecDeque::new(),
            rolling: VecDeque::new(),
            rolling_current: None,
            paused_for_capacity: false,
            drain_sent: false,
            removing: false,
            shared,
            tls: None,
            stats: PoolStats::default(),
        }
    }

    /// Spawned workers that are not being removed.
    pub(super) fn spawned_live(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| !s.is_retired() && !s.is_given_up())
            .count()
    }

    /// Processes of its spawned workers still running.
    fn procs(&self) -> usize {
        self.slots.iter().filter(|(_, s)| s.pid().is_some()).count()
    }

    pub(super) fn rolling(&self) -> bool {
        self.rolling_current.is_some() || !self.rolling.is_empty()
    }
}

/// A mio listener of an inherited listening socket.
fn tcp_listener(fd: std::os::fd::OwnedFd) -> mio::net::TcpListener {
    mio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
}

/// A zero-filled memory file for the workers of pool `name` to map
/// ([`baton_sdk::shared`] has its layout).
fn shared_memory(name: &str) -> io::Result<std::os::fd::OwnedFd> {
    baton_sdk::shared::create_region(&format!("baton-pool-{name}"))
}

/// Binds one of the acceptor's local sockets and watches it. With no extra
/// uid allowed the file is 0600; otherwise 0666, so that the other uids can
/// connect() at all and be checked with SO_PEERCRED.
fn open_local(
    poll: &Poll,
    path: &std::path::Path,
    ty: SockType,
    allowed: &[u32],
    token: Token,
    what: &'static str,
) -> Result<UnixListener, Error> {
    let mode = if allowed.is_empty() { 0o600 } else { 0o666 };
    let l = UnixListener::bind(path, ty, mode).map_err(|source| Error::UnixSocket {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    poll.registry()
        .register(&mut SourceFd(&l.fd.as_raw_fd()), token, Interest::READABLE)
        .map_err(Error::Poll)?;
    info!(path = %path.display(), "{what} listening");
    Ok(l)
}

/// How the event loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker finished (or was killed at the shutdown timeout).
    Graceful,
    /// A second signal cut the shutdown short.
    Forced,
}

pub struct Acceptor {
    /// The acceptor's own settings; `cfg.pools` is empty: each pool's
    /// configuration is in its [`PoolState`].
    cfg: Config,
    poll: Poll,
    listeners: Slab<Listener>,
    signals: SignalFd,
    /// The pools, by a key that stays theirs (tokens carry it).
    pools: Slab<PoolState>,
    /// Idle keep-alive connections handed back by workers (PARK), watched
    /// for the client's next request or hang-up, never read.
    parked: Slab<ParkedConn>,
    /// The same, by idle deadline: the first is the next to expire, and the
    /// one evicted when the fd budget needs room.
    parked_order: std::collections::BTreeSet<(Instant, usize)>,
    next_conn_id: u64,
    next_worker_id: u32,
    /// Accepting is paused after EMFILE until this instant.
    emfile_until: Option<Instant>,
    /// RLIMIT_NOFILE (soft, raised to the hard limit at start).
    fd_limit: usize,
    /// Fds open besides listeners, worker channels, control clients and
    /// scrapers (stdio, epoll, signalfd, local sockets), counted at start.
    fd_fixed: usize,
    /// Accepting is paused because held connections reached the budget.
    paused_for_fds: bool,
    fd_logged: Option<Instant>,
    /// When EMFILE was last logged, and how many pauses since: the warning
    /// is repeated at most once a minute, never per connection.
    emfile_logged: Option<Instant>,
    emfile_unlogged: u64,
    /// Shutdown deadline, once a stop signal arrived.
    shutdown: Option<Instant>,
    /// The stop signal that began the shutdown: when, which, from which pid.
    stop_signal: Option<(Instant, Signal, u32)>,
    stats: Stats,
    /// `READY=1` was sent to the service manager.
    ready_sent: bool,
    /// The binary this image runs (what `ctl upgrade` re-executes by
    /// default).
    exe: std::path::PathBuf,
    /// Taken over from an upgrading image: the workers exist already.
    resumed: bool,
    /// The key process of the TLS pools.
    keyd: Option<tls::Keyd>,
    /// The keys it is to load, until `run` starts it.
    keyd_files: Vec<baton_tls::KeyFiles>,
    /// Key processes a reload replaced, kept until the old workers are.
    retired_keyds: Vec<tls::Keyd>,
    /// An upgrade asked for by SIGUSR2 or `ctl upgrade` (with the control
    /// client to answer), done between two rounds of events.
    upgrade_asked: Option<(Option<std::path::PathBuf>, Option<usize>)>,
    /// Self-registering workers connect here.
    worker_listener: Option<UnixListener>,
    /// `baton ctl` connects here.
    control: Option<UnixListener>,
    ctl: Slab<CtlClient>,
    /// Refused peers of the control and worker sockets, for summary lines.
    ctl_refused: ctl_sessions::Refusals,
    worker_refused: ctl_sessions::Refusals,
    started: Instant,
    own_uid: u32,
    /// `--metrics-listen` and its clients.
    metrics_listener: Option<mio::net::TcpListener>,
    scrapers: Slab<Scraper>,
    /// `--health-listen` and `ctl drain-host` (its clients are scrapers).
    health: health::Health,
    /// Builds the configuration again on reload: re-reads `--config` and
    /// lays the command line over it.
    reload: Option<crate::options::Loader>,
}

impl Acceptor {
    /// Binds every listener and prepares the loop. Nothing is spawned yet.
    ///
    /// `inherited` are the listening sockets of socket activation
    /// ([`crate::systemd::take_listeners`]): each serves the configured
    /// listener of its address, or else the pool its name names; the others
    /// are closed. Configured addresses no inherited socket serves are bound.
    pub fn new(
        mut cfg: Config,
        mut inherited: Vec<crate::systemd::InheritedListener>,
    ) -> Result<Acceptor, Error> {
        let poll = Poll::new().map_err(Error::Poll)?;
        let mut listeners = Slab::new();
        let mut pools = Slab::new();
        let add = |listeners: &mut Slab<Listener>,
                   sock: mio::net::TcpListener,
                   spec: SocketAddr,
                   pool: usize,
                   name: &str,
                   from: &str|
         -> Result<(), Error> {
            let addr = sock
                .local_addr()
                .map_err(|source| Error::Bind { addr: spec, source })?;
            info!(addr = %addr, pool = %name, listener = listeners.len(), from, "listening");
            listeners.insert(Listener {
                sock,
                addr,
                spec,
                registered: false,
                pool,
            });
            Ok(())
        };
        let mut keyd_files = Vec::new();
        let now = Instant::now();
        for pc in std::mem::take(&mut cfg.pools) {
            let pool = pools.vacant_key();
            let tls = match &pc.tls {
                Some(t) => {
                    let (state, files) =
                        tls::PoolTlsState::new(t, keyd_files.len() as u32 + 1, now)
                            .map_err(|e| Error::Tls(format!("pool `{}`: {e}", pc.name)))?;
                    keyd_files.extend(files);
                    Some(state)
                }
                None => None,
            };
            for l in &pc.listen {
                let found = inherited
                    .iter()
                    .position(|i| l.0.port() != 0 && i.addr == l.0);
                let (sock, from) = match found {
                    Some(i) => {
                        let i = inherited.remove(i);
                        (tcp_listener(i.fd), "systemd")
                    }
                    None => (
                        listener::bind(l.0, cfg.backlog)
                            .map_err(|source| Error::Bind { addr: l.0, source })?,
                        "bound",
                    ),
                };
                add(&mut listeners, sock, l.0, pool, &pc.name, from)?;
            }
            // Inherited sockets that name this pool.
            while let Some(i) = inherited.iter().position(|i| i.name == pc.name) {
                let i = inherited.remove(i);
                add(
                    &mut listeners,
                    tcp_listener(i.fd),
                    i.addr,
                    pool,
                    &pc.name,
                    "systemd",
                )?;
            }
            let mut ps = PoolState::new(pc);
            ps.tls = tls;
            pools.insert(ps);
        }
        for i in inherited {
            warn!(addr = %i.addr, name = %i.name, "an inherited socket serves no configured listener and names no pool; closed (list its address in `listen`, or set FileDescriptorName= to a pool's name)");
        }
        let worker_listener = cfg
            .worker_socket
            .as_ref()
            .map(|path| {
                open_local(
                    &poll,
                    path,
                    SockType::SeqPacket,
                    &cfg.worker_allow_uid,
                    WORKER_SOCKET,
                    "worker socket",
                )
            })
            .transpose()?;
        let control = cfg
            .control
            .as_ref()
            .map(|path| {
                open_local(
                    &poll,
                    path,
                    SockType::Stream,
                    &cfg.control_allow_uid,
                    CONTROL,
                    "control socket",
                )
            })
            .transpose()?;
        let metrics_listener = match cfg.metrics_listen {
            Some(addr) => {
                let mut l =
                    listener::bind(addr, 64).map_err(|source| Error::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                poll.registry()
                    .register(&mut l, METRICS, Interest::READABLE)
                    .map_err(Error::Poll)?;
                info!(addr = %bound, "metrics listening");
                Some(l)
            }
            None => None,
        };
        let health = health::Health::open(&poll, cfg.health_listen)?;
        // Block the signals we handle so that they queue on the signalfd.
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGCHLD,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGHUP,
            Signal::SIGUSR2,
        ] {
            mask.add(s);
        }
        mask.thread_block().map_err(|e| Error::Signals(e.into()))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| Error::Signals(e.into()))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_fd().as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )
            .map_err(Error::Poll)?;
        let fd_limit = raise_nofile();
        Ok(Acceptor {
            cfg,
            poll,
            listeners,
            signals,
            pools,
            parked: Slab::new(),
            parked_order: std::collections::BTreeSet::new(),
            next_conn_id: 1,
            next_worker_id: 1,
            emfile_until: None,
            fd_limit,
            fd_fixed: 0,
            paused_for_fds: false,
            fd_logged: None,
            emfile_logged: None,
            emfile_unlogged: 0,
            shutdown: None,
            stop_signal: None,
            ready_sent: false,
            exe: std::env::current_exe().unwrap_or_else(|_| std::path::PathBuf::from("baton")),
            resumed: false,
            keyd: None,
            keyd_files,
            retired_keyds: Vec::new(),
            upgrade_asked: None,
            stats: Stats::default(),
            worker_listener,
            control,
            ctl: Slab::new(),
            ctl_refused: ctl_sessions::Refusals::default(),
            worker_refused: ctl_sessions::Refusals::default(),
            started: Instant::now(),
            own_uid: nix::unistd::geteuid().as_raw(),
            reload: None,
            metrics_listener,
            scrapers: Slab::new(),
            health,
        })
    }

    /// Keeps the loader that built the configuration, so that SIGHUP and
    /// `ctl reload` can re-read its `--config` file (flags keep overriding
    /// it).
    pub fn with_reload(mut self, loader: crate::options::Loader) -> Acceptor {
        self.reload = Some(loader);
        self
    }

    /// Spawns the pool and runs until shutdown.
    pub fn run(mut self) -> Result<Outcome, Error> {
        // Listeners, the pools' memory files, worker channels and held
        // connections are counted on their own (the last two are there
        // already after an upgrade).
        let channels: usize = self.pools.iter().map(|(_, p)| p.pool.workers.len()).sum();
        self.fd_fixed = count_open_fds()
            .saturating_sub(self.listeners.len() + self.pools.len() + channels + self.held());
        let workers: usize = self.pools.iter().map(|(_, p)| p.cfg.workers).sum();
        let needed = self.fd_fixed + self.listeners.len() + workers + FD_RESERVE + 16;
        if self.fd_limit < needed {
            return Err(Error::FdLimit {
                limit: self.fd_limit,
                needed,
            });
        }
        info!(
            fd_limit = self.fd_limit,
            budget = self.fd_budget().saturating_sub(workers),
            reserve = FD_RESERVE,
            "file descriptors"
        );
        if !self.resumed && !self.keyd_files.is_empty() {
            let files = std::mem::take(&mut self.keyd_files);
            self.start_keyd(files).map_err(Error::Tls)?;
        }
        let keys: Vec<usize> = if self.resumed {
            Vec::new()
        } else {
            self.pools.iter().map(|(k, _)| k).collect()
        };
        for p in keys {
            for _ in 0..self.pools[p].cfg.workers {
                // A worker that cannot even be spawned at start-up is a
                // configuration error, not something to retry.
                self.add_slot(p).map_err(|source| Error::Spawn {
                    program: self.pools[p].cfg.command.program.display().to_string(),
                    source,
                })?;
            }
        }
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.next_deadline().map(|d| {
                d.saturating_duration_since(Instant::now())
                    // Round up so that a deadline is never polled for early.
                    + Duration::from_millis(1)
            });
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Poll(e)),
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => {
                        if let Some(outcome) = self.on_signals() {
                            return Ok(outcome);
                        }
                    }
                    CONTROL => self.on_control_accept(),
                    WORKER_SOCKET => self.on_worker_socket_accept(),
                    METRICS => self.on_scrape_accept(Endpoint::Metrics),
                    HEALTH => self.on_scrape_accept(Endpoint::Health),
                    Token(t) if (SCRAPE_BASE..CTL_BASE).contains(&t) => {
                        self.on_scrape_event(t - SCRAPE_BASE);
                    }
                    Token(t) if (CTL_BASE..PARKED_BASE).contains(&t) => {
                        self.on_ctl_event(t - CTL_BASE, ev.is_readable(), ev.is_writable());
                    }
                    Token(t) if t >= WORKER_BASE => {
                        let wk = Wk::from_token(t);
                        if ev.is_writable() {
                            self.set_blocked(wk, false);
                            self.flush(wk);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_worker_readable(wk);
                        }
                    }
                    Token(t) if t >= PARKED_BASE => {
                        self.on_parked_event(t - PARKED_BASE, ev.is_read_closed() || ev.is_error());
                    }
                    // Listener readiness: accepting happens in pump().
                    Token(_) => {}
                }
            }
            self.on_timers(Instant::now());
            self.step_rolling();
            self.autoscale(Instant::now());
            self.pump();
            self.drop_removed_pools();
            self.drop_retired_keyds();
            self.check_ready();
            if let Some((binary, client)) = self.upgrade_asked.take() {
                self.do_upgrade(binary, client);
            }
            if let Some(outcome) = self.check_finished()? {
                return Ok(outcome);
            }
        }
    }

    /// A new slot in pool `p`, with its worker spawned; returns its key.
    fn add_slot(&mut self, p: usize) -> io::Result<usize> {
        let key = self.pools[p].slots.insert(Slot::new(Instant::now()));
        if let Err(e) = self.spawn_slot(p, key) {
            self.pools[p].slots.remove(key);
            return Err(e);
        }
        Ok(key)
    }

    fn spawn_slot(&mut self, p: usize, key: usize) -> io::Result<()> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let key_channel = self.tls_channel(p)?;
        let ps = &self.pools[p];
        let mut extra = Vec::new();
        if let Some(fd) = &ps.shared {
            extra.push(supervisor::Inherit {
                env: baton_sdk::shared::SHARED_FD_ENV,
                fd: fd.as_fd(),
                keep: false,
            });
        }
        if let (Some(key), Some(bundle)) = (&key_channel, self.tls_bundle(p)) {
            extra.push(supervisor::Inherit {
                env: baton_tls::bundle::KEY_FD_ENV,
                fd: key.as_fd(),
                keep: true,
            });
            extra.push(supervisor::Inherit {
                env: baton_tls::bundle::BUNDLE_FD_ENV,
                fd: bundle,
                keep: true,
            });
        }
        let sp = supervisor::spawn(&ps.cfg.command, id, ps.cfg.sandbox.profile.as_ref(), &extra)?;
        drop(key_channel);
        let wk = self.add_to_pool(p, id, sp.chan, Some(key), sp.pid)?;
        let ps = &mut self.pools[p];
        let slot = &mut ps.slots[key];
        slot.spawned(sp.pid, id, wk.key, Instant::now());
        info!(worker = id, pid = sp.pid, pool = %ps.cfg.name, "worker started");
        Ok(())
    }

    /// Watches a worker's channel and adds it to pool `p` (state Starting:
    /// no connection before its HELLO).
    fn add_to_pool(
        &mut self,
        p: usize,
        id: u32,
        chan: baton_sdk::Channel,
        slot: Option<usize>,
        pid: i32,
    ) -> io::Result<Wk> {
        let workers = &mut self.pools[p].pool.workers;
        let wk = Wk {
            pool: p,
            key: workers.vacant_key(),
        };
        self.poll.registry().register(
            &mut SourceFd(&chan.as_raw_fd()),
            wk.token(),
            Interest::READABLE,
        )?;
        workers.insert(crate::pool::Worker::new(id, chan, slot, Some(pid)));
        Ok(wk)
    }

    /// The pool that SIGTTIN/SIGTTOU act on and registering workers join:
    /// the first one configured (that a reload did not remove).
    pub(super) fn first_pool(&self) -> Option<usize> {
        self.pools.iter().find(|(_, p)| !p.removing).map(|(k, _)| k)
    }

    /// The pool named `name`, or the only one when `name` is None.
    pub(super) fn pool_named(&self, name: Option<&str>) -> Result<usize, OpError> {
        let live = || self.pools.iter().filter(|(_, p)| !p.removing);
        let names = || live().map(|(_, p)| p.cfg.name.clone()).collect();
        match name {
            Some(n) => live()
                .find(|(_, p)| p.cfg.name == n)
                .map(|(k, _)| k)
                .ok_or_else(|| OpError::NoSuchPool {
                    name: n.to_string(),
                    pools: names(),
                }),
            None => {
                let mut it = live();
                match (it.next(), it.next()) {
                    (Some((k, _)), None) => Ok(k),
                    (None, _) => Err(OpError::NoPool),
                    (Some(_), Some(_)) => Err(OpError::SeveralPools { pools: names() }),
                }
            }
        }
    }

    /// The worker `wk`, if it is still connected.
    pub(super) fn worker(&mut self, wk: Wk) -> Option<&mut crate::pool::Worker> {
        self.pools.get_mut(wk.pool)?.pool.workers.get_mut(wk.key)
    }

    /// Every connected worker, by [`Wk`].
    pub(super) fn all_workers(&self) -> Vec<Wk> {
        self.pools
            .iter()
            .flat_map(|(p, ps)| {
                ps.pool
                    .workers
                    .iter()
                    .map(move |(key, _)| Wk { pool: p, key })
            })
            .collect()
    }

    /// Tells the service manager (`READY=1`) once, when every pool's first
    /// workers said HELLO (or were given up on: systemd then sees a
    /// running baton whose log says why a pool is short).
    fn check_ready(&mut self) {
        if self.ready_sent || self.shutdown.is_some() {
            return;
        }
        let ready = self.pools.iter().all(|(_, ps)| {
            ps.slots.iter().all(|(_, s)| {
                s.is_given_up()
                    || s.worker()
                        .and_then(|k| ps.pool.workers.get(k))
                        .is_some_and(|w| w.state() != State::Starting)
            })
        });
        if ready {
            self.ready_sent = true;
            let workers: usize = self.pools.iter().map(|(_, ps)| ps.pool.workers.len()).sum();
            crate::systemd::ready(&format!(
                "serving: {} pool(s), {workers} worker(s)",
                self.pools.len()
            ));
        }
    }

    /// Runs an upgrade asked for; on failure, answers the control client
    /// (if one asked) with why, and goes on.
    fn do_upgrade(&mut self, binary: Option<std::path::PathBuf>, client: Option<usize>) {
        // Let the ACKs and DONEs of this round out first: nothing queued
        // for a worker is lost either way (it is in the state), but sent
        // is simpler.
        self.flush_all();
        let reply_to = client.and_then(|k| self.ctl.get(k)).map(|c| c.raw_fd());
        match self.upgrade(binary, reply_to) {
            Ok(never) => match never {},
            Err(e) => {
                error!(error = %e, "upgrade failed; the running binary keeps serving");
                if let Some(k) = client {
                    self.ctl_reply(
                        k,
                        crate::control::Reply::err(format!("upgrade failed, nothing changed: {e}")),
                    );
                }
            }
        }
    }

    /// Forgets pools a reload removed once their last worker has gone.
    fn drop_removed_pools(&mut self) {
        let done: Vec<usize> = self
            .pools
            .iter()
            .filter(|(_, p)| p.removing && p.pool.workers.is_empty() && p.procs() == 0)
            .map(|(k, _)| k)
            .collect();
        for k in done {
            let ps = self.pools.remove(k);
            if !ps.pending.is_empty() {
                warn!(pool = %ps.cfg.name, connections = ps.pending.len(), "closing connections of a removed pool that no worker took");
            }
            info!(pool = %ps.cfg.name, "pool removed: its last worker has gone");
        }
    }

    // ---- signals and child exits -------------------------------------

    fn on_signals(&mut self) -> Option<Outcome> {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => {
                    let sig = Signal::try_from(info.ssi_signo as i32).ok();
                    match sig {
                        Some(Signal::SIGCHLD) => self.on_child_exits(),
                        Some(Signal::SIGTTIN) if self.shutdown.is_none() => {
                            info!("SIGTTIN: adding a worker to the first pool");
                            let r = match self.first_pool() {
                                Some(p) => self.add_workers(p, 1).map(|_| ()),
                                None => Err(OpError::NoPool),
                            };
                            if let Err(e) = r {
                                error!(error = %e, "SIGTTIN: cannot add a worker");
                            }
                        }
                        Some(Signal::SIGHUP) if self.shutdown.is_none() => {
                            info!("SIGHUP: reloading the configuration");
                            match self.reload() {
                                Ok(changes) => info!(changes = ?changes, "configuration reloaded"),
                                Err(e) => {
                                    error!(error = %e, "reload failed; the running configuration is unchanged")
                                }
                            }
                        }
                        Some(Signal::SIGUSR2) if self.shutdown.is_none() => {
                            info!("SIGUSR2: upgrading to the binary baton was started from");
                            self.upgrade_asked = Some((None, None));
                        }
                        Some(Signal::SIGTTOU) if self.shutdown.is_none() => {
                            info!("SIGTTOU: removing a worker from the first pool");
                            let r = match self.first_pool() {
                                Some(p) => self.remove_workers(Some(p), None, Some(1), None),
                                None => Err(OpError::NoPool),
                            };
                            if let Err(e) = r {
                                warn!(error = %e, "SIGTTOU: cannot remove a worker");
                            }
                        }
                        Some(s @ (Signal::SIGTERM | Signal::SIGINT)) => {
                            let now = Instant::now();
                            if let Some((at, first, from)) = self.stop_signal {
                                // One signal sent both to the process and to
                                // its group (GNU timeout does) arrives twice:
                                // that is not a second request.
                                if first == s
                                    && from == info.ssi_pid
                                    && now.duration_since(at) < DUPLICATE_SIGNAL
                                {
                                    info!(signal = s.as_str(), pid = from, "the same stop signal again from the same sender (to the process and its group): not a second request");
                                    continue;
                                }
                                warn!(signal = s.as_str(), "second signal: stopping at once");
                                self.kill_all_and_reap();
                                return Some(Outcome::Forced);
                            }
                            self.stop_signal = Some((now, s, info.ssi_pid));
                            self.begin_shutdown(s.as_str());
                        }
                        _ => {}
                    }
                }
                Ok(None) => return None,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!(error = %e, "reading signalfd failed");
                    return None;
                }
            }
        }
    }

    fn on_child_exits(&mut self) {
        let now = Instant::now();
        for exit in supervisor::reap() {
            let found = self.pools.iter().find_map(|(p, ps)| {
                ps.slots
                    .iter()
                    .find(|(_, s)| s.pid() == Some(exit.pid))
                    .map(|(k, _)| (p, k))
            });
            let Some((p, key)) = found else {
                if !self.keyd_exited(exit.pid, &exit.describe(), now) {
                    debug!(pid = exit.pid, status = %exit.describe(), "reaped unknown child");
                }
                continue;
            };
            let slot = &mut self.pools[p].slots[key];
            let worker_id = slot.worker_id();
            let uptime = now.duration_since(slot.started());
            // The pid is no longer ours from here: nothing may signal it.
            slot.reaped();
            if let Some(wkey) = slot.worker() {
                // close_worker reads what the worker queued before it died
                // (its last ACKs and DONEs are facts) before anything of it
                // is given to another worker.
                self.close_worker(Wk { pool: p, key: wkey }, Gone::ProcessExited);
            }
            let ps = &mut self.pools[p];
            let pool = ps.cfg.name.clone();
            if self.shutdown.is_some() || ps.slots[key].is_retired() {
                info!(worker = worker_id, pid = exit.pid, pool = %pool, status = %exit.describe(), "worker exited");
                if self.shutdown.is_none() {
                    ps.slots.remove(key);
                }
                continue;
            }
            if exit.success() {
                warn!(worker = worker_id, pid = exit.pid, pool = %pool, status = %exit.describe(), uptime_ms = uptime.as_millis() as u64, "worker exited");
            } else {
                error!(worker = worker_id, pid = exit.pid, pool = %pool, status = %exit.describe(), uptime_ms = uptime.as_millis() as u64, "worker exited");
            }
            let (window, max) = (ps.cfg.restart_window, ps.cfg.max_restarts);
            let slot = &mut ps.slots[key];
            if exit.sandbox_failure() {
                slot.give_up();
                error!(
                    worker = worker_id,
                    pid = exit.pid,
                    pool = %pool,
                    "worker could not apply its sandbox (its error is above); not restarting it: fix the sandbox options"
                );
                continue;
            }
            if slot.is_given_up() {
                // Given up while it ran (its sandbox did not check out):
                // the reason was logged then.
                info!(worker = worker_id, pool = %pool, "not restarting a worker that was given up");
                continue;
            }
            match slot.exited(now, window, max) {
                After::Restart(delay) => {
                    info!(
                        worker = worker_id,
                        delay_ms = delay.as_millis() as u64,
                        failures = slot.failures(),
                        "worker restarting"
                    );
                }
                After::GiveUp => {
                    error!(
                        worker = worker_id,
                        pool = %pool,
                        failures = slot.failures(),
                        window_s = window.as_secs_f64(),
                        "worker is crash-looping: it exited {} times in a row within {:?} of starting; not restarting it",
                        slot.failures(),
                        window
                    );
                }
            }
        }
    }

    /// Closes pool `p`'s listeners: its new clients are refused.
    pub(super) fn close_listeners(&mut self, p: Option<usize>) {
        let keys: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| p.is_none_or(|p| l.pool == p))
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            let mut l = self.listeners.remove(k);
            if l.registered {
                let _ = self.poll.registry().deregister(&mut l.sock);
            }
            // Dropping the socket closes it.
        }
    }

    /// Stops accepting and drains every worker; `why` is the signal's name
    /// (or `drain-host`). Once only.
    fn begin_shutdown(&mut self, why: &str) {
        if self.shutdown.is_some() {
            return;
        }
        crate::systemd::stopping();
        self.shutdown = Some(Instant::now() + self.cfg.shutdown_timeout);
        self.close_all_parked(None);
        self.close_listeners(None);
        let mut workers = 0;
        for (_, ps) in self.pools.iter_mut() {
            for (_, s) in ps.slots.iter_mut() {
                s.cancel_restart();
            }
            ps.rolling.clear();
            ps.rolling_current = None;
            workers += ps.pool.workers.len();
        }
        if let Some(l) = self.worker_listener.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&l.fd.as_raw_fd()));
            // Dropped: the socket file is removed.
        }
        info!(
            signal = why,
            timeout_ms = self.cfg.shutdown_timeout.as_millis() as u64,
            workers,
            "shutting down: no new connections; workers finish what they have"
        );
    }

    /// Sends DRAIN to every worker of pool `p` (once its pending queue is
    /// empty, so that no accepted connection is stranded).
    pub(super) fn send_drain(&mut self, p: usize) {
        let Some(ps) = self.pools.get_mut(p) else {
            return;
        };
        ps.drain_sent = true;
        let keys: Vec<usize> = ps.pool.workers.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drain_worker(Wk { pool: p, key });
        }
    }

    pub(super) fn drain_worker(&mut self, wk: Wk) {
        let Some(w) = self.worker(wk) else {
            return;
        };
        match w.state() {
            State::Draining => return,
            // It has no connection and has not said HELLO: DRAIN would be
            // out of order, so it is simply stopped.
            State::Starting => {
                self.close_worker(wk, Gone::StoppedBeforeHello);
                return;
            }
            State::Ready => {}
        }
        w.set_draining();
        let id = w.id();
        if let Err(e) = w.chan().send(&Msg::Drain, None) {
            // A worker that cannot take DRAIN is gone or stuck: stop it.
            self.close_worker(
                wk,
                Gone::SendFailed(format!("DRAIN could not be sent: {e}")),
            );
        } else {
            debug!(worker = id, "drain sent");
        }
    }

    fn kill_all_and_reap(&mut self) {
        let pids: Vec<i32> = self
            .pools
            .iter()
            .flat_map(|(_, ps)| ps.slots.iter().filter_map(|(_, s)| s.pid()))
            .collect();
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for pid in pids {
            // Blocking is fine here: the loop is over, and SIGKILL cannot be
            // ignored.
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        }
        for (_, ps) in self.pools.iter_mut() {
            for (_, s) in ps.slots.iter_mut() {
                s.reaped();
            }
        }
    }

    /// Ends the loop when shutdown is complete, or when every pool is
    /// empty for good.
    fn check_finished(&mut self) -> Result<Option<Outcome>, Error> {
        let procs: usize = self.pools.iter().map(|(_, ps)| ps.procs()).sum();
        let connected: usize = self.pools.iter().map(|(_, ps)| ps.pool.workers.len()).sum();
        if let Some(deadline) = self.shutdown {
            if connected == 0 && procs == 0 {
                let stranded: usize = self.pools.iter().map(|(_, ps)| ps.pending.len()).sum();
                if stranded > 0 {
                    warn!(
                        connections = stranded,
                        "closing connections no worker could take before shutdown"
                    );
                }
                self.log_stopped();
                return Ok(Some(Outcome::Graceful));
            }
            if Instant::now() >= deadline {
                let cut: usize = self
                    .pools
                    .iter()
                    .flat_map(|(_, ps)| ps.pool.workers.iter())
                    .map(|(_, w)| w.in_flight())
                    .sum();
                self.stats.cut_at_shutdown += cut as u64;
                warn!(
                    workers = procs,
                    connections = cut,
                    "shutdown timeout reached: killing the workers that are still running, cutting the connections they hold"
                );
                self.kill_all_and_reap();
                for wk in self.all_workers() {
                    self.close_worker(wk, Gone::ShutdownTimeout);
                }
                self.log_stopped();
                return Ok(Some(Outcome::Graceful));
            }
            return Ok(None);
        }
        // Every worker of every pool crash-looped and none can join:
        // nothing will ever serve. (A pool emptied on purpose, by `ctl
        // remove`, keeps running.)
        let all_given_up = self.pools.iter().all(|(_, ps)| {
            !ps.slots.is_empty()
                && ps
                    .slots
                    .iter()
                    .all(|(_, s)| s.is_given_up() && s.pid().is_none())
        });
        if connected == 0 && all_given_up && self.worker_listener.is_none() {
            return Err(Error::NoWorkers);
        }
        Ok(None)
    }

    fn log_stopped(&self) {
        let s = self.stats;
        info!(
            accepted = s.accepted,
            handed_off = s.handed_off,
            redispatched = s.redispatched,
            lost = s.lost,
            capacity_pauses = s.capacity_pauses,
            emfile_pauses = s.emfile_pauses,
            fd_pauses = s.fd_pauses,
            cut_at_shutdown = s.cut_at_shutdown,
            sends = s.sends,
            parked = s.parked,
            unparked = s.unparked,
            "stopped"
        );
    }

    // ---- timers -----------------------------------------------------------

    fn next_deadline(&mut self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.emfile_until);
        consider(self.shutdown);
        consider(self.drain_host_deadline());
        consider(self.parked_order.first().map(|(t, _)| *t));
        consider(self.tls_deadline());
        for (_, c) in self.ctl.iter() {
            consider(Some(c.deadline));
        }
        for (_, c) in self.scrapers.iter() {
            consider(Some(c.deadline));
        }
        for (_, ps) in self.pools.iter_mut() {
            for (_, s) in ps.slots.iter() {
                consider(s.restart_at());
            }
            let (hello, ack) = (ps.cfg.hello_timeout, ps.cfg.ack_timeout);
            let stall = ps.cfg.stall_timeout;
            for (_, w) in ps.pool.workers.iter_mut() {
                if w.state() == State::Starting {
                    consider(Some(w.connected() + hello));
                }
                consider(w.oldest_unacked().map(|t| t + ack));
                consider(w.drain_deadline());
                if !w.stalled() {
                    consider(w.full_since().map(|t| t + stall));
                }
            }
            if ps.spawned_live() > ps.cfg.min_workers {
                let idle = ps.cfg.scale_idle_timeout;
                for (_, w) in ps.pool.workers.iter() {
                    if w.slot().is_some() && w.state() == State::Ready {
                        consider(w.idle_since().map(|t| t + idle));
                    }
                }
            }
        }
        next
    }

    fn on_timers(&mut self, now: Instant) {
        if self.emfile_until.is_some_and(|t| t <= now) {
            self.emfile_until = None;
        }
        self.expire_parked(now);
        self.tls_timers(now);
        self.on_drain_host_timer(now);
        let mut overdue = Vec::new();
        for (p, ps) in self.pools.iter_mut() {
            let (hello, ack) = (ps.cfg.hello_timeout, ps.cfg.ack_timeout);
            let stall = ps.cfg.stall_timeout;
            for (key, w) in ps.pool.workers.iter_mut() {
                if !w.stalled() && w.full_since().is_some_and(|t| t + stall <= now) {
                    w.set_stalled(true);
                    warn!(
                        worker = w.id(),
                        pid = w.pid(),
                        pool = %ps.cfg.name,
                        in_flight = w.in_flight(),
                        stall_ms = stall.as_millis() as u64,
                        "worker stalled: it is full and reported no connection done for the stall timeout; it gets no new connection until it finishes one (the others serve)"
                    );
                }
                let wk = Wk { pool: p, key };
                if w.state() == State::Starting && w.connected() + hello <= now {
                    overdue.push((wk, format!("no HELLO within {hello:?}")));
                } else if w.oldest_unacked().is_some_and(|t| t + ack <= now) {
                    overdue.push((
                        wk,
                        format!("did not acknowledge a connection within {ack:?}"),
                    ));
                } else if w.drain_deadline().is_some_and(|t| t <= now) {
                    overdue.push((
                        wk,
                        format!("drain timeout: {} connections still open", w.in_flight()),
                    ));
                }
            }
        }
        let idle: Vec<usize> = self
            .ctl
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close_ctl(key, "idle timeout");
        }
        let slow: Vec<usize> = self
            .scrapers
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in slow {
            self.close_scraper(key);
        }
        for (wk, why) in overdue {
            self.close_worker(wk, Gone::Unresponsive(why));
        }
        if self.shutdown.is_none() {
            let due: Vec<(usize, usize)> = self
                .pools
                .iter()
                .flat_map(|(p, ps)| {
                    ps.slots
                        .iter()
                        .filter(|(_, s)| s.restart_at().is_some_and(|t| t <= now))
                        .map(move |(k, _)| (p, k))
                })
                .collect();
            for (p, key) in due {
                self.pools[p].slots[key].note_restart();
                if let Err(e) = self.spawn_slot(p, key) {
                    if supervisor::is_resource_error(&e) {
                        // Not the worker's fault, and not a crash: try again.
                        warn!(error = %e, retry_ms = RESOURCE_RETRY.as_millis() as u64, "cannot spawn a worker for want of resources; retrying");
                        self.pools[p].slots[key].retry_at(now + RESOURCE_RETRY);
                        continue;
                    }
                    let ps = &mut self.pools[p];
                    error!(error = %e, program = %ps.cfg.command.program.display(), pool = %ps.cfg.name, "cannot spawn worker");
                    let (window, max) = (ps.cfg.restart_window, ps.cfg.max_restarts);
                    if ps.slots[key].exited(now, window, max) == After::GiveUp {
                        error!("giving up on a worker that cannot be spawned");
                    }
                }
            }
        }
    }
}
