//! The worker's event loop: one thread, one `mio::Poll`.
//!
//! | token        | source                 | on readiness                                  |
//! |--------------|------------------------|-----------------------------------------------|
//! | `CHANNEL`    | the acceptor's channel | [`Worker::poll_events`]: new connections (already ACKed), DRAIN, or the acceptor's exit |
//! | `SIGNALS`    | an eventfd (`DrainSignals`) | SIGTERM/SIGINT drain; a second one stops at once |
//! | `FIRST + k`  | connection `k` (slab)  | [`Conn::drive`]                                |
//!
//! After each batch of events the loop gives another turn to connections
//! that used up theirs with work left (a client reading as fast as loopback
//! never makes the socket block, and edge-triggered readiness does not
//! repeat), expires timed-out connections, and sends one DONE message for
//! every connection it closed in that batch.
//!
//! **Timers.** Each connection carries one deadline for its current state
//! (head being read, idle keep-alive, stalled write, lingering close). The
//! loop remembers the earliest deadline it may have to act on and scans the
//! slab when that time comes, at most once per [`TIMER_GRANULARITY`]; a
//! scan is a linear pass over plain structs, far cheaper than a timer heap
//! updated on every request.
//!
//! **Draining** (DRAIN, the channel closing, or SIGTERM/SIGINT): a
//! keep-alive connection idle for [`DRAIN_IDLE_GRACE`](crate::conn::DRAIN_IDLE_GRACE)
//! or longer is closed at once; one active more recently gets that long for
//! its next request (closing it at once would race with a request already
//! on its way: the client would see a reset); a connection with a request
//! in progress finishes it, answers with `Connection: close`, and closes; a
//! fresh connection still gets an answer to its first request (bounded by
//! the header timeout). When the last connection is gone, the worker exits.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

use baton_sdk::event::DrainSignals;
use baton_sdk::{Connection, Event, Worker};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::config::Config;
use crate::conn::{Conn, Io, Next};
use crate::fs::{Root, RootError};
use crate::http::{DateCache, Shared};
use crate::site::{Demo, Site};

const CHANNEL: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST: usize = 2;

/// How late a timeout may be acted on, at most; bounds the slab scans.
pub const TIMER_GRANULARITY: Duration = Duration::from_millis(20);

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("cannot join the acceptor: {0}")]
    Join(baton_sdk::Error),
    #[error("the acceptor's channel failed: {0}")]
    Channel(baton_sdk::Error),
    #[error("event loop: {0}")]
    Poll(#[source] io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] baton_tls::bundle::BundleError),
}

impl Error {
    /// The process exit status for this error: the SDK's sandbox status
    /// (the acceptor does not restart a worker that cannot be confined),
    /// 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Join(e) | Error::Channel(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Raises the soft fd limit to the hard one: each connection is an fd.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// How long one ACK or DONE send may wait for room in the acceptor's
/// receive queue before the channel counts as failed (the acceptor's own
/// `--ack-timeout` defaults to the same).
pub const CHANNEL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the worker until it has drained; `Ok` means a clean exit.
///
/// The sandbox the acceptor passed comes first: it closes every fd it was
/// not told to keep and may chroot, so every fd is opened after it
/// (`main_from` applies it; [`Worker::from_env`] applies it once per
/// process, so calling `run` unconfined is safe too, and the root directory
/// is resolved inside the jail). The drain signals are caught before the
/// worker says HELLO: from then on the acceptor may count on them.
pub fn run(cfg: Config) -> Result<(), Error> {
    raise_nofile();
    baton_sdk::sandbox::apply_from_env().map_err(|e| Error::Join(baton_sdk::Error::from(e)))?;
    let poll = Poll::new().map_err(Error::Poll)?;
    // SIGTERM and SIGINT drain the worker, as an eventfd event (see
    // baton_sdk::event: nothing the sandbox refuses).
    let signals = match DrainSignals::install().and_then(|s| {
        poll.registry()
            .register(&mut SourceFd(&s.as_raw_fd()), SIGNALS, Interest::READABLE)
            .map(|()| s)
    }) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "SIGTERM/SIGINT will stop this worker without draining");
            None
        }
    };
    // TLS, when the acceptor set it up for this pool: the certificate
    // chains and ticket keys from the pool's bundle, a channel to the key
    // process for signatures; never a private key. Taken before HELLO,
    // which says whether this worker terminates TLS: a TLS pool refuses a
    // worker that does not.
    let tls = baton_tls::bundle::from_env_for(true)?;
    // A socket and, while a body goes out, its file: two fds each.
    let join = Worker::join(cfg.capacity)
        .fds_per_conn(2)
        .terminates_tls(tls.is_some());
    let worker = match &cfg.register {
        Some(path) => join.register(path),
        None => join.from_env(),
    }
    .map_err(Error::Join)?;
    // Blocking with a send timeout (see baton_sdk::event).
    baton_sdk::event::bound_channel_sends(&worker, CHANNEL_SEND_TIMEOUT)
        .map_err(|e| Error::Channel(e.into()))?;
    if let Some(t) = &tls {
        tracing::info!(
            worker = worker.id(),
            "TLS: handshakes signed by baton's key process; TLS record path: {}",
            t.ktls.record_path()
        );
        for name in &t.tls.shadowed {
            tracing::warn!(name = %name, "TLS: two certificates claim this name; the first one added serves it");
        }
    }
    let site = match &cfg.root {
        Some(dir) => {
            let root = Root::open(dir)?;
            tracing::info!(
                worker = worker.id(),
                root = %dir.display(),
                resolver = ?root.resolver(),
                "serving files"
            );
            Site::Dir(root)
        }
        None => {
            tracing::info!(worker = worker.id(), "serving the demo site");
            Site::Demo(Demo::new(std::process::id(), worker.id()))
        }
    };
    poll.registry()
        .register(
            &mut SourceFd(&worker.as_raw_fd()),
            CHANNEL,
            Interest::READABLE,
        )
        .map_err(Error::Poll)?;
    let mut server = Server {
        io: Io::new(&cfg),
        cfg: &cfg,
        site,
        date: DateCache::default(),
        conns: Slab::with_capacity(1024),
        poll,
        worker,
        signals,
        done: Vec::new(),
        draining: false,
        closed: false,
        channel_error: None,
        next_check: None,
        again: Vec::new(),
        served: 0,
        parked: 0,
        tls,
    };
    server.run()
}

struct Server<'a> {
    cfg: &'a Config,
    site: Site,
    date: DateCache,
    io: Io,
    conns: Slab<Conn>,
    poll: Poll,
    worker: Worker,
    /// SIGTERM/SIGINT, as an event.
    signals: Option<DrainSignals>,
    /// Connections closed and not yet reported DONE.
    done: Vec<u64>,
    draining: bool,
    /// The channel is gone (EOF or broken): nothing more to report.
    closed: bool,
    channel_error: Option<baton_sdk::Error>,
    next_check: Option<Instant>,
    /// Connections that used up their turn with work left.
    again: Vec<usize>,
    served: u64,
    /// Connections handed back to the acceptor idle.
    parked: u64,
    /// The pool's TLS, if it terminates TLS.
    tls: Option<baton_tls::bundle::FromEnv>,
}

impl Server<'_> {
    fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(1024);
        let mut incoming = Vec::new();
        // Anything queued before the channel was registered.
        self.channel_ready(&mut incoming);
        loop {
            self.report_done();
            if self.draining && self.conns.is_empty() {
                break;
            }
            let timeout = if self.again.is_empty() {
                self.next_check
                    .map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Poll(e));
            }
            self.io.now = Instant::now();
            self.date.refresh(SystemTime::now());
            for ev in events.iter() {
                match ev.token() {
                    CHANNEL => self.channel_ready(&mut incoming),
                    SIGNALS => self.signal_ready(),
                    Token(t) => {
                        let key = t - FIRST;
                        if let Some(c) = self.conns.get_mut(key) {
                            c.ready(ev.is_readable() || ev.is_error(), ev.is_read_closed());
                            self.drive(key);
                        }
                    }
                }
            }
            // Another turn for connections that used up theirs.
            let again = std::mem::take(&mut self.again);
            for key in again {
                self.drive(key);
            }
            self.expire();
            self.watch_tls();
        }
        tracing::info!(
            worker = self.worker.id(),
            connections = self.served,
            parked = self.parked,
            "drained, exiting"
        );
        match self.channel_error.take() {
            Some(e) => Err(Error::Channel(e)),
            None => Ok(()),
        }
    }

    fn channel_ready(&mut self, incoming: &mut Vec<Event>) {
        if self.closed {
            return;
        }
        if let Err(e) = self.worker.poll_events(incoming) {
            tracing::error!(error = %e, "the acceptor's channel failed; draining");
            self.channel_error = Some(e);
            self.closed = true;
            self.start_drain();
        }
        for ev in incoming.drain(..) {
            match ev {
                Event::Conn(c) => self.accept(c),
                Event::Drain => {
                    tracing::info!(open = self.conns.len(), "DRAIN from the acceptor");
                    self.start_drain();
                }
                Event::Closed => {
                    tracing::info!(open = self.conns.len(), "the acceptor closed the channel");
                    self.closed = true;
                    self.start_drain();
                }
            }
        }
    }

    fn signal_ready(&mut self) {
        while let Some(sig) = self.signals.as_mut().and_then(DrainSignals::take) {
            if self.draining {
                tracing::warn!(signal = sig, "second signal: closing every connection now");
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for k in keys {
                    self.close(k, "stopped");
                }
            } else {
                tracing::info!(signal = sig, open = self.conns.len(), "draining");
                self.start_drain();
            }
        }
    }

    fn accept(&mut self, c: Connection) {
        self.served += 1;
        let id = c.id;
        // No set_nonblocking here: every read and write passes
        // MSG_DONTWAIT, and the socket is made non-blocking only before its
        // first sendfile (see `Conn`), so that whatever mode the acceptor
        // left it in, the worker never blocks, and a one-request connection
        // costs no extra system call. mio only watches the fd: its own I/O
        // methods, which would need O_NONBLOCK, are never used.
        // A connection parked after its PROXY header comes back with the
        // header's client address, which differs from the socket's own
        // peer (only a PARK can make them differ): its header was read.
        // Every other one owes its header now.
        let awaiting_proxy =
            self.cfg.accept_proxy && c.stream.peer_addr().map_or(true, |p| p == c.peer);
        let sock = mio::net::TcpStream::from_std(c.stream);
        let mut conn = Conn::new(id, sock, c.peer, self.io.now);
        if let Some(t) = &self.tls {
            if let Err(e) =
                conn.start_tls(t.tls.config.clone(), t.tls.config.enable_secret_extraction)
            {
                tracing::warn!(conn = id, error = %e, "cannot start a TLS session; closing the connection");
                self.done.push(id);
                return;
            }
        }
        conn.listener = c.listener;
        conn.local = c.local;
        conn.park_after = self.park_after();
        conn.awaiting_proxy = awaiting_proxy;
        let key = self.conns.insert(conn);
        if self.draining {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.drain(self.cfg, self.io.now);
            }
        }
        // The request has usually arrived already: serve it now, and watch
        // the socket only if the connection outlives this turn (`drive`
        // registers it then). A one-request connection whose request was
        // there is served and closed without ever touching epoll; if the
        // request arrives just after the read, registering reports it.
        self.drive(key);
    }

    fn drive(&mut self, key: usize) {
        let Server {
            cfg,
            site,
            date,
            io,
            conns,
            ..
        } = self;
        let sh = Shared { cfg, site, date };
        let Some(c) = conns.get_mut(key) else { return };
        let next = c.drive(&sh, io);
        if next != Next::Close && !c.registered {
            match self.poll.registry().register(
                &mut c.sock,
                Token(key + FIRST),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                Ok(()) => c.registered = true,
                Err(e) => {
                    tracing::warn!(conn = c.id, error = %e, "cannot watch connection");
                    self.close(key, "");
                    return;
                }
            }
        }
        match next {
            Next::Close => self.close(key, ""),
            next => {
                let d = c.deadline;
                self.next_check = Some(self.next_check.map_or(d, |n| n.min(d)));
                if next == Next::Again {
                    self.again.push(key);
                }
            }
        }
    }

    /// How long a connection idles before it is parked, if this worker
    /// parks at all (the acceptor speaks version 2 and is still there).
    fn park_after(&self) -> Option<Duration> {
        let d = self.cfg.park_after;
        (!d.is_zero() && !self.closed && self.worker.can_park()).then_some(d)
    }

    /// Hands idle connections back to the acceptor (PARK), a batch per
    /// message. A connection that cannot be parked is closed (and reported
    /// DONE) instead: it was idle, so no request is cut.
    fn park(&mut self, keys: Vec<usize>) {
        for chunk in keys.chunks(baton_sdk::proto::MAX_BATCH) {
            let mut list = Vec::with_capacity(chunk.len());
            let now = self.io.now;
            for &k in chunk {
                let Some(c) = self.conns.get_mut(k) else {
                    continue;
                };
                // Its registration would outlive our close: the acceptor's
                // copy keeps the socket open.
                if c.registered {
                    let _ = self.poll.registry().deregister(&mut c.sock);
                    c.registered = false;
                }
                let parked = baton_sdk::proto::Parked {
                    info: baton_sdk::ConnInfo {
                        id: c.id,
                        listener: c.listener,
                        peer: c.peer,
                        local: c.local,
                    },
                    idle_ms: c.idle_left_ms(self.cfg, now),
                };
                list.push((k, parked));
            }
            let sent = {
                let with_fds: Vec<_> = list
                    .iter()
                    .filter_map(|(k, p)| {
                        let c = self.conns.get(*k)?;
                        // SAFETY: the fd is the connection's socket, open
                        // for as long as the Conn, which outlives this call.
                        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(c.sock.as_raw_fd()) };
                        Some((*p, fd))
                    })
                    .collect();
                self.worker.park(&with_fds)
            };
            match sent {
                Ok(()) => {
                    for (k, _) in list {
                        if self.conns.contains(k) {
                            let mut c = self.conns.remove(k);
                            c.close(&mut self.io);
                            self.parked += 1;
                            // Dropped: our copy closes; the acceptor holds
                            // the connection. No DONE: PARK said it all.
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot park; closing the idle connections instead");
                    for (k, _) in list {
                        self.close(k, "idle (parking failed)");
                    }
                }
            }
        }
    }

    fn close(&mut self, key: usize, why: &str) {
        if !self.conns.contains(key) {
            return;
        }
        let mut c = self.conns.remove(key);
        c.close(&mut self.io);
        if !why.is_empty() {
            tracing::debug!(conn = c.id, peer = %c.peer, requests = c.requests(), why, "closing");
        }
        // No EPOLL_CTL_DEL: closing the fd removes it from the epoll set once
        // the acceptor has closed its copy too (it does on our ACK, sent
        // before we ever read). Until then a stray event may name this slab
        // slot, or a new connection in it: driving a connection with
        // nothing to do is harmless.
        self.done.push(c.id);
        // Dropping `c` closes the socket; only then is the connection done.
    }

    fn start_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let (cfg, now) = (self.cfg, self.io.now);
        // With an acceptor to take them, idle connections go back to it at
        // once: their next request goes to another worker, and none is
        // closed under its client.
        if self.park_after().is_some() {
            let idle: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.parkable())
                .map(|(k, _)| k)
                .collect();
            self.park(idle);
        }
        let mut next = self.next_check;
        let idle: Vec<usize> = self
            .conns
            .iter_mut()
            .filter_map(|(k, c)| {
                if c.drain(cfg, now) {
                    next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
                    None
                } else {
                    Some(k)
                }
            })
            .collect();
        self.next_check = next;
        for k in idle {
            self.close(k, "drain");
        }
    }

    /// Closes every connection whose deadline passed.
    /// Every [`baton_tls::bundle::CHECK_EVERY`]: new session-ticket keys
    /// from the pool's bundle, if the acceptor rotated them.
    fn watch_tls(&mut self) {
        let Some(t) = self.tls.as_mut() else { return };
        match t.watch.poll_due(self.io.now, &t.tls) {
            Some(Ok(true)) => tracing::info!(
                worker = self.worker.id(),
                "TLS: session-ticket keys rotated"
            ),
            Some(Err(e)) => tracing::warn!(error = %e, "TLS: cannot read the pool's bundle"),
            Some(Ok(false)) | None => {}
        }
        let at = t.watch.next_check();
        self.next_check = Some(self.next_check.map_or(at, |n| n.min(at)));
    }

    fn expire(&mut self) {
        let now = self.io.now;
        match self.next_check {
            Some(t) if t <= now => {}
            _ => return,
        }
        let mut expired = Vec::new();
        let mut to_park = Vec::new();
        let mut next: Option<Instant> = None;
        let parking = self.park_after().is_some();
        for (k, c) in self.conns.iter_mut() {
            if c.deadline <= now {
                if parking && c.park_due(now) {
                    to_park.push(k);
                } else if c.park_after.is_some() && !parking && c.is_idle() {
                    // It can no longer be parked: wait out its idle timeout.
                    c.park_after = None;
                    c.set_deadline(self.cfg);
                    next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
                } else {
                    expired.push(k);
                }
            } else {
                next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
            }
        }
        if !to_park.is_empty() {
            self.park(to_park);
        }
        for k in expired {
            let sh = Shared {
                cfg: self.cfg,
                site: &self.site,
                date: &self.date,
            };
            let why = match self.conns.get_mut(k) {
                Some(c) => c.timed_out(&sh),
                None => continue,
            };
            self.close(k, why);
        }
        self.next_check = next.map(|n| n.max(now + TIMER_GRANULARITY));
    }

    /// Sends DONE for every connection closed since the last call. A send
    /// that timed out (see [`CHANNEL_SEND_TIMEOUT`]) keeps the rest for the
    /// next turn of the loop.
    fn report_done(&mut self) {
        if self.done.is_empty() {
            return;
        }
        if self.closed {
            self.done.clear();
            return;
        }
        let mut sent = 0;
        let mut broken = false;
        for chunk in self.done.chunks(baton_sdk::proto::MAX_IDS) {
            match self.worker.done_many(chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report connections done; draining");
                    broken = true;
                    break;
                }
            }
        }
        self.done.drain(..sent);
        if broken {
            self.closed = true;
            self.done.clear();
            self.start_drain();
        }
    }
}
