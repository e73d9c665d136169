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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::channel::{Channel, RecvError};
use crate::proto::{Msg, ProtoError, CHANNEL_FD_ENV, MAX_IDS};

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
    queued: VecDeque<Event>,
    closed: bool,
}

impl Worker {
    /// Takes the channel a spawning acceptor passed in [`CHANNEL_FD_ENV`],
    /// says HELLO with `capacity` (0: the acceptor's `--worker-connections`
    /// alone limits it) and waits for WELCOME.
    ///
    /// First of all it applies the sandbox the acceptor passed in
    /// `BATON_SANDBOX` ([`crate::sandbox::apply_from_env`]), so call it
    /// before the worker starts a thread or opens a file. What the sandbox
    /// skipped is reported on stderr.
    pub fn from_env(capacity: u32) -> Result<Worker, Error> {
        if let Some(applied) = crate::sandbox::apply_from_env()? {
            for note in &applied.notes {
                let line = format!("worker[{}]: sandbox: {note}\n", std::process::id());
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
        }
        let var = std::env::var(CHANNEL_FD_ENV).map_err(|_| Error::NoChannel)?;
        let fd: RawFd = var
            .trim()
            .parse()
            .ok()
            .filter(|fd| *fd > 2)
            .ok_or_else(|| Error::BadChannelVar(var.clone()))?;
        // Refuse anything that is not an open fd before taking ownership.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| Error::BadChannelFd {
            fd,
            source: e.into(),
        })?;
        // SAFETY: the fd is open (F_GETFD succeeded) and was passed to this
        // process for the sole use of the worker library; the variable is
        // removed below so that nothing else in the process claims it too.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        std::env::remove_var(CHANNEL_FD_ENV);
        // Mark it close-on-exec so that anything this worker runs does not
        // inherit the acceptor's channel.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let chan = Channel::from_fd(owned).map_err(|source| Error::BadChannelFd { fd, source })?;
        Worker::handshake(chan, capacity)
    }

    /// Connects to an acceptor's worker socket (`--worker-socket`) and joins
    /// its pool; the acceptor never restarts a worker that registered itself.
    pub fn register(path: &Path, capacity: u32) -> Result<Worker, Error> {
        let chan = Channel::connect(path).map_err(|source| Error::Register {
            path: path.display().to_string(),
            source,
        })?;
        Worker::handshake(chan, capacity)
    }

    fn handshake(chan: Channel, capacity: u32) -> Result<Worker, Error> {
        chan.set_nonblocking(false)?;
        chan.send(
            &Msg::Hello {
                pid: std::process::id(),
                capacity,
            },
            None,
        )?;
        let r = chan.recv()?.ok_or(Error::Closed)?;
        let id = match r.msg {
            Msg::Welcome { worker_id } => worker_id,
            other => return Err(Error::NoWelcome(Box::new(other))),
        };
        Ok(Worker {
            chan: Arc::new(chan),
            id,
            queued: VecDeque::new(),
            closed: false,
        })
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
        if let Some(ev) = self.queued.pop_front() {
            return Ok(ev);
        }
        if self.closed {
            return Ok(Event::Closed);
        }
        // Block for one message, then take whatever else is already queued
        // so that one ACK covers the batch.
        let first = self.chan.recv()?;
        let mut batch = Vec::new();
        self.take(first, &mut batch)?;
        self.drain_nonblocking(&mut batch)?;
        self.ack(&batch)?;
        self.queued.extend(batch);
        Ok(self.queued.pop_front().unwrap_or(Event::Closed))
    }

    /// Non-blocking: appends every event that is queued on the channel to
    /// `out`, after acknowledging every connection among them. Returns
    /// without error when nothing is queued.
    pub fn poll_events(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        out.extend(self.queued.drain(..));
        if self.closed {
            return Ok(());
        }
        let start = out.len();
        self.drain_nonblocking(out)?;
        self.ack(&out[start..])
    }

    fn drain_nonblocking(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        while !self.closed {
            match self.chan.try_recv() {
                Ok(r) => self.take(r, out)?,
                Err(e) if e.would_block() => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
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
        match (r.msg, r.fd) {
            (Msg::Conn(info), Some(fd)) => out.push(Event::Conn(Connection {
                id: info.id,
                listener: info.listener,
                peer: info.peer,
                local: info.local,
                stream: TcpStream::from(fd),
            })),
            (Msg::Drain, None) => out.push(Event::Drain),
            // decode() already checked fd counts; anything else is a kind
            // only a worker may send.
            (other, _) => {
                return Err(Error::Proto(ProtoError::UnknownKind(other.kind() as u8)));
            }
        }
        Ok(())
    }

    fn ack(&self, events: &[Event]) -> Result<(), Error> {
        let ids: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Conn(c) => Some(c.id),
                _ => None,
            })
            .collect();
        for chunk in ids.chunks(MAX_IDS) {
            send_reliably(&self.chan, &Msg::Ack(chunk.to_vec()))?;
        }
        Ok(())
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
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        match chan.send(msg, None) {
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
