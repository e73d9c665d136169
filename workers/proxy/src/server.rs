//! The worker's event loop: one thread, one `mio::Poll`, as baton-static's.
//!
//! | token                | source                   | on readiness                                     |
//! |----------------------|--------------------------|--------------------------------------------------|
//! | `CHANNEL`            | the acceptor's channel   | [`Worker::poll_events`]: connections (ACKed), DRAIN, the acceptor's exit |
//! | `SIGNALS`            | an eventfd (`Waker`)     | SIGTERM/SIGINT drain; a second one stops at once |
//! | `FIRST + 2k`         | client socket of conn `k`| [`Server::drive`] (TCP mode)                     |
//! | `FIRST + 2k + 1`     | its upstream socket      | [`Server::drive`] (TCP mode)                     |
//! | `FIRST + k`          | client `k` (HTTP mode)   | `Server::http_client_event` ([`crate::http`])    |
//! | `UPS + u`            | upstream connection `u`, in use or pooled (HTTP mode) | `Server::http_up_event` |
//! | `PROBES + p`         | health probe `p`         | [`Server::probe_ready`]                          |
//!
//! After each batch of events the loop gives another turn to connections
//! that used up their byte budget (edge-triggered readiness does not
//! repeat), expires deadlines (PROXY header, TLS handshake, connect, idle,
//! drain), starts the health probes whose lease this worker won, and sends
//! one DONE message for every connection closed in the batch.
//!
//! **Draining** (DRAIN, the channel closing, SIGTERM/SIGINT): no probe is
//! started any more; open connections are relayed to their end, and those
//! still open after `--drain-timeout` are closed. Then the worker exits.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use baton_sdk::event::{self, DoneQueue, DrainSignals};
use baton_sdk::log::Level;
use baton_sdk::shared::{now_ms, Shared};
use baton_sdk::{Connection, Event, Worker};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::balance::{Balancer, Candidate, Server as BServer};
use crate::config::{Config, HealthCheck};
use crate::health::{self, Rules, Transition};
use crate::http::UPS;
use crate::log;
use crate::mode::Mode;
use crate::probe::{Probe, Verdict};
use crate::relay::Direction;
use crate::tcp::{Conn, ConnectStep, HeaderStep, Phase, RelayStep, Side};
use crate::tls_relay::{HandshakeStep, TlsClient};
use crate::upstream::{Fnv, Upstream};
use baton_tls::{FdIo, TlsConn, TlsError};

const CHANNEL: Token = Token(0);
const SIGNALS: Token = Token(1);
pub(crate) const FIRST: usize = 2;
/// Tokens of probes start here, far above any connection's.
const PROBES: usize = usize::MAX / 2;

/// How late a timeout may be acted on, at most.
pub const TIMER_GRANULARITY: Duration = Duration::from_millis(20);
/// Bytes one direction may move in one turn before others get theirs.
pub const TURN_BUDGET: usize = 1 << 20;
/// How long one ACK or DONE send may wait for the acceptor (as baton-static).
pub const CHANNEL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the worker stopped serving (it has joined the acceptor by then).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the acceptor's channel failed: {0}")]
    Channel(baton_sdk::Error),
    #[error("event loop: {0}")]
    Poll(#[source] io::Error),
}

/// Watches an fd of ours for readability.
fn watch(registry: &mio::Registry, fd: std::os::fd::RawFd, token: Token) -> io::Result<()> {
    registry.register(&mut SourceFd(&fd), token, Interest::READABLE)
}

/// Everything resolved before the sandbox: upstreams and shared state.
pub struct Prepared {
    pub upstreams: Vec<Upstream>,
    pub shared: Shared,
    /// The pool's TLS (certificate chains, ticket keys, a channel to the
    /// key process), when it terminates TLS.
    pub tls: Option<baton_tls::bundle::FromEnv>,
}

/// Joins the acceptor and serves until drained, in `mode`.
pub fn run(cfg: Config, mode: Mode, prep: Prepared, worker: Worker) -> Result<(), Error> {
    event::bound_channel_sends(&worker, CHANNEL_SEND_TIMEOUT)
        .map_err(|e| Error::Channel(e.into()))?;
    let poll = Poll::new().map_err(Error::Poll)?;
    watch(poll.registry(), worker.as_raw_fd(), CHANNEL).map_err(Error::Poll)?;
    let signals = match DrainSignals::install() {
        Ok(s) => {
            watch(poll.registry(), s.as_raw_fd(), SIGNALS).map_err(Error::Poll)?;
            Some(s)
        }
        Err(e) => {
            log!(
                Level::Warn,
                "SIGTERM/SIGINT will stop this worker without draining: {e}"
            );
            None
        }
    };
    let servers: Vec<BServer> = prep
        .upstreams
        .iter()
        .map(|u| {
            let mut h = Fnv::default();
            h.write(u.name.as_bytes());
            BServer {
                weight: u.weight,
                backup: u.backup,
                id: h.0,
            }
        })
        .collect();
    let seed = u64::from(std::process::id()) ^ now_ms().rotate_left(32);
    let rules = Rules {
        max_fails: cfg.max_fails,
        backoff_ms: cfg.fail_backoff.as_millis() as u64,
        backoff_max_ms: cfg.fail_backoff_max.as_millis() as u64,
        active: cfg.health_check != HealthCheck::None,
        rise: cfg.health_rise,
        fall: cfg.health_fall,
    };
    let n = prep.upstreams.len();
    let names: Vec<String> = prep
        .upstreams
        .iter()
        .map(|u| {
            let mut s = format!("{} ({})", u.name, u.addr);
            if u.weight != 1 {
                s.push_str(&format!(" weight {}", u.weight));
            }
            if u.backup {
                s.push_str(" backup");
            }
            s
        })
        .collect();
    log!(
        Level::Info,
        "worker {} ready: {} mode, {} upstream(s): {}; balance {}, health check {}, health state {}",
        worker.id(),
        match mode {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        },
        n,
        names.join(", "),
        value_name(cfg.balance),
        value_name(cfg.health_check),
        if prep.shared.pooled() {
            "shared with the pool"
        } else {
            "private to this worker"
        }
    );
    let now = Instant::now();
    let fwd = crate::forward::Rules {
        trusted: cfg.trusted_proxies.clone(),
        x_real_ip: cfg.x_real_ip,
        host: cfg.host.clone(),
    };
    let mut s = Server {
        mode,
        http: crate::http::Http::new(n, fwd),
        balancer: Balancer::new(cfg.balance, servers, seed),
        cfg,
        upstreams: prep.upstreams,
        shared: prep.shared,
        rules,
        outstanding: vec![0; n],
        probing: vec![false; n],
        conns: Slab::with_capacity(256),
        probes: Slab::new(),
        poll,
        worker,
        now,
        signals,
        done: DoneQueue::default(),
        draining: false,
        drain_deadline: None,
        closed: false,
        channel_error: None,
        next_check: None,
        next_probe: rules.active.then_some(now),
        again: Vec::new(),
        served: 0,
        tls: prep.tls,
    };
    s.run()
}

pub(crate) struct Server {
    pub(crate) mode: Mode,
    /// HTTP mode's connections and pools.
    pub(crate) http: crate::http::Http,
    pub(crate) cfg: Config,
    pub(crate) upstreams: Vec<Upstream>,
    pub(crate) shared: Shared,
    pub(crate) rules: Rules,
    pub(crate) balancer: Balancer,
    /// Connections in flight from this worker, per server.
    pub(crate) outstanding: Vec<u32>,
    /// Servers with a probe of ours in flight.
    pub(crate) probing: Vec<bool>,
    pub(crate) conns: Slab<Conn>,
    pub(crate) probes: Slab<Probe>,
    pub(crate) poll: Poll,
    pub(crate) worker: Worker,
    pub(crate) now: Instant,
    pub(crate) signals: Option<DrainSignals>,
    pub(crate) done: DoneQueue,
    pub(crate) draining: bool,
    pub(crate) drain_deadline: Option<Instant>,
    pub(crate) closed: bool,
    pub(crate) channel_error: Option<baton_sdk::Error>,
    /// Earliest connection or probe deadline that may need acting on.
    pub(crate) next_check: Option<Instant>,
    /// When to try for probe leases next (None: no active check).
    pub(crate) next_probe: Option<Instant>,
    pub(crate) again: Vec<usize>,
    pub(crate) served: u64,
    pub(crate) tls: Option<baton_tls::bundle::FromEnv>,
}

/// How an option value is spelled on the command line.
fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(|| "?".to_string(), |p| p.get_name().to_string())
}

pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Server {
    fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(1024);
        let mut incoming = Vec::new();
        self.channel_ready(&mut incoming);
        loop {
            self.report_done();
            if self.draining && self.conns.is_empty() && self.http.clients.is_empty() {
                break;
            }
            let tls_check = self.tls.as_ref().map(|t| t.watch.next_check());
            let timeout = if self.again.is_empty() {
                earliest(
                    earliest(self.next_check, self.next_probe),
                    earliest(self.drain_deadline, tls_check),
                )
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
            self.now = Instant::now();
            // Signals are read when their eventfd says so (a signal landing
            // after this poll makes it readable, so the next one returns):
            // not on every turn, which would cost a read(2) per turn.
            for ev in events.iter() {
                match ev.token() {
                    CHANNEL => self.channel_ready(&mut incoming),
                    SIGNALS => self.signal_ready(),
                    Token(t) if t >= PROBES => self.probe_ready(t - PROBES),
                    Token(t) if self.mode == Mode::Http && t >= UPS => {
                        self.http_up_event(t - UPS, ev)
                    }
                    Token(t) if self.mode == Mode::Http => self.http_client_event(t - FIRST, ev),
                    Token(t) => self.drive((t - FIRST) / 2),
                }
            }
            let again = std::mem::take(&mut self.again);
            for key in again {
                match self.mode {
                    Mode::Tcp => self.drive(key),
                    Mode::Http => self.http_drive(key),
                }
            }
            self.expire();
            self.start_probes();
            self.watch_tls();
        }
        log!(
            Level::Info,
            "worker {} drained, exiting after {} connection(s)",
            self.worker.id(),
            self.served
        );
        match self.channel_error.take() {
            Some(e) => Err(Error::Channel(e)),
            None => Ok(()),
        }
    }

    /// Every [`baton_tls::bundle::CHECK_EVERY`]: new session-ticket keys
    /// from the pool's bundle, if the acceptor rotated them.
    fn watch_tls(&mut self) {
        let Some(t) = self.tls.as_mut() else { return };
        match t.watch.poll_due(self.now, &t.tls) {
            Some(Ok(true)) => log!(
                Level::Info,
                "worker {}: TLS session-ticket keys rotated",
                self.worker.id()
            ),
            Some(Err(e)) => log!(Level::Warn, "TLS: cannot read the pool's bundle: {e}"),
            Some(Ok(false)) | None => {}
        }
    }

    fn channel_ready(&mut self, incoming: &mut Vec<Event>) {
        if self.closed {
            return;
        }
        if let Err(e) = self.worker.poll_events(incoming) {
            log!(Level::Error, "the acceptor's channel failed: {e}; draining");
            self.channel_error = Some(e);
            self.closed = true;
            self.start_drain();
        }
        for ev in incoming.drain(..) {
            match ev {
                Event::Conn(c) => self.accept(c),
                Event::Drain => {
                    log!(
                        Level::Info,
                        "DRAIN from the acceptor, {} open",
                        self.conns.len()
                    );
                    self.start_drain();
                }
                Event::Closed => {
                    log!(
                        Level::Info,
                        "the acceptor closed the channel, {} open",
                        self.conns.len()
                    );
                    self.closed = true;
                    self.start_drain();
                }
            }
        }
    }

    fn signal_ready(&mut self) {
        while let Some(sig) = self.signals.as_mut().and_then(|s| s.take()) {
            if self.draining {
                log!(
                    Level::Warn,
                    "second signal ({sig}): closing every connection now"
                );
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for k in keys {
                    self.close_notify(k);
                    self.close(k, "stopped");
                }
                self.http_close_all("stopped");
            } else {
                log!(
                    Level::Info,
                    "{sig}: draining {} connection(s)",
                    self.conns.len()
                );
                self.start_drain();
            }
        }
    }

    fn start_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        self.drain_deadline = Some(self.now + self.cfg.drain_timeout);
        self.next_probe = None;
        let keys: Vec<usize> = self.probes.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.end_probe(k, None);
        }
        self.http_drain();
    }

    fn accept(&mut self, c: Connection) {
        self.served += 1;
        if self.mode == Mode::Http {
            self.http_accept(c);
            return;
        }
        let id = c.id;
        if let Err(e) = c.stream.set_nonblocking(true) {
            log!(
                Level::Warn,
                "conn {id}: cannot make the socket non-blocking: {e}"
            );
            self.done.push(id);
            return;
        }
        let _ = c.stream.set_nodelay(true);
        // With TLS, a session per connection over the raw fd (the socket
        // stays in `Conn`, which outlives the session).
        let Ok(tls) = self.tls_session(&c) else {
            return;
        };
        let tls = tls.map(|t| Box::new(TlsClient::new(t)));
        let phase = if self.cfg.accept_proxy {
            Phase::Header
        } else if tls.is_some() {
            Phase::Handshake
        } else {
            Phase::Connecting
        };
        let sock = mio::net::TcpStream::from_std(c.stream);
        let mut conn = Conn::new(
            id,
            sock,
            c.peer,
            c.local,
            self.upstreams.len(),
            phase,
            self.now,
        );
        conn.tls = tls;
        let key = self.conns.insert(conn);
        if !self.watch_conn(key, Side::Client) {
            return;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match phase {
            Phase::Header => {
                conn.deadline = self.now + self.cfg.accept_proxy_timeout;
                self.schedule(key);
                self.drive(key);
            }
            Phase::Handshake => self.start_handshake(key),
            _ => self.connect_next(key, None),
        }
    }

    /// Starts `key`'s TLS handshake (its deadline, and a first turn: the
    /// ClientHello may be there already, and its edge gone).
    fn start_handshake(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.phase = Phase::Handshake;
        c.deadline = self.now + self.cfg.tls_handshake_timeout;
        self.schedule(key);
        self.drive(key);
    }

    /// A TLS session for connection `c` when the pool terminates TLS
    /// (`Ok(None)` when it does not). `Err`: none could be made; logged,
    /// and the connection reported done (dropping it closes it).
    pub(crate) fn tls_session(&mut self, c: &Connection) -> Result<Option<TlsConn<FdIo>>, ()> {
        let Some(t) = self.tls.as_ref() else {
            return Ok(None);
        };
        match TlsConn::new(t.tls.config.clone(), FdIo(c.stream.as_raw_fd())) {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                log!(
                    Level::Warn,
                    "conn {}: cannot start a TLS session: {e}; closing the connection",
                    c.id
                );
                self.done.push(c.id);
                Err(())
            }
        }
    }

    /// Registers one of `key`'s sockets with the poller, or closes the
    /// connection (logged) and returns false.
    fn watch_conn(&mut self, key: usize, side: Side) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let (sock, token, what) = match side {
            Side::Client => (Some(&mut c.client), FIRST + 2 * key, "client"),
            Side::Upstream => (c.upstream.as_mut(), FIRST + 2 * key + 1, "upstream"),
        };
        let r = match sock {
            Some(sock) => self.poll.registry().register(
                sock,
                Token(token),
                Interest::READABLE | Interest::WRITABLE,
            ),
            None => Err(io::Error::other("no socket")),
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                log!(
                    Level::Warn,
                    "conn {}: cannot watch the {what} socket: {e}",
                    c.id
                );
                self.close(key, "");
                false
            }
        }
    }

    /// Arranges for `key`'s deadline to be checked.
    fn schedule(&mut self, key: usize) {
        if let Some(c) = self.conns.get(key) {
            self.next_check = earliest(self.next_check, Some(c.deadline));
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match c.phase {
            Phase::Header => match c.read_header() {
                HeaderStep::Wait => {}
                HeaderStep::Done(addrs) => {
                    if let Some((src, dst)) = addrs {
                        c.peer = src;
                        c.local = dst;
                    }
                    if c.tls.is_some() {
                        self.start_handshake(key);
                    } else {
                        c.phase = Phase::Connecting;
                        self.connect_next(key, None);
                    }
                }
                step @ (HeaderStep::Closed | HeaderStep::Bad(_)) => {
                    let why = match step {
                        HeaderStep::Bad(e) => format!("PROXY header refused: {e}"),
                        _ => "closed before a whole PROXY header".to_string(),
                    };
                    log!(Level::Warn, "conn {} from {}: {why}; closing", c.id, c.peer);
                    self.close(key, "");
                }
            },
            Phase::Handshake => match c.handshake() {
                HandshakeStep::Wait => {}
                // Only now an upstream (see crate::tcp: connect timing).
                HandshakeStep::Done => {
                    c.phase = Phase::Connecting;
                    self.connect_next(key, None);
                }
                HandshakeStep::Failed(e) => {
                    let why = match &e {
                        TlsError::PlaintextHttp(_) | TlsError::NotTls(_) => {
                            format!("{e}; closing without an answer (TCP mode)")
                        }
                        _ => format!("{e}; closing"),
                    };
                    log!(
                        Level::Info,
                        "conn {} from {}: TLS handshake failed ({}): {why}",
                        c.id,
                        c.peer,
                        e.kind()
                    );
                    self.close(key, "");
                }
            },
            Phase::Connecting => match c.connect_status() {
                ConnectStep::Wait => {}
                ConnectStep::Connected => self.connected(key),
                ConnectStep::Failed(e) => self.connect_failed(key, e.to_string()),
            },
            Phase::Relay => self.relay(key),
        }
    }

    /// Which servers may take a connection now (up, not yet tried).
    fn candidates(&self, tried: &[bool]) -> Vec<Candidate> {
        let now = now_ms();
        (0..self.upstreams.len())
            .map(|i| Candidate {
                usable: !tried.get(i).copied().unwrap_or(false)
                    && self
                        .shared
                        .slot(i)
                        .is_some_and(|s| health::usable(&self.rules, s, now)),
                outstanding: self.outstanding[i],
            })
            .collect()
    }

    /// The server the policy picks for a client at `peer` among those up
    /// and not in `tried`.
    pub(crate) fn pick(&mut self, tried: &[bool], peer: std::net::SocketAddr) -> Option<usize> {
        let cands = self.candidates(tried);
        let mut h = Fnv::default();
        match peer.ip() {
            std::net::IpAddr::V4(a) => h.write(&a.octets()),
            std::net::IpAddr::V6(a) => h.write(&a.octets()),
        }
        self.balancer.pick(&cands, h.0)
    }

    /// Connects `key` to the next server the policy picks among those not
    /// tried yet; closes it when none is left or the retries are spent.
    /// `last` is the previous attempt's failure, for the log.
    fn connect_next(&mut self, key: usize, mut last: Option<String>) {
        loop {
            let Some(c) = self.conns.get(key) else { return };
            let (id, peer) = (c.id, c.peer);
            if c.attempts > self.cfg.retries {
                log!(
                    Level::Warn,
                    "conn {id} from {peer}: no upstream answered after {} attempt(s) (last: {}); closing",
                    c.attempts,
                    last.as_deref().unwrap_or("?")
                );
                self.close(key, "");
                return;
            }
            let tried = c.tried.clone();
            let Some(i) = self.pick(&tried, peer) else {
                match &last {
                    None => log!(
                        Level::Warn,
                        "conn {id} from {peer}: no upstream is up; closing"
                    ),
                    Some(l) => log!(
                        Level::Warn,
                        "conn {id} from {peer}: no other upstream to try (last: {l}); closing"
                    ),
                }
                self.close(key, "");
                return;
            };
            let addr = self.upstreams[i].addr;
            let deadline = self.now + self.cfg.connect_timeout;
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            c.tried[i] = true;
            c.attempts += 1;
            c.upstream = None;
            match mio::net::TcpStream::connect(addr) {
                Ok(sock) => {
                    c.upstream = Some(sock);
                    c.server = Some(i);
                    c.phase = Phase::Connecting;
                    c.deadline = deadline;
                    self.outstanding[i] += 1;
                    if self.watch_conn(key, Side::Upstream) {
                        self.schedule(key);
                    }
                    return;
                }
                Err(e) => {
                    let why = format!("connect to {} ({addr}): {e}", self.upstreams[i].name);
                    // A socket we could not even create (EMFILE) says
                    // nothing about the server.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        self.failure(i, &why);
                    }
                    last = Some(why);
                }
            }
        }
    }

    /// The server `key` was connecting to failed it.
    fn connect_failed(&mut self, key: usize, e: String) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(i) = c.server.take() else { return };
        c.upstream = None;
        self.outstanding[i] = self.outstanding[i].saturating_sub(1);
        let why = format!("connect to {}: {e}", self.upstreams[i].name);
        log!(
            Level::Info,
            "conn {} from {}: {why}; trying another server",
            c.id,
            c.peer
        );
        self.failure(i, &why);
        self.connect_next(key, Some(why));
    }

    fn connected(&mut self, key: usize) {
        let pipe_size = self.cfg.pipe_size;
        let send_proxy = self.cfg.send_proxy;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(i) = c.server else { return };
        if let Some(up) = &c.upstream {
            let _ = up.set_nodelay(true);
        }
        // With TLS nothing is spliced: no pipes.
        let dirs = if c.tls.is_some() {
            Ok(None)
        } else {
            Direction::new(pipe_size).and_then(|a| Ok(Some((a, Direction::new(pipe_size)?))))
        };
        match dirs {
            Ok(Some((a, b))) => {
                c.c2u = Some(a);
                c.u2c = Some(b);
            }
            Ok(None) => {}
            Err(e) => {
                log!(
                    Level::Warn,
                    "conn {}: cannot create its pipes: {e}; closing",
                    c.id
                );
                self.close(key, "");
                return;
            }
        }
        c.preamble = crate::http::proxy_preamble(send_proxy, c.peer, c.local);
        c.phase = Phase::Relay;
        c.deadline = self.now + self.cfg.idle_timeout;
        self.success(i);
        self.relay(key);
    }

    fn relay(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match c.relay(TURN_BUDGET) {
            RelayStep::Open { moved, more } => {
                if moved > 0 {
                    c.deadline = self.now + self.cfg.idle_timeout;
                }
                if more {
                    self.again.push(key);
                }
                self.schedule(key);
            }
            RelayStep::Finished => self.close(key, "done"),
            RelayStep::Failed(side, e) => {
                let (id, peer, server, got) = (c.id, c.peer, c.server, c.totals().1);
                let who = match side {
                    Side::Client => "client",
                    Side::Upstream => "upstream",
                };
                // An upstream that resets before answering anything failed;
                // one that resets later may merely have closed an idle
                // connection.
                if let (Side::Upstream, Some(i), 0) = (side, server, got) {
                    let why = format!("{} reset before answering: {e}", self.upstreams[i].name);
                    self.failure(i, &why);
                }
                log!(Level::Info, "conn {id} from {peer}: {who} I/O error: {e}");
                self.close(key, "error");
            }
        }
    }

    pub(crate) fn failure(&mut self, i: usize, why: &str) {
        let Some(slot) = self.shared.slot(i) else {
            return;
        };
        let t = health::on_failure(&self.rules, slot, now_ms());
        self.report(i, t, why);
    }

    pub(crate) fn success(&mut self, i: usize) {
        let Some(slot) = self.shared.slot(i) else {
            return;
        };
        let t = health::on_success(&self.rules, slot);
        self.report(i, t, "a connection succeeded");
    }

    /// Logs a transition this worker made (exactly one worker makes each).
    fn report(&self, i: usize, t: Option<Transition>, why: &str) {
        let u = &self.upstreams[i];
        match t {
            Some(Transition::Down { fails, retry_ms }) => {
                let back = if self.rules.active {
                    "back when a health check passes".to_string()
                } else {
                    format!(
                        "tried again in {}",
                        humantime::format_duration(Duration::from_millis(retry_ms))
                    )
                };
                log!(
                    Level::Warn,
                    "upstream {} down after {fails} consecutive failure(s) (last: {why}); {back}",
                    u.name
                );
            }
            Some(Transition::Up) => log!(Level::Info, "upstream {} up ({why})", u.name),
            None => {}
        }
    }

    /// With TLS: close_notify to `key`'s client, best effort.
    fn close_notify(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            c.close_notify();
        }
    }

    fn close(&mut self, key: usize, why: &str) {
        if !self.conns.contains(key) {
            return;
        }
        let c = self.conns.remove(key);
        if let Some(i) = c.server {
            self.outstanding[i] = self.outstanding[i].saturating_sub(1);
        }
        if !why.is_empty() {
            let (up, down) = c.totals();
            let server = c.server.map_or("-", |i| self.upstreams[i].name.as_str());
            log!(
                Level::Info,
                "conn {} from {} via {server}: {why}, {up} bytes up, {down} bytes down, {} ms",
                c.id,
                c.peer,
                self.now.saturating_duration_since(c.started).as_millis()
            );
        }
        self.done.push(c.id);
        // Dropping `c` closes both sockets and the pipes.
    }

    /// Acts on every deadline that passed.
    fn expire(&mut self) {
        let now = self.now;
        if let Some(d) = self.drain_deadline {
            let open = self.conns.len() + self.http.clients.len();
            if now >= d && open > 0 {
                log!(
                    Level::Warn,
                    "drain timeout: closing {open} connection(s) still open"
                );
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for k in keys {
                    self.close_notify(k);
                    self.close(k, "drain timeout");
                }
                self.http_close_all("drain timeout");
            }
        }
        match self.next_check {
            Some(t) if t <= now => {}
            _ => return,
        }
        let mut next: Option<Instant> = self.http_expire();
        let mut expired = Vec::new();
        for (k, c) in self.conns.iter() {
            if c.deadline <= now {
                expired.push((k, c.phase));
            } else {
                next = earliest(next, Some(c.deadline));
            }
        }
        let mut late_probes = Vec::new();
        for (k, p) in self.probes.iter() {
            if p.deadline <= now {
                late_probes.push(k);
            } else {
                next = earliest(next, Some(p.deadline));
            }
        }
        self.next_check = next.map(|n| n.max(now + TIMER_GRANULARITY));
        for (k, phase) in expired {
            match phase {
                Phase::Header => {
                    if let Some(c) = self.conns.get(k) {
                        log!(
                            Level::Warn,
                            "conn {} from {}: no PROXY header within {}; closing",
                            c.id,
                            c.peer,
                            humantime::format_duration(self.cfg.accept_proxy_timeout)
                        );
                    }
                    self.close(k, "");
                }
                Phase::Handshake => {
                    if let Some(c) = self.conns.get(k) {
                        log!(
                            Level::Warn,
                            "conn {} from {}: TLS handshake not finished within --tls-handshake-timeout {}; closing",
                            c.id,
                            c.peer,
                            humantime::format_duration(self.cfg.tls_handshake_timeout)
                        );
                    }
                    self.close(k, "");
                }
                Phase::Connecting => self.connect_failed(k, "timed out".into()),
                Phase::Relay => {
                    self.close_notify(k);
                    self.close(k, "idle timeout");
                }
            }
        }
        for k in late_probes {
            self.end_probe(k, Some(Verdict::Unhealthy("timed out".into())));
        }
    }

    /// Starts a probe of every server whose lease this worker wins.
    fn start_probes(&mut self) {
        let Some(at) = self.next_probe else { return };
        if self.now < at || self.draining {
            return;
        }
        match self.shared.refresh() {
            Ok(true) => log!(
                Level::Info,
                "another upstream list took the pool's health state over: this worker keeps its own"
            ),
            Ok(false) => {}
            Err(e) => log!(Level::Warn, "shared health state: {e}"),
        }
        let interval = self.cfg.health_interval;
        let interval_ms = interval.as_millis() as u64;
        let now_ms = now_ms();
        for i in 0..self.upstreams.len() {
            if self.probing[i] {
                continue;
            }
            let Some(slot) = self.shared.slot(i) else {
                continue;
            };
            if !slot.try_lease(now_ms, interval_ms) {
                continue;
            }
            let u = &self.upstreams[i];
            let deadline = self.now + self.cfg.health_timeout;
            match Probe::start(
                i,
                u.addr,
                self.cfg.health_check,
                &u.name,
                &self.cfg.health_path,
                deadline,
            ) {
                Ok(p) => {
                    let entry = self.probes.vacant_entry();
                    let key = entry.key();
                    let p = entry.insert(p);
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut p.sock,
                            Token(PROBES + key),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        self.probes.remove(key);
                        continue;
                    }
                    self.probing[i] = true;
                    self.next_check = earliest(self.next_check, Some(deadline));
                }
                Err(e) => {
                    let t = health::on_probe(&self.rules, slot, now_ms, false);
                    self.report(i, t, &format!("health check: connect: {e}"));
                }
            }
        }
        // Try for leases a few times per interval, so that the pool's
        // probes stay close to one per interval whichever worker wins.
        self.next_probe = Some(self.now + (interval / 4).max(TIMER_GRANULARITY));
    }

    fn probe_ready(&mut self, key: usize) {
        let Some(p) = self.probes.get_mut(key) else {
            return;
        };
        match p.drive() {
            Verdict::Wait => {}
            v => self.end_probe(key, Some(v)),
        }
    }

    /// Ends a probe; `verdict` None when abandoned (draining).
    fn end_probe(&mut self, key: usize, verdict: Option<Verdict>) {
        if !self.probes.contains(key) {
            return;
        }
        let p = self.probes.remove(key);
        self.probing[p.server] = false;
        let Some(v) = verdict else { return };
        let Some(slot) = self.shared.slot(p.server) else {
            return;
        };
        let (ok, why) = match v {
            Verdict::Healthy => (true, "health check passed".to_string()),
            Verdict::Unhealthy(w) => (false, format!("health check: {w}")),
            Verdict::Wait => return,
        };
        let t = health::on_probe(&self.rules, slot, now_ms(), ok);
        self.report(p.server, t, &why);
    }

    /// Sends DONE for every connection closed since the last call.
    fn report_done(&mut self) {
        if self.closed {
            self.done.clear();
            return;
        }
        if let Err(e) = self.done.flush(&self.worker) {
            log!(Level::Warn, "cannot report connections done: {e}; draining");
            self.closed = true;
            self.start_drain();
        }
    }
}
