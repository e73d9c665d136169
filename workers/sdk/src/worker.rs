//! The worker side of the handoff: say hello, receive connections,
//! acknowledge them before the application sees them, report them done.
//!
//! Two ways to drive it:
//!
//! * blocking: [`Worker::recv`] returns one [`Event`] at a time;
//! * event-driven: register [`Worker::as_raw_fd`] with your poller (mio's
//!   `SourceFd`), call [`Worker::set_nonblocking`], and on readiness call
//!   [`Worker::poll_events`], which drains every queued message and sends one
//!   ACK for the whole batch.
//!
//! Either way the ACK for a connection is on its way to the acceptor before
//! the connection is returned, so a crash after that point is the
//! application's, and a crash before it lets the acceptor give the
//! connection to another worker.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::channel::{Channel, RecvError};
use crate::proto::{ConnInfo, HelloFlags, Msg, Parked, ProtoError, CHANNEL_FD_ENV, MAX_BATCH};

/// Errors of the worker library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{CHANNEL_FD_ENV} is not set: this worker must be started by baton, or use --register PATH"
    )]
    NoChannel,
    #[error("{CHANNEL_FD_ENV}={0:?} is not a file descriptor number")]
    BadChannelVar(String),
    #[error("inherited channel fd {fd} is unusable: {source}")]
    BadChannelFd { fd: RawFd, source: io::Error },
    #[error("cannot connect to the worker socket {path}: {source}")]
    Register { path: String, source: io::Error },
    #[error("channel I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("acceptor broke the protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("acceptor answered HELLO with {0:?} instead of WELCOME")]
    NoWelcome(Box<Msg>),
    #[error("the acceptor closed the channel")]
    Closed,
    /// The acceptor closed the channel instead of answering HELLO: it
    /// refused this worker (its log says why: in a pool with TLS, a worker
    /// that did not say it terminates TLS is refused) or is stopping.
    #[error("the acceptor closed the channel before WELCOME: it refused this worker (its log says why; a pool with TLS takes only workers that say they terminate TLS) or is stopping")]
    Refused,
    /// The sandbox the acceptor asked for could not be applied: the worker
    /// must not start (exit with [`Error::exit_code`]).
    #[error("{0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Exit status of a worker whose sandbox could not be applied (EX_CONFIG).
/// The acceptor does not restart a worker that exits with it: the same
/// profile would fail the same way.
pub const EXIT_SANDBOX: u8 = 78;

impl Error {
    /// The exit status a worker should end with after this error:
    /// [`EXIT_SANDBOX`] for a sandbox failure, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Sandbox(_) => EXIT_SANDBOX,
            _ => 1,
        }
    }
}

impl From<RecvError> for Error {
    fn from(e: RecvError) -> Error {
        match e {
            RecvError::Io(e) => Error::Io(e),
            RecvError::Proto(p) => Error::Proto(p),
            RecvError::FdDropped { msg, .. } => {
                Error::Proto(ProtoError::UnknownKind(msg.kind() as u8))
            }
        }
    }
}

/// A connection handed over by the acceptor, already acknowledged.
#[derive(Debug)]
pub struct Connection {
    /// The id to report in [`Worker::done`].
    pub id: u64,
    /// Index of the acceptor's listener that accepted it.
    pub listener: u16,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The client socket. It arrives in non-blocking mode (the acceptor
    /// accepted it that way); blocking workers call `set_nonblocking(false)`.
    pub stream: TcpStream,
}

impl Connection {
    fn new(info: ConnInfo, fd: OwnedFd) -> Connection {
        Connection {
            id: info.id,
            listener: info.listener,
            peer: info.peer,
            local: info.local,
            stream: TcpStream::from(fd),
        }
    }

    /// What the acceptor said of this connection (for [`Worker::park`]).
    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            id: self.id,
            listener: self.listener,
            peer: self.peer,
            local: self.local,
        }
    }
}

/// What the acceptor asked of this worker.
#[derive(Debug)]
pub enum Event {
    Conn(Connection),
    /// Take no new work; finish the connections you have, then exit.
    Drain,
    /// The acceptor went away: finish up and exit.
    Closed,
}

/// A cheap, thread-safe handle for reporting connections done from any
/// thread (SEQPACKET sends are atomic, so threads never interleave bytes).
#[derive(Debug, Clone)]
pub struct DoneSender {
    chan: Arc<Channel>,
}

impl DoneSender {
    /// Reports one connection closed.
    pub fn done(&self, id: u64) -> io::Result<()> {
        send_reliably(&self.chan, &Msg::Done(vec![id]))
    }

    /// Reports many connections closed, in as few messages as possible.
    pub fn done_many(&self, ids: &[u64]) -> io::Result<()> {
        for m in Msg::id_batches(ids, true) {
            send_reliably(&self.chan, &m)?;
        }
        Ok(())
    }
}

/// The worker's end of its channel to the acceptor.
#[derive(Debug)]
pub struct Worker {
    chan: Arc<Channel>,
    id: u32,
    /// What it announced in HELLO.
    capacity: u32,
    queued: VecDeque<Event>,
    closed: bool,
    /// CONNs that arrived without their fd, to acknowledge and report done.
    dropped: Vec<u64>,
}

/// How a worker joins its pool: what its HELLO says. Made by
/// [`Worker::join`]; ends with [`Join::from_env`] (spawned by baton) or
/// [`Join::register`] (`--worker-socket`).
///
/// ```no_run
/// # fn tls_bundle_given() -> bool { true }
/// // A worker that terminates TLS with the bundle baton gave it.
/// let w = baton_sdk::Worker::join(0)
///     .fds_per_conn(2)
///     .terminates_tls(tls_bundle_given())
///     .from_env()?;
/// # Ok::<(), baton_sdk::Error>(())
/// ```
/// Set (to `1`) by an acceptor that reads the HELLO flags, in the
/// environment of the workers it spawns. [`Join::from_env`] sends flags
/// only when it is there: an older acceptor refuses any set bit, and a
/// worker of a TLS pool it spawned must still join it.
pub const HELLO_FLAGS_ENV: &str = "BATON_HELLO_FLAGS";

#[derive(Debug, Clone)]
#[must_use = "a Join does nothing until from_env() or register()"]
pub struct Join {
    capacity: u32,
    fds_per_conn: u32,
    flags: HelloFlags,
}

impl Join {
    /// The fds it needs per connection (1 unless set): the capacity it
    /// announces fits its fd limit at that rate (see [`fd_capacity`]).
    pub fn fds_per_conn(mut self, n: u32) -> Join {
        self.fds_per_conn = n;
        self
    }

    /// Says in HELLO ([`crate::proto::FLAG_TLS`]) that this worker
    /// terminates TLS, with the bundle the acceptor gave it
    /// (`baton_tls::bundle::from_env()` returned `Some`), on every
    /// connection. A pool with TLS refuses a worker that does not say so;
    /// pass `true` only when the bundle was taken and is used.
    pub fn terminates_tls(mut self, yes: bool) -> Join {
        self.flags = self.flags.with_tls(yes);
        self
    }

    /// The flags its HELLO will carry.
    pub fn flags(&self) -> HelloFlags {
        self.flags
    }

    /// Joins through the channel a spawning acceptor passed in
    /// [`CHANNEL_FD_ENV`]; see [`Worker::from_env`] (the sandbox is applied
    /// first).
    pub fn from_env(mut self) -> Result<Worker, Error> {
        // An acceptor built before the HELLO flags refuses any set bit:
        // the flags go out only to one that says it reads them.
        if std::env::var_os(HELLO_FLAGS_ENV).is_none() {
            self.flags = HelloFlags::NONE;
        }
        std::env::remove_var(HELLO_FLAGS_ENV);
        if let Some(applied) = crate::sandbox::apply_from_env()? {
            for note in &applied.notes {
                crate::log::line(
                    crate::log::Level::Info,
                    "worker",
                    format_args!("sandbox: {note}"),
                );
            }
        }
        let (fd, owned) = match take_env_fd(CHANNEL_FD_ENV) {
            None => return Err(Error::NoChannel),
            Some(Err(EnvFdError::BadVar(v))) => return Err(Error::BadChannelVar(v)),
            Some(Err(EnvFdError::BadFd(fd, source))) => {
                return Err(Error::BadChannelFd { fd, source })
            }
            Some(Ok(taken)) => taken,
        };
        // Mark it close-on-exec so that anything this worker runs does not
        // inherit the acceptor's channel.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let chan = Channel::from_fd(owned).map_err(|source| Error::BadChannelFd { fd, source })?;
        Worker::handshake(chan, &self)
    }

    /// Connects to an acceptor's worker socket (`--worker-socket`) and
    /// joins its pool; see [`Worker::register`].
    pub fn register(self, path: &Path) -> Result<Worker, Error> {
        let chan = Channel::connect(path).map_err(|source| Error::Register {
            path: path.display().to_string(),
            source,
        })?;
        Worker::handshake(chan, &self)
    }
}

impl Worker {
    /// How this worker joins, for what the shortcuts below do not say
    /// (the HELLO flags): `Worker::join(capacity).terminates_tls(true)
    /// .from_env()`.
    pub fn join(capacity: u32) -> Join {
        Join {
            capacity,
            fds_per_conn: 1,
            flags: HelloFlags::NONE,
        }
    }

    /// Takes the channel a spawning acceptor passed in [`CHANNEL_FD_ENV`],
    /// says HELLO with `capacity` (0: the acceptor's `--worker-connections`
    /// alone limits it) and waits for WELCOME.
    ///
    /// First of all it applies the sandbox the acceptor passed in
    /// `BATON_SANDBOX` ([`crate::sandbox::apply_from_env`]), so call it
    /// before the worker starts a thread or opens a file. What the sandbox
    /// skipped is reported on stderr.
    ///
    /// Its HELLO does not say the worker terminates TLS, so a pool with
    /// TLS refuses it ([`Error::Refused`]); a worker that does uses
    /// [`Worker::join`] and [`Join::terminates_tls`].
    pub fn from_env(capacity: u32) -> Result<Worker, Error> {
        Worker::join(capacity).from_env()
    }

    /// Like [`Worker::from_env`], for a worker that needs `fds_per_conn`
    /// fds per connection (2 for one that opens a file per request): the
    /// capacity it announces fits its fd limit at that rate.
    pub fn from_env_per_conn(capacity: u32, fds_per_conn: u32) -> Result<Worker, Error> {
        Worker::join(capacity).fds_per_conn(fds_per_conn).from_env()
    }

    /// Connects to an acceptor's worker socket (`--worker-socket`) and joins
    /// its pool; the acceptor never restarts a worker that registered itself.
    pub fn register(path: &Path, capacity: u32) -> Result<Worker, Error> {
        Worker::join(capacity).register(path)
    }

    /// Like [`Worker::register`], with `fds_per_conn` as in
    /// [`Worker::from_env_per_conn`].
    pub fn register_per_conn(
        path: &Path,
        capacity: u32,
        fds_per_conn: u32,
    ) -> Result<Worker, Error> {
        Worker::join(capacity)
            .fds_per_conn(fds_per_conn)
            .register(path)
    }

    fn handshake(chan: Channel, j: &Join) -> Result<Worker, Error> {
        chan.set_nonblocking(false)?;
        let capacity = fit_capacity(j.capacity, fd_capacity(j.fds_per_conn));
        chan.send(
            &Msg::Hello {
                pid: std::process::id(),
                capacity,
                flags: j.flags,
            },
            None,
        )?;
        // EOF (or a reset) instead of WELCOME: the acceptor refused the
        // HELLO.
        let r = match chan.recv() {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Error::Refused),
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(Error::Refused)
            }
            Err(e) => return Err(e.into()),
        };
        let id = match r.msg {
            Msg::Welcome { worker_id } => worker_id,
            other => return Err(Error::NoWelcome(Box::new(other))),
        };
        // The acceptor chose the version (decode() checked it is one we
        // speak): everything from now on is in it.
        chan.set_version(r.version);
        Ok(Worker {
            chan: Arc::new(chan),
            id,
            capacity,
            queued: VecDeque::new(),
            closed: false,
            dropped: Vec::new(),
        })
    }

    /// The capacity this worker announced in its HELLO: what it asked for,
    /// lowered to what its fd limit can hold (see [`fd_capacity`]).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The protocol version agreed with the acceptor.
    pub fn version(&self) -> u8 {
        self.chan.version()
    }

    /// Whether the acceptor takes parked connections (version 2).
    pub fn can_park(&self) -> bool {
        self.chan.version() >= 2 && !self.closed
    }

    /// Hands idle keep-alive connections back to the acceptor (PARK): each
    /// with what the acceptor said of it, the milliseconds left of its idle
    /// timeout, and its fd. Only for a connection whose response is fully
    /// written and of which nothing is buffered; after `Ok`, the acceptor
    /// holds it and the worker closes its own copy and does not report it
    /// DONE. Deregister it from your poller first: the acceptor's copy keeps
    /// it open, so an epoll registration would outlive the close.
    ///
    /// On error nothing was parked past the first failed batch: the worker
    /// still owns those connections (serve or close them, and report them
    /// DONE).
    pub fn park(&self, conns: &[(Parked, BorrowedFd<'_>)]) -> io::Result<()> {
        if self.chan.version() < 2 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the acceptor speaks protocol version 1: no parking",
            ));
        }
        for chunk in conns.chunks(MAX_BATCH) {
            let msg = Msg::Park(chunk.iter().map(|(p, _)| *p).collect());
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
            send_reliably_fds(&self.chan, &msg, &fds)?;
        }
        Ok(())
    }

    /// This worker's id in the acceptor's pool.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle for reporting connections done from other threads.
    pub fn done_sender(&self) -> DoneSender {
        DoneSender {
            chan: self.chan.clone(),
        }
    }

    /// Reports one connection closed.
    pub fn done(&self, id: u64) -> io::Result<()> {
        self.done_sender().done(id)
    }

    /// Reports many connections closed, batched.
    pub fn done_many(&self, ids: &[u64]) -> io::Result<()> {
        self.done_sender().done_many(ids)
    }

    /// Puts the channel in non-blocking mode, for [`Worker::poll_events`].
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.chan.set_nonblocking(nonblocking)
    }

    /// Blocks until the next event.
    pub fn recv(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(ev) = self.queued.pop_front() {
                return Ok(ev);
            }
            if self.closed {
                return Ok(Event::Closed);
            }
            // Block for one message, then take whatever else is already
            // queued so that one ACK covers the batch.
            let mut batch = Vec::new();
            let read = self.read_one(true, &mut batch);
            let read = read.and_then(|_| self.drain_nonblocking(&mut batch));
            let settled = self.settle(&mut batch, 0);
            self.queued.extend(batch);
            read?;
            settled?;
        }
    }

    /// Non-blocking: appends every event that is queued on the channel to
    /// `out`, after acknowledging every connection among them. Returns
    /// without error when nothing is queued.
    ///
    /// A connection whose ACK could not be sent is not returned (its fd is
    /// closed): the acceptor still owns it and gives it to another worker.
    /// If the acceptor is gone, [`Event::Closed`] follows.
    pub fn poll_events(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        out.extend(self.queued.drain(..));
        if self.closed {
            return Ok(());
        }
        let start = out.len();
        let read = self.drain_nonblocking(out);
        self.settle(out, start)?;
        read
    }

    fn drain_nonblocking(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        while !self.closed && self.read_one(false, out)? {}
        Ok(())
    }

    /// Receives one message into `out`. Returns false when nothing is
    /// queued (non-blocking only).
    fn read_one(&mut self, blocking: bool, out: &mut Vec<Event>) -> Result<bool, Error> {
        let r = if blocking {
            self.chan.recv()
        } else {
            self.chan.try_recv()
        };
        match r {
            Ok(r) => {
                self.take(r, out)?;
                Ok(true)
            }
            Err(e) if e.would_block() => Ok(false),
            // The acceptor went away with messages of ours unread. What it
            // had queued for us before that is still readable (CONNs among
            // them), and EOF follows: keep reading.
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
            // This process is at its fd limit: that one connection is lost
            // (acknowledged and reported done at once, so that the acceptor
            // closes its copy and the client is not left hanging), the
            // channel goes on.
            Err(RecvError::FdDropped { msg, fds }) => {
                let infos = match *msg {
                    Msg::Conn(info) => vec![info],
                    Msg::Conns(infos) => infos,
                    other => return Err(Error::Proto(ProtoError::UnknownKind(other.kind() as u8))),
                };
                // The kernel installs fds in order: the first ones arrived.
                let got = fds.len();
                for (info, fd) in infos.iter().zip(fds) {
                    out.push(Event::Conn(Connection::new(*info, fd)));
                }
                self.dropped.extend(infos[got..].iter().map(|i| i.id));
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn take(
        &mut self,
        r: Option<crate::channel::Received>,
        out: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let Some(r) = r else {
            self.closed = true;
            out.push(Event::Closed);
            return Ok(());
        };
        // decode() already checked that the fds match the records.
        match r.msg {
            Msg::Conn(info) => {
                for fd in r.fds {
                    out.push(Event::Conn(Connection::new(info, fd)));
                }
            }
            Msg::Conns(infos) => {
                for (info, fd) in infos.into_iter().zip(r.fds) {
                    out.push(Event::Conn(Connection::new(info, fd)));
                }
            }
            Msg::Drain => out.push(Event::Drain),
            // Anything else is a kind only a worker may send.
            other => {
                return Err(Error::Proto(ProtoError::UnknownKind(other.kind() as u8)));
            }
        }
        Ok(())
    }

    /// Acknowledges the connections in `events[start..]`; the ones whose
    /// ACK could not be sent are removed (and closed). Reports connections
    /// whose fd never arrived.
    fn settle(&mut self, events: &mut Vec<Event>, start: usize) -> Result<(), Error> {
        if !self.dropped.is_empty() {
            let ids = std::mem::take(&mut self.dropped);
            crate::log::line(
                crate::log::Level::Warn,
                "worker",
                format_args!(
                    "{} connection(s) arrived without their fd (this process is at its fd limit); closed",
                    ids.len()
                ),
            );
            // Best effort: if the channel is gone, so is the acceptor's copy.
            let _ =
                send_ids(&self.chan, &ids, false).and_then(|_| send_ids(&self.chan, &ids, true));
        }
        let ids: Vec<u64> = events[start..]
            .iter()
            .filter_map(|e| match e {
                Event::Conn(c) => Some(c.id),
                _ => None,
            })
            .collect();
        let Err((acked, e)) = send_ids(&self.chan, &ids, false) else {
            return Ok(());
        };
        // Never serve what the acceptor was not told we own: it may give
        // those to another worker.
        let keep: std::collections::HashSet<u64> = ids[..acked].iter().copied().collect();
        let mut idx = 0;
        events.retain(|ev| {
            let kept = idx < start || !matches!(ev, Event::Conn(c) if !keep.contains(&c.id));
            idx += 1;
            kept
        });
        if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
        ) {
            // The acceptor is gone, or took this channel back.
            if !self.closed {
                self.closed = true;
                events.push(Event::Closed);
            }
            return Ok(());
        }
        Err(Error::Io(e))
    }
}

/// Why the fd an environment variable names cannot be taken.
#[derive(Debug)]
pub(crate) enum EnvFdError {
    /// The value is not a number above 2.
    BadVar(String),
    /// That fd is not open.
    BadFd(RawFd, io::Error),
}

/// Takes ownership of the inherited fd whose number is in `var` (above 2,
/// open), and removes the variable so that nothing else in the process
/// claims it too. None when the variable is not set.
pub(crate) fn take_env_fd(var: &str) -> Option<Result<(RawFd, OwnedFd), EnvFdError>> {
    let value = std::env::var(var).ok()?;
    let Some(fd) = value.trim().parse::<RawFd>().ok().filter(|fd| *fd > 2) else {
        return Some(Err(EnvFdError::BadVar(value)));
    };
    // Refuse anything that is not an open fd before taking ownership.
    if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) {
        return Some(Err(EnvFdError::BadFd(fd, e.into())));
    }
    // SAFETY: the fd is open (F_GETFD succeeded) and was passed to this
    // process for the sole use of the caller; the variable is removed so
    // that nothing else claims it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    std::env::remove_var(var);
    Some(Ok((fd, owned)))
}

/// Sends `ids` as ACK (or DONE) messages of at most [`crate::proto::MAX_IDS`]. On error,
/// says how many ids went out before it.
fn send_ids(chan: &Channel, ids: &[u64], done: bool) -> Result<(), (usize, io::Error)> {
    let mut sent = 0;
    for m in Msg::id_batches(ids, done) {
        let n = match &m {
            Msg::Ack(v) | Msg::Done(v) => v.len(),
            _ => 0,
        };
        send_reliably(chan, &m).map_err(|e| (sent, e))?;
        sent += n;
    }
    Ok(())
}

/// Fds a worker keeps for itself (its channel, stdio, logs, a file or two)
/// beyond one per connection.
const FD_MARGIN: u64 = 16;

/// How many connections this process can hold within its `RLIMIT_NOFILE`
/// (soft limit), given the fds already open and `fds_per_conn` fds per
/// connection (1 for the socket; 2 for a worker that opens a file per
/// request). None when the limit is infinite. At least 1.
///
/// A worker must not announce more than this: past its fd limit the kernel
/// drops the fd of the next CONN (see [`RecvError::FdDropped`]).
pub fn fd_capacity(fds_per_conn: u32) -> Option<u32> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft == RLIM_INFINITY {
        return None;
    }
    // Under a chroot /proc may be missing; the sandbox has closed every fd
    // but a few by then.
    let open = std::fs::read_dir("/proc/self/fd").map_or(8, |d| d.count() as u64);
    let room = soft.saturating_sub(open + FD_MARGIN) / u64::from(fds_per_conn.max(1));
    Some(room.clamp(1, u64::from(u32::MAX)) as u32)
}

/// The capacity to announce: the one asked for (0: none of its own), never
/// more than the fd limit allows.
fn fit_capacity(asked: u32, fd_room: Option<u32>) -> u32 {
    match (asked, fd_room) {
        (0, Some(room)) => room,
        (asked, Some(room)) => asked.min(room),
        (asked, None) => asked,
    }
}

/// How long an ACK or DONE may wait for room in the channel before the
/// worker gives up on the acceptor.
const SEND_TIMEOUT_MS: u16 = 5000;

/// Sends an ACK or DONE even on a non-blocking channel: when the acceptor
/// is behind and the socket buffer is full, waits (bounded) for room
/// instead of failing. Losing an ACK would make the acceptor hand the same
/// connections to another worker.
fn send_reliably(chan: &Channel, msg: &Msg) -> io::Result<()> {
    send_reliably_fds(chan, msg, &[])
}

/// [`send_reliably`] with fds attached.
fn send_reliably_fds(chan: &Channel, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        match chan.send_fds(msg, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(SEND_TIMEOUT_MS)) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the acceptor has not read its channel for 5 s",
                        ))
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            other => return other,
        }
    }
}

impl std::os::fd::AsFd for Worker {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.chan.as_fd()
    }
}

impl AsRawFd for Worker {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn worker(chan: Channel) -> Worker {
        Worker {
            chan: Arc::new(chan),
            id: 1,
            capacity: 0,
            queued: VecDeque::new(),
            closed: false,
            dropped: Vec::new(),
        }
    }

    fn conn_msg(id: u64) -> Msg {
        Msg::Conn(crate::proto::ConnInfo {
            id,
            listener: 0,
            peer: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:2".parse().unwrap(),
        })
    }

    #[test]
    fn a_connection_whose_ack_cannot_be_sent_is_never_returned() {
        // The acceptor sends a CONN, then takes the channel back
        // (shutdown) before the worker acknowledges it: the worker must not
        // serve it, because the acceptor gives it to another worker.
        let (acceptor, w) = Channel::pair().unwrap();
        let (_client, sock) = std::os::unix::net::UnixStream::pair().unwrap();
        acceptor.send(&conn_msg(7), Some(sock.as_fd())).unwrap();
        nix::sys::socket::shutdown(acceptor.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
        let mut w = worker(w);
        let mut out = Vec::new();
        w.poll_events(&mut out)
            .expect("a revoked channel is not an error");
        assert!(
            !out.iter().any(|e| matches!(e, Event::Conn(_))),
            "unacknowledged connection returned: {out:?}"
        );
        assert!(matches!(out.last(), Some(Event::Closed)), "{out:?}");
    }

    #[test]
    fn queued_connections_are_read_after_the_acceptor_vanished() {
        // The acceptor queued a CONN, then died with an ACK of ours unread:
        // the worker's next read reports ECONNRESET first. The CONN is
        // still delivered (the worker cannot ACK it any more, so it is not
        // served), and Closed follows instead of an error.
        let (acceptor, w) = Channel::pair().unwrap();
        let mut w = worker(w);
        let (_client, sock) = std::os::unix::net::UnixStream::pair().unwrap();
        w.chan.send(&Msg::Ack(vec![1]), None).unwrap();
        acceptor.send(&conn_msg(9), Some(sock.as_fd())).unwrap();
        drop(acceptor);
        match w.recv() {
            Ok(Event::Closed) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn capacity_never_exceeds_the_fd_limit() {
        assert_eq!(fit_capacity(0, Some(200)), 200);
        assert_eq!(fit_capacity(1024, Some(200)), 200);
        assert_eq!(fit_capacity(50, Some(200)), 50);
        assert_eq!(fit_capacity(0, None), 0);
        let room = fd_capacity(1).expect("a finite fd limit");
        assert!(room >= 1);
        assert!(fd_capacity(2).unwrap() <= room);
    }

    #[test]
    fn acks_and_dones_survive_a_full_channel() {
        // The worker's end is non-blocking, as an event-driven worker sets
        // it; the acceptor reads slower than the worker writes.
        let (acceptor, worker) = Channel::pair().unwrap();
        let n = 20_000u64;
        let reader = std::thread::spawn(move || {
            acceptor.set_nonblocking(false).unwrap();
            let mut got = 0u64;
            while got < n {
                match acceptor.recv().unwrap() {
                    Some(r) => match r.msg {
                        Msg::Done(ids) => got += ids.len() as u64,
                        other => panic!("unexpected {other:?}"),
                    },
                    None => break,
                }
            }
            got
        });
        for id in 0..n {
            send_reliably(&worker, &Msg::Done(vec![id])).expect("never lost");
        }
        assert_eq!(reader.join().unwrap(), n);
    }
}
