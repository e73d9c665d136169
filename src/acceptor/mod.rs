//! The acceptor's event loop: a single thread, one mio `Poll`, never blocks.
//!
//! Event sources, by token:
//!
//! | token                  | source                         | on readiness                          |
//! |------------------------|--------------------------------|---------------------------------------|
//! | `SIGNALS`              | signalfd (TERM, INT, CHLD, HUP, TTIN, TTOU) | stop, reap and restart, reload, add or remove a worker |
//! | `CONTROL`              | control socket (stream)        | accept `baton ctl` clients (SO_PEERCRED checked) |
//! | `WORKER_SOCKET`        | worker socket (SEQPACKET)      | accept self-registering workers        |
//! | `LISTENER_BASE + i`    | listener `i`                   | accept until EAGAIN, hand off         |
//! | `METRICS`              | `--metrics-listen` (TCP)       | accept Prometheus scrapers (`scrape`) |
//! | `CTL_BASE + key`       | a control client               | JSON request lines → replies (`ops`) |
//! | `SCRAPE_BASE + key`    | a metrics scraper              | one GET → the metrics text, close     |
//! | `WORKER_BASE + key`    | a worker's SEQPACKET channel   | HELLO / ACK / DONE / PARK; EOF = worker gone (read to its end first) |
//! | `PARKED_BASE + key`    | a parked keep-alive connection | readable: back to `pending` for a worker; hang-up: closed |
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
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_sdk::proto::{ConnInfo, MAX_BATCH};
use baton_sdk::{Msg, RecvError};
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

mod ops;
mod scrape;
use ops::CtlClient;
use scrape::Scraper;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const WORKER_SOCKET: Token = Token(2);
const METRICS: Token = Token(3);
const LISTENER_BASE: usize = 16;
const SCRAPE_BASE: usize = 1 << 18;
const CTL_BASE: usize = 1 << 19;
const WORKER_BASE: usize = 1 << 20;
const PARKED_BASE: usize = 1 << 21;
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
#[derive(Debug, Default, Clone, Copy)]
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

/// Why a worker leaves the pool. It decides whether its process is killed
/// and how the departure is logged.
#[derive(Debug, Clone)]
enum Gone {
    /// Its channel reached EOF: it exited or closed it.
    ChannelClosed,
    /// Its process was reaped.
    ProcessExited,
    /// It broke the protocol.
    Protocol(String),
    /// The channel failed with an error other than EOF.
    ChannelError(String),
    /// A message to it could not be sent.
    SendFailed(String),
    /// No HELLO or ACK in time, or its drain timed out.
    Unresponsive(String),
    /// Stopped before its HELLO (shutdown or removal).
    StoppedBeforeHello,
    /// Its process does not match the sandbox profile.
    Sandbox(String),
    /// Its sandbox could not be checked for want of fds on our side.
    Unverifiable(String),
    /// The shutdown timeout passed (its process was killed already).
    ShutdownTimeout,
}

impl Gone {
    /// Whether a spawned worker's process is killed.
    fn kill(&self) -> bool {
        !matches!(
            self,
            Gone::ChannelClosed | Gone::ProcessExited | Gone::ShutdownTimeout
        )
    }

    /// Whether this is how a worker ends that was asked to.
    fn orderly(&self) -> bool {
        matches!(self, Gone::ChannelClosed | Gone::ProcessExited)
    }
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::ChannelClosed => f.write_str("channel closed"),
            Gone::ProcessExited => f.write_str("its process exited"),
            Gone::Protocol(why) => write!(f, "protocol violation: {why}"),
            Gone::ChannelError(e) => write!(f, "channel error: {e}"),
            Gone::SendFailed(why) => f.write_str(why),
            Gone::Unresponsive(why) => write!(f, "unresponsive: {why}"),
            Gone::StoppedBeforeHello => f.write_str("stopped before its HELLO"),
            Gone::Sandbox(why) => write!(f, "sandbox check failed: {why}"),
            Gone::Unverifiable(why) => write!(f, "sandbox check impossible: {why}"),
            Gone::ShutdownTimeout => f.write_str("shutdown timeout"),
        }
    }
}

/// An idle keep-alive connection the acceptor holds for its client's next
/// request.
struct ParkedConn {
    info: ConnInfo,
    fd: OwnedFd,
    deadline: Instant,
}

struct Listener {
    sock: mio::net::TcpListener,
    addr: SocketAddr,
    registered: bool,
}

/// Binds one of the acceptor's local sockets and watches it. With no extra
/// uid allowed the file is 0600; otherwise 0666, so that the other uids can
/// connect() at all and be checked with SO_PEERCRED.
/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns it.
fn raise_nofile() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                usize::try_from(hard).unwrap_or(usize::MAX)
            } else {
                usize::try_from(soft).unwrap_or(usize::MAX)
            }
        }
        Err(_) => 1024,
    }
}

/// How many fds this process has open (from /proc/self/fd; the directory's
/// own fd is not counted).
fn count_open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count().saturating_sub(1))
}

/// Whether `fd`, handed back by a worker as connection `info`, is that TCP
/// connection: a stream socket whose local and peer addresses are the
/// connection's. `Ok(false)`: it is, but its client is gone (no peer any
/// more). `Err`: it is something else, which no other worker may be given.
fn parked_fd_is(fd: &OwnedFd, info: &ConnInfo) -> Result<bool, String> {
    let s = socket2::SockRef::from(fd);
    match s.r#type() {
        Ok(t) if t == socket2::Type::STREAM => {}
        Ok(_) => return Err("a socket that is not a stream".to_string()),
        Err(e) => return Err(format!("an fd that is not a socket ({e})")),
    }
    let local = s.local_addr().ok().and_then(|a| a.as_socket());
    if local != Some(info.local) {
        return Err(format!(
            "a socket whose local address is {local:?}, not {}",
            info.local
        ));
    }
    match s.peer_addr() {
        Ok(a) if a.as_socket() == Some(info.peer) => Ok(true),
        Ok(a) => Err(format!(
            "a socket connected to {:?}, not {}",
            a.as_socket(),
            info.peer
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(format!("a socket without a peer ({e})")),
    }
}

/// Reads what a worker queued on its channel, to the end, after the channel
/// was shut down: its ACKs and DONEs are applied, anything else is ignored
/// (the worker is leaving either way).
fn read_to_end(w: &mut crate::pool::Worker) {
    // A shut-down channel cannot grow; the bound is only a guard.
    for _ in 0..100_000 {
        match w.chan.try_recv() {
            Ok(Some(r)) => match r.msg {
                Msg::Ack(ids) => {
                    for id in ids {
                        w.ack(id);
                    }
                }
                Msg::Done(ids) => {
                    for id in ids {
                        w.done(id);
                    }
                }
                _ => {}
            },
            Ok(None) => return,
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(RecvError::Proto(_) | RecvError::FdDropped { .. }) => continue,
            Err(_) => return,
        }
    }
}

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
    cfg: Config,
    poll: Poll,
    listeners: Vec<Listener>,
    signals: SignalFd,
    pool: Pool,
    slots: Slab<Slot>,
    /// Accepted connections waiting for a worker, oldest first.
    pending: VecDeque<Held>,
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
    drain_sent: bool,
    paused_for_capacity: bool,
    stats: Stats,
    /// Self-registering workers connect here.
    worker_listener: Option<UnixListener>,
    /// `baton ctl` connects here.
    control: Option<UnixListener>,
    ctl: Slab<CtlClient>,
    /// Refused peers of the control and worker sockets, for summary lines.
    ctl_refused: ops::Refusals,
    worker_refused: ops::Refusals,
    /// Rolling restart: slots still to replace, and the (old, new) pair
    /// under way (the old one drains once the new one is ready).
    rolling: VecDeque<usize>,
    rolling_current: Option<(usize, usize)>,
    started: Instant,
    own_uid: u32,
    /// `--metrics-listen` and its clients.
    metrics_listener: Option<mio::net::TcpListener>,
    scrapers: Slab<Scraper>,
    /// Builds the configuration again on reload: re-reads `--config` and
    /// lays the command line over it.
    reload: Option<crate::options::Loader>,
}

impl Acceptor {
    /// Binds every listener and prepares the loop. Nothing is spawned yet.
    pub fn new(cfg: Config) -> Result<Acceptor, Error> {
        let poll = Poll::new().map_err(Error::Poll)?;
        let mut listeners = Vec::new();
        for (i, l) in cfg.listen.iter().enumerate() {
            let sock = listener::bind(l.0, cfg.backlog)
                .map_err(|source| Error::Bind { addr: l.0, source })?;
            let addr = sock
                .local_addr()
                .map_err(|source| Error::Bind { addr: l.0, source })?;
            info!(addr = %addr, listener = i, "listening");
            listeners.push(Listener {
                sock,
                addr,
                registered: false,
            });
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
        // Block the signals we handle so that they queue on the signalfd.
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGCHLD,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGHUP,
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
        let pool = Pool::new(cfg.balance);
        let fd_limit = raise_nofile();
        Ok(Acceptor {
            cfg,
            poll,
            listeners,
            signals,
            pool,
            slots: Slab::new(),
            pending: VecDeque::new(),
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
            drain_sent: false,
            paused_for_capacity: false,
            stats: Stats::default(),
            worker_listener,
            control,
            ctl: Slab::new(),
            ctl_refused: ops::Refusals::default(),
            worker_refused: ops::Refusals::default(),
            rolling: VecDeque::new(),
            rolling_current: None,
            started: Instant::now(),
            own_uid: nix::unistd::geteuid().as_raw(),
            reload: None,
            metrics_listener,
            scrapers: Slab::new(),
        })
    }

    /// Keeps the loader that built the configuration, so that SIGHUP and
    /// `ctl reload` can re-read its `--config` file (flags keep overriding
    /// it).
    pub fn with_reload(mut self, loader: crate::options::Loader) -> Acceptor {
        self.reload = Some(loader);
        self
    }

    /// The bound addresses, in `--listen` order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// Spawns the pool and runs until shutdown.
    pub fn run(mut self) -> Result<Outcome, Error> {
        self.fd_fixed = count_open_fds().saturating_sub(self.listeners.len());
        let needed = self.fd_fixed + self.listeners.len() + self.cfg.workers + FD_RESERVE + 16;
        if self.fd_limit < needed {
            return Err(Error::FdLimit {
                limit: self.fd_limit,
                needed,
            });
        }
        info!(
            fd_limit = self.fd_limit,
            budget = self.fd_budget().saturating_sub(self.cfg.workers),
            reserve = FD_RESERVE,
            "file descriptors"
        );
        for _ in 0..self.cfg.workers {
            // A worker that cannot even be spawned at start-up is a
            // configuration error, not something to retry.
            self.add_slot().map_err(|source| Error::Spawn {
                program: self.cfg.command.program.display().to_string(),
                source,
            })?;
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
                    METRICS => self.on_scrape_accept(),
                    Token(t) if (SCRAPE_BASE..CTL_BASE).contains(&t) => {
                        self.on_scrape_event(t - SCRAPE_BASE);
                    }
                    Token(t) if (CTL_BASE..WORKER_BASE).contains(&t) => {
                        self.on_ctl_event(t - CTL_BASE, ev.is_readable(), ev.is_writable());
                    }
                    Token(t) if t >= PARKED_BASE => {
                        self.on_parked_event(t - PARKED_BASE, ev.is_read_closed() || ev.is_error());
                    }
                    Token(t) if t >= WORKER_BASE => {
                        let key = t - WORKER_BASE;
                        if ev.is_writable() {
                            self.set_blocked(key, false);
                            self.flush(key);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_worker_readable(key);
                        }
                    }
                    // Listener readiness: accepting happens in pump().
                    Token(_) => {}
                }
            }
            self.on_timers(Instant::now());
            self.step_rolling();
            self.autoscale(Instant::now());
            self.pump();
            if let Some(outcome) = self.check_finished()? {
                return Ok(outcome);
            }
        }
    }

    /// A new slot in the pool, with its worker spawned; returns its key.
    fn add_slot(&mut self) -> io::Result<usize> {
        let key = self.slots.insert(Slot::new(Instant::now()));
        if let Err(e) = self.spawn_slot(key) {
            self.slots.remove(key);
            return Err(e);
        }
        Ok(key)
    }

    fn spawn_slot(&mut self, key: usize) -> io::Result<()> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let sp = supervisor::spawn(&self.cfg.command, id, self.cfg.sandbox.profile.as_ref())?;
        let wkey = self.add_to_pool(id, sp.chan, Some(key), sp.pid)?;
        let slot = &mut self.slots[key];
        slot.pid = Some(sp.pid);
        slot.worker_id = id;
        slot.worker = Some(wkey);
        slot.started = Instant::now();
        slot.restart_at = None;
        slot.proven = false;
        slot.spared = false;
        info!(worker = id, pid = sp.pid, "worker started");
        Ok(())
    }

    /// Watches a worker's channel and adds it to the pool (state Starting:
    /// no connection before its HELLO); returns its pool key.
    fn add_to_pool(
        &mut self,
        id: u32,
        chan: baton_sdk::Channel,
        slot: Option<usize>,
        pid: i32,
    ) -> io::Result<usize> {
        let key = self.pool.workers.vacant_key();
        self.poll.registry().register(
            &mut SourceFd(&chan.as_raw_fd()),
            Token(WORKER_BASE + key),
            Interest::READABLE,
        )?;
        Ok(self
            .pool
            .workers
            .insert(crate::pool::Worker::new(id, chan, slot, Some(pid))))
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
                            info!("SIGTTIN: adding a worker");
                            if let Err(e) = self.add_workers(1) {
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
                        Some(Signal::SIGTTOU) if self.shutdown.is_none() => {
                            info!("SIGTTOU: removing a worker");
                            if let Err(e) = self.remove_workers(None, Some(1), None) {
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
                            self.begin_shutdown(s);
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
            let Some(key) = self
                .slots
                .iter()
                .find(|(_, s)| s.pid == Some(exit.pid))
                .map(|(k, _)| k)
            else {
                debug!(pid = exit.pid, status = %exit.describe(), "reaped unknown child");
                continue;
            };
            let slot = &mut self.slots[key];
            slot.pid = None;
            let worker_id = slot.worker_id;
            let uptime = now.duration_since(slot.started);
            if let Some(wkey) = slot.worker {
                // close_worker reads what the worker queued before it died
                // (its last ACKs and DONEs are facts) before anything of it
                // is given to another worker.
                self.close_worker(wkey, Gone::ProcessExited);
            }
            if self.shutdown.is_some() || self.slots[key].retired {
                info!(worker = worker_id, pid = exit.pid, status = %exit.describe(), "worker exited");
                if self.shutdown.is_none() {
                    self.slots.remove(key);
                }
                continue;
            }
            if exit.success() {
                warn!(worker = worker_id, pid = exit.pid, status = %exit.describe(), uptime_ms = uptime.as_millis() as u64, "worker exited");
            } else {
                error!(worker = worker_id, pid = exit.pid, status = %exit.describe(), uptime_ms = uptime.as_millis() as u64, "worker exited");
            }
            let slot = &mut self.slots[key];
            if exit.sandbox_failure() {
                slot.given_up = true;
                slot.restart_at = None;
                error!(
                    worker = worker_id,
                    pid = exit.pid,
                    "worker could not apply its sandbox (its error is above); not restarting it: fix the sandbox options"
                );
                continue;
            }
            match slot.exited(now, self.cfg.restart_window, self.cfg.max_restarts) {
                After::Restart(delay) => {
                    info!(
                        worker = worker_id,
                        delay_ms = delay.as_millis() as u64,
                        failures = slot.failures,
                        "worker restarting"
                    );
                }
                After::GiveUp => {
                    error!(
                        worker = worker_id,
                        failures = slot.failures,
                        window_s = self.cfg.restart_window.as_secs_f64(),
                        "worker is crash-looping: it exited {} times in a row within {:?} of starting; not restarting it",
                        slot.failures,
                        self.cfg.restart_window
                    );
                }
            }
        }
    }

    fn begin_shutdown(&mut self, sig: Signal) {
        self.shutdown = Some(Instant::now() + self.cfg.shutdown_timeout);
        self.close_all_parked();
        for l in self.listeners.drain(..) {
            let mut sock = l.sock;
            if l.registered {
                let _ = self.poll.registry().deregister(&mut sock);
            }
            // Dropping the socket closes it: new clients are refused.
        }
        for (_, s) in self.slots.iter_mut() {
            s.restart_at = None;
        }
        if let Some(l) = self.worker_listener.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&l.fd.as_raw_fd()));
            // Dropped: the socket file is removed.
        }
        self.rolling.clear();
        self.rolling_current = None;
        info!(
            signal = sig.as_str(),
            timeout_ms = self.cfg.shutdown_timeout.as_millis() as u64,
            workers = self.pool.workers.len(),
            "shutting down: no new connections; workers finish what they have"
        );
    }

    /// Sends DRAIN to every worker (once the pending queue is empty, so
    /// that no accepted connection is stranded).
    fn send_drain(&mut self) {
        self.drain_sent = true;
        let keys: Vec<usize> = self.pool.workers.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drain_worker(key);
        }
    }

    fn drain_worker(&mut self, key: usize) {
        let Some(w) = self.pool.workers.get_mut(key) else {
            return;
        };
        match w.state {
            State::Draining => return,
            // It has no connection and has not said HELLO: DRAIN would be
            // out of order, so it is simply stopped.
            State::Starting => {
                self.close_worker(key, Gone::StoppedBeforeHello);
                return;
            }
            State::Ready => {}
        }
        w.state = State::Draining;
        let id = w.id;
        if let Err(e) = w.chan.send(&Msg::Drain, None) {
            // A worker that cannot take DRAIN is gone or stuck: stop it.
            self.close_worker(
                key,
                Gone::SendFailed(format!("DRAIN could not be sent: {e}")),
            );
        } else {
            debug!(worker = id, "drain sent");
        }
    }

    fn kill_all_and_reap(&mut self) {
        let pids: Vec<i32> = self.slots.iter().filter_map(|(_, s)| s.pid).collect();
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for pid in pids {
            // Blocking is fine here: the loop is over, and SIGKILL cannot be
            // ignored.
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        }
        for (_, s) in self.slots.iter_mut() {
            s.pid = None;
        }
    }

    /// Ends the loop when shutdown is complete, or when the pool is empty
    /// for good.
    fn check_finished(&mut self) -> Result<Option<Outcome>, Error> {
        let procs = self.slots.iter().filter(|(_, s)| s.pid.is_some()).count();
        if let Some(deadline) = self.shutdown {
            if self.pool.workers.is_empty() && procs == 0 {
                if !self.pending.is_empty() {
                    warn!(
                        connections = self.pending.len(),
                        "closing connections no worker could take before shutdown"
                    );
                }
                self.log_stopped();
                return Ok(Some(Outcome::Graceful));
            }
            if Instant::now() >= deadline {
                let cut: usize = self
                    .pool
                    .workers
                    .iter()
                    .map(|(_, w)| w.in_flight.len())
                    .sum();
                self.stats.cut_at_shutdown += cut as u64;
                warn!(
                    workers = procs,
                    connections = cut,
                    "shutdown timeout reached: killing the workers that are still running, cutting the connections they hold"
                );
                self.kill_all_and_reap();
                let keys: Vec<usize> = self.pool.workers.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.close_worker(key, Gone::ShutdownTimeout);
                }
                self.log_stopped();
                return Ok(Some(Outcome::Graceful));
            }
            return Ok(None);
        }
        // Every worker crash-looped and none can join: nothing will ever
        // serve. (A pool emptied on purpose, by `ctl remove`, keeps running.)
        let all_given_up = !self.slots.is_empty()
            && self
                .slots
                .iter()
                .all(|(_, s)| s.given_up && s.pid.is_none());
        if self.pool.workers.is_empty() && all_given_up && self.worker_listener.is_none() {
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

    // ---- workers --------------------------------------------------------

    fn on_worker_readable(&mut self, key: usize) {
        loop {
            let Some(w) = self.pool.workers.get_mut(key) else {
                return;
            };
            match w.chan.try_recv() {
                Ok(Some(r)) => {
                    if let Err(why) = self.on_worker_msg(key, r) {
                        self.close_worker(key, why);
                        return;
                    }
                }
                Ok(None) => {
                    self.close_worker(key, Gone::ChannelClosed);
                    return;
                }
                Err(e) if e.would_block() => return,
                // The worker exited with messages of ours unread. What it
                // queued before that is still readable, then EOF: read on.
                Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(RecvError::Proto(p)) => {
                    self.close_worker(key, Gone::Protocol(p.to_string()));
                    return;
                }
                Err(RecvError::FdDropped { msg, fds }) => {
                    // A PARK whose fds we could not all take (out of fds):
                    // the ones that arrived are parked, the others are gone
                    // (the worker closed its copies).
                    let Msg::Park(ps) = *msg else {
                        self.close_worker(
                            key,
                            Gone::Protocol(format!("{:?} with a file descriptor", msg.kind())),
                        );
                        return;
                    };
                    let got = fds.len();
                    let lost: Vec<u64> = ps[got..].iter().map(|p| p.info.id).collect();
                    let r = baton_sdk::Received {
                        msg: Msg::Park(ps[..got].to_vec()),
                        fds,
                        version: baton_sdk::proto::VERSION,
                    };
                    if got > 0 {
                        if let Err(why) = self.on_worker_msg(key, r) {
                            self.close_worker(key, why);
                            return;
                        }
                    }
                    if let Some(w) = self.pool.workers.get_mut(key) {
                        for id in lost {
                            if w.parked(id) {
                                self.stats.parked_closed += 1;
                            }
                        }
                    }
                }
                Err(RecvError::Io(e)) => {
                    self.close_worker(key, Gone::ChannelError(e.to_string()));
                    return;
                }
            }
        }
    }

    fn on_worker_msg(&mut self, key: usize, r: baton_sdk::Received) -> Result<(), Gone> {
        let max_cap = self.cfg.worker_connections;
        let drain_now = self.drain_sent;
        let w = &mut self.pool.workers[key];
        match (w.state, r.msg) {
            (State::Starting, Msg::Hello { .. }) if r.version > baton_sdk::proto::VERSION => {
                // decode() refuses versions it does not know; belt and braces.
                Err(Gone::Protocol(format!("HELLO of version {}", r.version)))
            }
            (State::Starting, Msg::Hello { pid, capacity }) => {
                // Checked from outside before its first connection: the
                // process (as spawned, or as SO_PEERCRED saw it) must be
                // confined as the pool's profile says.
                let check = w.slot.is_some() || self.cfg.worker_require_sandbox;
                if let (true, Some(profile), Some(real)) =
                    (check, self.cfg.sandbox.profile.as_ref(), w.pid)
                {
                    // Out of fds on our side is not the worker's fault: it is
                    // stopped and restarted, never given up for that.
                    if let Err(e) = std::fs::File::open(format!("/proc/{real}/status")) {
                        if supervisor::is_resource_error(&e) {
                            if let Some(slot) = w.slot.and_then(|k| self.slots.get_mut(k)) {
                                slot.spared = true;
                            }
                            return Err(Gone::Unverifiable(format!(
                                "cannot open /proc/{real}/status: {e}"
                            )));
                        }
                    }
                    if let Err(m) = baton_sdk::sandbox::verify(real, profile) {
                        // The same profile would fail the same way: no restart.
                        if let Some(slot) = w.slot.and_then(|k| self.slots.get_mut(k)) {
                            slot.given_up = true;
                        }
                        return Err(Gone::Sandbox(baton_sdk::sandbox::describe(&m)));
                    }
                }
                w.set_capacity(capacity, max_cap);
                w.idle_since = Some(Instant::now());
                if w.pid.is_some_and(|p| p != pid as i32) {
                    debug!(
                        worker = w.id,
                        spawned = w.pid,
                        announced = pid,
                        "worker announced another pid"
                    );
                }
                // The version both speak: what the worker's HELLO says, at
                // most ours. WELCOME goes out in it, and so does everything
                // after.
                w.chan.set_version(r.version.min(baton_sdk::proto::VERSION));
                w.chan
                    .send(&Msg::Welcome { worker_id: w.id }, None)
                    .map_err(|e| Gone::SendFailed(format!("WELCOME could not be sent: {e}")))?;
                w.state = State::Ready;
                info!(
                    worker = w.id,
                    pid = pid,
                    capacity = w.capacity,
                    protocol = w.chan.version(),
                    "worker ready"
                );
                if drain_now {
                    self.drain_worker(key);
                }
                Ok(())
            }
            (State::Starting, other) => {
                Err(Gone::Protocol(format!("{:?} before HELLO", other.kind())))
            }
            (_, Msg::Ack(ids)) => {
                for id in ids {
                    if !w.ack(id) {
                        return Err(Gone::Protocol(format!(
                            "ACK for connection {id}, which it does not hold unacknowledged"
                        )));
                    }
                }
                // Our copies of those fds are closed now: if accepting was
                // paused for want of fds, try again at once.
                if self.emfile_until.is_some() {
                    self.emfile_until = Some(Instant::now());
                }
                Ok(())
            }
            (_, Msg::Done(ids)) => {
                for id in ids {
                    if !w.done(id) {
                        return Err(Gone::Protocol(format!(
                            "DONE for connection {id}, which it does not hold"
                        )));
                    }
                }
                if w.stalled {
                    w.stalled = false;
                    info!(
                        worker = w.id,
                        in_flight = w.in_flight.len(),
                        "worker no longer stalled: it finished a connection"
                    );
                }
                Ok(())
            }
            (_, Msg::Park(ps)) => {
                let now = Instant::now();
                for (p, fd) in ps.into_iter().zip(r.fds) {
                    let w = &mut self.pool.workers[key];
                    if !w.parked(p.info.id) {
                        return Err(Gone::Protocol(format!(
                            "PARK of connection {}, which it does not own",
                            p.info.id
                        )));
                    }
                    // The fd goes to another worker later: it must be that
                    // TCP connection, not whatever the worker can open.
                    match parked_fd_is(&fd, &p.info) {
                        Ok(true) => self.park(p, fd, now),
                        // The client is gone already: nothing to hold.
                        Ok(false) => self.stats.parked_closed += 1,
                        Err(why) => {
                            return Err(Gone::Protocol(format!(
                                "PARK of connection {} with {why}",
                                p.info.id
                            )))
                        }
                    }
                }
                Ok(())
            }
            (_, Msg::Hello { .. }) => Err(Gone::Protocol("second HELLO".to_string())),
            (_, other) => Err(Gone::Protocol(format!(
                "{:?} is not a worker-to-acceptor message",
                other.kind()
            ))),
        }
    }

    /// Removes a worker from the pool. Every connection it had not
    /// acknowledged goes back to the front of the queue for another worker;
    /// a spawned worker's process is SIGKILLed when `why` says so.
    ///
    /// First the channel is shut down, so that the worker can send nothing
    /// more, and read to its end: every ACK and DONE it sent is counted
    /// before anything is given to another worker. A connection is then
    /// re-dispatched only if the worker never said it owned it, and it can
    /// no longer say so: nothing is served twice, and the counts (`lost`,
    /// `handled`) are exact.
    fn close_worker(&mut self, key: usize, why: Gone) {
        let Some(w) = self.pool.workers.get_mut(key) else {
            return;
        };
        let _ = w.chan.shutdown();
        read_to_end(w);
        let mut w = self.pool.workers.remove(key);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&w.chan.as_raw_fd()));
        let lost = w.in_flight.values().filter(|h| h.is_none()).count();
        let unacked = w.take_unacked();
        let n = unacked.len();
        for h in unacked.into_iter().rev() {
            self.pending.push_front(h);
        }
        self.stats.redispatched += n as u64;
        self.stats.lost += lost as u64;
        let quiet = n == 0 && lost == 0 && !why.kill();
        if (w.state == State::Draining && why.orderly() && quiet)
            || (quiet && self.shutdown.is_some())
        {
            info!(
                worker = w.id,
                pid = w.pid,
                reason = %why,
                handled = w.handled,
                "worker disconnected"
            );
        } else {
            // `lost`: connections the worker had acknowledged and not
            // finished; they were its to serve and went down with it.
            warn!(
                worker = w.id,
                pid = w.pid,
                reason = %why,
                handled = w.handled,
                redispatched = n,
                lost,
                "worker disconnected"
            );
        }
        if let Some(slot) = w.slot.and_then(|s| self.slots.get_mut(s)) {
            slot.worker = None;
            // Welcomed and given work: whatever happens to it now is no
            // crash loop.
            slot.proven |= w.state != State::Starting && w.sent_total > 0;
            if why.kill() {
                if let Some(pid) = slot.pid {
                    // The pid is still ours: it is only released when we reap
                    // it, which clears slot.pid first.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Connections the acceptor holds fds for: waiting for a worker, sent
    /// and not yet acknowledged, or parked.
    fn held(&self) -> usize {
        self.held_active() + self.parked.len()
    }

    /// Held connections that cannot be let go to make room: all but the
    /// parked ones.
    fn held_active(&self) -> usize {
        self.pending.len() + self.pool.unacked()
    }

    // ---- parked connections -------------------------------------------

    /// Holds a connection a worker handed back idle, watching it for the
    /// client's next request. With the fd budget full, the connection idle
    /// the longest makes room (as nginx reuses idle connections): a new
    /// client never waits because old ones sit idle.
    fn park(&mut self, p: baton_sdk::proto::Parked, fd: OwnedFd, now: Instant) {
        if self.shutdown.is_some() {
            self.stats.parked_closed += 1;
            return;
        }
        if self.held() >= self.fd_budget() && !self.evict_parked() {
            // Nothing to let go: this one cannot be held.
            self.stats.parked_evicted += 1;
            return;
        }
        let idle = match p.idle_ms {
            0 => PARKED_IDLE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let deadline = now + idle;
        let key = self.parked.vacant_key();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            Token(PARKED_BASE + key),
            Interest::READABLE,
        ) {
            warn!(error = %e, conn = p.info.id, "cannot watch a parked connection; closing it");
            return;
        }
        self.parked.insert(ParkedConn {
            info: p.info,
            fd,
            deadline,
        });
        self.parked_order.insert((deadline, key));
        self.stats.parked += 1;
    }

    /// Takes a parked connection out of the set (and out of epoll).
    fn unpark(&mut self, key: usize) -> Option<ParkedConn> {
        let p = self.parked.try_remove(key)?;
        self.parked_order.remove(&(p.deadline, key));
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&p.fd.as_raw_fd()));
        Some(p)
    }

    /// Closes the parked connection idle the longest; false if none.
    fn evict_parked(&mut self) -> bool {
        let Some(&(_, key)) = self.parked_order.first() else {
            return false;
        };
        self.unpark(key);
        self.stats.parked_evicted += 1;
        true
    }

    /// A parked connection became readable (the client's next request) or
    /// hung up.
    fn on_parked_event(&mut self, key: usize, closed: bool) {
        let Some(p) = self.unpark(key) else {
            return;
        };
        if closed {
            // Dropped: closed.
            self.stats.parked_closed += 1;
            return;
        }
        self.stats.unparked += 1;
        // Like a new connection, to the least loaded worker (pump).
        self.pending.push_back(Held {
            info: p.info,
            fd: p.fd,
            accepted: Instant::now(),
        });
    }

    /// Closes every parked connection whose idle time ran out.
    fn expire_parked(&mut self, now: Instant) {
        while let Some(&(deadline, key)) = self.parked_order.first() {
            if deadline > now {
                break;
            }
            self.unpark(key);
            self.stats.parked_expired += 1;
        }
    }

    fn close_all_parked(&mut self) {
        let keys: Vec<usize> = self.parked.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.unpark(key);
            self.stats.parked_closed += 1;
        }
    }

    /// How many connections the acceptor may hold: its fd limit less the
    /// fds it holds anyway and [`FD_RESERVE`].
    fn fd_budget(&self) -> usize {
        let fixed = self.fd_fixed
            + self.listeners.len()
            + self.pool.workers.len()
            + self.ctl.len()
            + self.scrapers.len()
            + usize::from(self.metrics_listener.is_some());
        self.fd_limit.saturating_sub(fixed + FD_RESERVE)
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
        consider(self.parked_order.first().map(|(t, _)| *t));
        for (_, c) in self.ctl.iter() {
            consider(Some(c.deadline));
        }
        for (_, c) in self.scrapers.iter() {
            consider(Some(c.deadline));
        }
        for (_, s) in self.slots.iter() {
            if s.pid.is_none() && !s.given_up {
                consider(s.restart_at);
            }
        }
        let (hello, ack) = (self.cfg.hello_timeout, self.cfg.ack_timeout);
        let stall = self.cfg.stall_timeout;
        for (_, w) in self.pool.workers.iter_mut() {
            if w.state == State::Starting {
                consider(Some(w.connected + hello));
            }
            consider(w.oldest_unacked().map(|t| t + ack));
            consider(w.drain_deadline);
            if !w.stalled {
                consider(w.full_since.map(|t| t + stall));
            }
        }
        if self.spawned_live() > self.cfg.min_workers {
            let idle = self.cfg.scale_idle_timeout;
            for (_, w) in self.pool.workers.iter() {
                if w.slot.is_some() && w.state == State::Ready {
                    consider(w.idle_since.map(|t| t + idle));
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
        let (hello, ack) = (self.cfg.hello_timeout, self.cfg.ack_timeout);
        let stall = self.cfg.stall_timeout;
        let mut overdue = Vec::new();
        for (key, w) in self.pool.workers.iter_mut() {
            if !w.stalled && w.full_since.is_some_and(|t| t + stall <= now) {
                w.stalled = true;
                warn!(
                    worker = w.id,
                    pid = w.pid,
                    in_flight = w.in_flight.len(),
                    stall_ms = stall.as_millis() as u64,
                    "worker stalled: it is full and reported no connection done for the stall timeout; it gets no new connection until it finishes one (the others serve)"
                );
            }
            if w.state == State::Starting && w.connected + hello <= now {
                overdue.push((key, format!("no HELLO within {hello:?}")));
            } else if w.oldest_unacked().is_some_and(|t| t + ack <= now) {
                overdue.push((
                    key,
                    format!("did not acknowledge a connection within {ack:?}"),
                ));
            } else if w.drain_deadline.is_some_and(|t| t <= now) {
                overdue.push((
                    key,
                    format!(
                        "drain timeout: {} connections still open",
                        w.in_flight.len()
                    ),
                ));
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
        for (key, why) in overdue {
            self.close_worker(key, Gone::Unresponsive(why));
        }
        if self.shutdown.is_none() {
            let due: Vec<usize> = self
                .slots
                .iter()
                .filter(|(_, s)| {
                    s.pid.is_none() && !s.given_up && s.restart_at.is_some_and(|t| t <= now)
                })
                .map(|(k, _)| k)
                .collect();
            for key in due {
                self.slots[key].restarts += 1;
                if let Err(e) = self.spawn_slot(key) {
                    if supervisor::is_resource_error(&e) {
                        // Not the worker's fault, and not a crash: try again.
                        warn!(error = %e, retry_ms = RESOURCE_RETRY.as_millis() as u64, "cannot spawn a worker for want of resources; retrying");
                        self.slots[key].restart_at = Some(now + RESOURCE_RETRY);
                        continue;
                    }
                    error!(error = %e, program = %self.cfg.command.program.display(), "cannot spawn worker");
                    let slot = &mut self.slots[key];
                    if slot.exited(now, self.cfg.restart_window, self.cfg.max_restarts)
                        == After::GiveUp
                    {
                        error!("giving up on a worker that cannot be spawned");
                    }
                }
            }
        }
    }

    // ---- moving connections -------------------------------------------

    /// Assigns `held` to a worker with room; gives it back if there is
    /// none. The CONN goes out with the worker's other new connections at
    /// the end of the round ([`Acceptor::flush`]), or at once when a full
    /// batch is waiting.
    fn dispatch(&mut self, held: Held, now: Instant) -> Result<(), Held> {
        let Some(key) = self.pool.pick(now) else {
            return Err(held);
        };
        let w = &mut self.pool.workers[key];
        let id = held.info.id;
        w.sent(held, now);
        w.outbox.push(id);
        self.stats.handed_off += 1;
        if w.outbox.len() >= MAX_BATCH {
            self.flush(key);
        }
        Ok(())
    }

    /// Sends a worker the connections assigned to it: version 2, up to
    /// [`MAX_BATCH`] in one CONNS message (one `sendmsg` for all their fds);
    /// version 1, one CONN each. A full channel keeps the rest for when it
    /// is writable (they stay unacknowledged, so they are counted, timed
    /// and given to another worker if this one leaves).
    fn flush(&mut self, key: usize) {
        loop {
            let Some(w) = self.pool.workers.get_mut(key) else {
                return;
            };
            if w.outbox.is_empty() {
                return;
            }
            let batch = if w.chan.version() >= 2 { MAX_BATCH } else { 1 };
            let n = w.outbox.len().min(batch);
            let mut infos = Vec::with_capacity(n);
            let mut fds = Vec::with_capacity(n);
            for id in &w.outbox[..n] {
                // Only an id the worker was sent can be acknowledged, so an
                // entry is missing only if a worker guessed ids; skip it.
                if let Some(Some(h)) = w.in_flight.get(id) {
                    infos.push(h.info);
                    fds.push(h.fd.as_fd());
                }
            }
            self.stats.sends += 1;
            let sent = match infos.len() {
                0 => Ok(()),
                1 if batch == 1 => w.chan.send_fds(&Msg::Conn(infos[0]), &fds),
                _ => w.chan.send_fds(&Msg::Conns(infos), &fds),
            };
            match sent {
                Ok(()) => {
                    w.outbox.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Its queue is full: no more for it until it is
                    // writable again.
                    self.set_blocked(key, true);
                    return;
                }
                Err(e) => {
                    self.close_worker(
                        key,
                        Gone::SendFailed(format!("CONN could not be sent: {e}")),
                    );
                    return;
                }
            }
        }
    }

    /// Sends every worker what was assigned to it in this round.
    fn flush_all(&mut self) {
        let keys: Vec<usize> = self
            .pool
            .workers
            .iter()
            .filter(|(_, w)| !w.outbox.is_empty() && !w.blocked)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.flush(key);
        }
    }

    /// Marks a worker whose channel send buffer is full (or no longer). Only
    /// a blocked channel is watched for writability: a writable event for
    /// every message a worker reads would be wasted wake-ups.
    fn set_blocked(&mut self, key: usize, blocked: bool) {
        let Some(w) = self.pool.workers.get_mut(key) else {
            return;
        };
        if w.blocked == blocked {
            return;
        }
        w.blocked = blocked;
        let interest = if blocked {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if let Err(e) = self.poll.registry().reregister(
            &mut SourceFd(&w.chan.as_raw_fd()),
            Token(WORKER_BASE + key),
            interest,
        ) {
            let id = w.id;
            error!(worker = id, error = %e, "epoll_ctl on a worker channel failed");
        }
    }

    /// Moves queued connections to workers, then accepts new ones while
    /// there is room; pauses and resumes the listeners accordingly.
    fn pump(&mut self) {
        let now = Instant::now();
        while let Some(h) = self.pending.pop_front() {
            if let Err(h) = self.dispatch(h, now) {
                self.pending.push_front(h);
                break;
            }
        }
        if self.shutdown.is_some() {
            self.flush_all();
            if self.pending.is_empty() && !self.drain_sent {
                self.send_drain();
            }
            return;
        }
        let mut accepting = self.emfile_until.is_none()
            && self.pending.is_empty()
            && self.pool.has_capacity()
            && self.held_active() < self.fd_budget();
        if accepting {
            self.set_listening(true);
            accepting = self.accept_all(now);
        }
        self.flush_all();
        let fd_full = self.held_active() >= self.fd_budget();
        if fd_full != self.paused_for_fds {
            self.paused_for_fds = fd_full;
            if fd_full {
                self.stats.fd_pauses += 1;
                if self
                    .fd_logged
                    .is_none_or(|t| now.duration_since(t) >= EMFILE_LOG_EVERY)
                {
                    self.fd_logged = Some(now);
                    warn!(
                        held = self.held(),
                        fd_limit = self.fd_limit,
                        reserve = FD_RESERVE,
                        pauses = self.stats.fd_pauses,
                        "holding as many connections as the fd limit allows: accepting paused until workers acknowledge (clients wait in the backlog)"
                    );
                }
            }
        }
        if !accepting {
            self.set_listening(false);
        }
        let full = self.emfile_until.is_none() && !self.pool.has_capacity();
        if full != self.paused_for_capacity {
            self.paused_for_capacity = full;
            if full {
                self.stats.capacity_pauses += 1;
                debug!(
                    pending = self.pending.len(),
                    "every worker is full: accepting paused"
                );
            } else {
                debug!("capacity freed: accepting resumed");
            }
        }
    }

    /// Accepts on every listener until EAGAIN. Returns false if it had to
    /// stop early (no room left, or out of fds).
    fn accept_all(&mut self, now: Instant) -> bool {
        let budget = self.fd_budget();
        let mut holding = self.held();
        for i in 0..self.listeners.len() {
            loop {
                if !self.pool.has_capacity() {
                    return false;
                }
                if holding >= budget {
                    // Idle parked connections make room; nothing else may.
                    if !self.evict_parked() {
                        return false;
                    }
                    holding -= 1;
                }
                let l = &self.listeners[i];
                match l.sock.accept() {
                    Ok((stream, peer)) => {
                        let local = if l.addr.ip().is_unspecified() {
                            stream.local_addr().unwrap_or(l.addr)
                        } else {
                            l.addr
                        };
                        let id = self.next_conn_id;
                        self.next_conn_id += 1;
                        self.stats.accepted += 1;
                        let fd: OwnedFd = stream.into();
                        let held = Held {
                            info: ConnInfo {
                                id,
                                listener: i as u16,
                                peer,
                                local,
                            },
                            fd,
                            accepted: now,
                        };
                        holding += 1;
                        if let Err(h) = self.dispatch(held, now) {
                            self.pending.push_back(h);
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                            self.stats.emfile_pauses += 1;
                            self.emfile_unlogged += 1;
                            let now = Instant::now();
                            if self
                                .emfile_logged
                                .is_none_or(|t| now.duration_since(t) >= EMFILE_LOG_EVERY)
                            {
                                warn!(
                                    error = %e,
                                    retry_ms = EMFILE_RETRY.as_millis() as u64,
                                    pauses = self.emfile_unlogged,
                                    "accept: out of file descriptors; pausing accepting and retrying (clients wait in the backlog)"
                                );
                                self.emfile_logged = Some(now);
                                self.emfile_unlogged = 0;
                            }
                            self.emfile_until = Some(now + EMFILE_RETRY);
                            return false;
                        }
                        // The client gave up between SYN and accept, or a
                        // network error on that one connection: next.
                        Some(
                            libc::ECONNABORTED
                            | libc::EPROTO
                            | libc::EPERM
                            | libc::ENETDOWN
                            | libc::ENOPROTOOPT
                            | libc::EHOSTDOWN
                            | libc::ENONET
                            | libc::EHOSTUNREACH
                            | libc::EOPNOTSUPP
                            | libc::ENETUNREACH,
                        ) => continue,
                        _ => {
                            error!(error = %e, listener = %l.addr, "accept failed");
                            break;
                        }
                    },
                }
            }
        }
        true
    }

    fn set_listening(&mut self, on: bool) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.registered == on {
                continue;
            }
            let r = if on {
                self.poll.registry().register(
                    &mut l.sock,
                    Token(LISTENER_BASE + i),
                    Interest::READABLE,
                )
            } else {
                self.poll.registry().deregister(&mut l.sock)
            };
            match r {
                Ok(()) => l.registered = on,
                Err(e) => error!(error = %e, listener = %l.addr, "epoll_ctl on a listener failed"),
            }
        }
    }
}
