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
//! | `scrape.rs`   | the `--metrics-listen` HTTP endpoint                             |
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
mod intake;
mod ops;
mod parked;
mod scrape;
mod sessions;
mod status;
use ctl_sessions::CtlClient;
use intake::{count_open_fds, raise_nofile};
use parked::ParkedConn;
use scrape::Scraper;
use sessions::Gone;

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

struct Listener {
    sock: mio::net::TcpListener,
    addr: SocketAddr,
    registered: bool,
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
    ctl_refused: ctl_sessions::Refusals,
    worker_refused: ctl_sessions::Refusals,
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
            ctl_refused: ctl_sessions::Refusals::default(),
            worker_refused: ctl_sessions::Refusals::default(),
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
}
