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
//! | `WORKER_BASE + key`    | a worker's SEQPACKET channel   | HELLO / ACK / DONE; EOF = worker gone |
//!
//! Timers (restart backoff, EMFILE retry, HELLO, ACK and drain timeouts,
//! idle control clients, shutdown deadline) are deadlines kept in the state below; the poll timeout is the
//! nearest one, so nothing spins.
//!
//! After every batch of events, `Acceptor::pump` moves connections along:
//! first the ones waiting in `pending` (taken back from a dead worker, or
//! accepted while every worker was busy), then fresh ones from the
//! listeners. When no worker has room, the listeners are deregistered and
//! the kernel's backlog holds new clients until a DONE frees a slot.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_sdk::proto::ConnInfo;
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

/// How long accepting pauses after EMFILE/ENFILE before it is retried.
const EMFILE_RETRY: Duration = Duration::from_millis(100);
/// EMFILE is logged at most this often.
const EMFILE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Counters for logs (and, later, metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub accepted: u64,
    pub handed_off: u64,
    pub redispatched: u64,
    pub capacity_pauses: u64,
    pub emfile_pauses: u64,
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
    next_conn_id: u64,
    next_worker_id: u32,
    /// Accepting is paused after EMFILE until this instant.
    emfile_until: Option<Instant>,
    /// When EMFILE was last logged, and how many pauses since: the warning
    /// is repeated at most once a minute, never per connection.
    emfile_logged: Option<Instant>,
    emfile_unlogged: u64,
    /// Shutdown deadline, once a stop signal arrived.
    shutdown: Option<Instant>,
    drain_sent: bool,
    paused_for_capacity: bool,
    stats: Stats,
    /// Self-registering workers connect here.
    worker_listener: Option<UnixListener>,
    /// `baton ctl` connects here.
    control: Option<UnixListener>,
    ctl: Slab<CtlClient>,
    /// Rolling restart: slots still to replace, and the (old, new) pair
    /// under way (the old one drains once the new one is ready).
    rolling: VecDeque<usize>,
    rolling_current: Option<(usize, usize)>,
    started: Instant,
    own_uid: u32,
    /// `--metrics-listen` and its clients.
    metrics_listener: Option<mio::net::TcpListener>,
    scrapers: Slab<Scraper>,
    /// The command line, kept to re-read `--config` on reload.
    reload_args: Option<crate::cli::RunArgs>,
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
        Ok(Acceptor {
            cfg,
            poll,
            listeners,
            signals,
            pool,
            slots: Slab::new(),
            pending: VecDeque::new(),
            next_conn_id: 1,
            next_worker_id: 1,
            emfile_until: None,
            emfile_logged: None,
            emfile_unlogged: 0,
            shutdown: None,
            drain_sent: false,
            paused_for_capacity: false,
            stats: Stats::default(),
            worker_listener,
            control,
            ctl: Slab::new(),
            rolling: VecDeque::new(),
            rolling_current: None,
            started: Instant::now(),
            own_uid: nix::unistd::geteuid().as_raw(),
            reload_args: None,
            metrics_listener,
            scrapers: Slab::new(),
        })
    }

    /// Keeps the command line so that SIGHUP and `ctl reload` can re-read
    /// its `--config` file (flags keep overriding it).
    pub fn with_reload(mut self, args: crate::cli::RunArgs) -> Acceptor {
        self.reload_args = Some(args);
        self
    }

    /// The bound addresses, in `--listen` order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// Spawns the pool and runs until shutdown.
    pub fn run(mut self) -> Result<Outcome, Error> {
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
                    Token(t) if t >= WORKER_BASE => {
                        let key = t - WORKER_BASE;
                        if ev.is_writable() {
                            self.set_blocked(key, false);
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
        let key = self.slots.insert(Slot {
            pid: None,
            worker_id: 0,
            worker: None,
            started: Instant::now(),
            failures: 0,
            restarts: 0,
            restart_at: None,
            given_up: false,
            retired: false,
        });
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
                            if self.shutdown.is_some() {
                                warn!(signal = s.as_str(), "second signal: stopping at once");
                                self.kill_all_and_reap();
                                return Some(Outcome::Forced);
                            }
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
                self.close_worker(wkey, "its process exited", false);
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
                self.close_worker(key, "stopped before its HELLO", true);
                return;
            }
            State::Ready => {}
        }
        w.state = State::Draining;
        let id = w.id;
        if let Err(e) = w.chan.send(&Msg::Drain, None) {
            // A worker that cannot take DRAIN is gone or stuck: stop it.
            self.close_worker(key, &format!("DRAIN could not be sent: {e}"), true);
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
                warn!(
                    workers = procs,
                    "shutdown timeout reached: killing the workers that are still running"
                );
                self.kill_all_and_reap();
                let keys: Vec<usize> = self.pool.workers.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.close_worker(key, "shutdown timeout", false);
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
            capacity_pauses = s.capacity_pauses,
            emfile_pauses = s.emfile_pauses,
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
                    if let Err(why) = self.on_worker_msg(key, r.msg) {
                        self.close_worker(key, &format!("protocol violation: {why}"), true);
                        return;
                    }
                }
                Ok(None) => {
                    self.close_worker(key, "channel closed", false);
                    return;
                }
                Err(e) if e.would_block() => return,
                Err(RecvError::Proto(p)) => {
                    self.close_worker(key, &format!("protocol violation: {p}"), true);
                    return;
                }
                Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    // The worker exited with messages of ours unread.
                    self.close_worker(key, "channel closed", false);
                    return;
                }
                Err(RecvError::Io(e)) => {
                    self.close_worker(key, &format!("channel error: {e}"), true);
                    return;
                }
            }
        }
    }

    fn on_worker_msg(&mut self, key: usize, msg: Msg) -> Result<(), String> {
        let max_cap = self.cfg.worker_connections;
        let drain_now = self.drain_sent;
        let w = &mut self.pool.workers[key];
        match (w.state, msg) {
            (State::Starting, Msg::Hello { pid, capacity }) => {
                // Checked from outside before its first connection: the
                // process (as spawned, or as SO_PEERCRED saw it) must be
                // confined as the pool's profile says.
                let check = w.slot.is_some() || self.cfg.worker_require_sandbox;
                if let (true, Some(profile), Some(real)) =
                    (check, self.cfg.sandbox.profile.as_ref(), w.pid)
                {
                    if let Err(m) = baton_sdk::sandbox::verify(real, profile) {
                        // The same profile would fail the same way: no restart.
                        if let Some(slot) = w.slot.and_then(|k| self.slots.get_mut(k)) {
                            slot.given_up = true;
                        }
                        return Err(format!(
                            "sandbox check failed: {}",
                            baton_sdk::sandbox::describe(&m)
                        ));
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
                w.chan
                    .send(&Msg::Welcome { worker_id: w.id }, None)
                    .map_err(|e| format!("WELCOME could not be sent: {e}"))?;
                w.state = State::Ready;
                info!(
                    worker = w.id,
                    pid = pid,
                    capacity = w.capacity,
                    "worker ready"
                );
                if drain_now {
                    self.drain_worker(key);
                }
                Ok(())
            }
            (State::Starting, other) => Err(format!("{:?} before HELLO", other.kind())),
            (_, Msg::Ack(ids)) => {
                for id in ids {
                    if !w.ack(id) {
                        return Err(format!(
                            "ACK for connection {id}, which it does not hold unacknowledged"
                        ));
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
                        return Err(format!("DONE for connection {id}, which it does not hold"));
                    }
                }
                Ok(())
            }
            (_, Msg::Hello { .. }) => Err("second HELLO".to_string()),
            (_, other) => Err(format!(
                "{:?} is not a worker-to-acceptor message",
                other.kind()
            )),
        }
    }

    /// Removes a worker from the pool. Every connection it had not
    /// acknowledged goes back to the front of the queue for another worker;
    /// `kill` also SIGKILLs a spawned worker's process.
    fn close_worker(&mut self, key: usize, reason: &str, kill_it: bool) {
        if !self.pool.workers.contains(key) {
            return;
        }
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
        let orderly = w.state == State::Draining && reason == "channel closed";
        if orderly || (n == 0 && lost == 0 && !kill_it && self.shutdown.is_some()) {
            info!(
                worker = w.id,
                pid = w.pid,
                reason,
                handled = w.handled,
                "worker disconnected"
            );
        } else {
            // `lost`: connections the worker had acknowledged and not
            // finished; they were its to serve and went down with it.
            warn!(
                worker = w.id,
                pid = w.pid,
                reason,
                handled = w.handled,
                redispatched = n,
                lost,
                "worker disconnected"
            );
        }
        if let Some(slot) = w.slot.and_then(|s| self.slots.get_mut(s)) {
            slot.worker = None;
            if kill_it {
                if let Some(pid) = slot.pid {
                    // The pid is still ours: it is only released when we reap
                    // it, which clears slot.pid first.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
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
        for (_, w) in self.pool.workers.iter_mut() {
            if w.state == State::Starting {
                consider(Some(w.connected + hello));
            }
            consider(w.oldest_unacked().map(|t| t + ack));
            consider(w.drain_deadline);
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
        let (hello, ack) = (self.cfg.hello_timeout, self.cfg.ack_timeout);
        let mut overdue = Vec::new();
        for (key, w) in self.pool.workers.iter_mut() {
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
            self.close_worker(key, &format!("unresponsive: {why}"), true);
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

    /// Hands `held` to a worker with room; gives it back if there is none.
    fn dispatch(&mut self, held: Held) -> Result<(), Held> {
        loop {
            let Some(key) = self.pool.pick() else {
                return Err(held);
            };
            let w = &mut self.pool.workers[key];
            match w.chan.send(&Msg::Conn(held.info), Some(held.fd.as_fd())) {
                Ok(()) => {
                    w.sent(held, Instant::now());
                    self.stats.handed_off += 1;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Its queue is full: skip it until it is writable again.
                    self.set_blocked(key, true);
                }
                Err(e) => {
                    self.close_worker(key, &format!("CONN could not be sent: {e}"), true);
                }
            }
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
        while let Some(h) = self.pending.pop_front() {
            if let Err(h) = self.dispatch(h) {
                self.pending.push_front(h);
                break;
            }
        }
        if self.shutdown.is_some() {
            if self.pending.is_empty() && !self.drain_sent {
                self.send_drain();
            }
            return;
        }
        let mut accepting =
            self.emfile_until.is_none() && self.pending.is_empty() && self.pool.has_capacity();
        if accepting {
            self.set_listening(true);
            accepting = self.accept_all();
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
    fn accept_all(&mut self) -> bool {
        for i in 0..self.listeners.len() {
            loop {
                if !self.pool.has_capacity() {
                    return false;
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
                            accepted: Instant::now(),
                        };
                        if let Err(h) = self.dispatch(held) {
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
