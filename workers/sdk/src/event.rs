//! Plumbing an event-driven worker needs around its poller, written once:
//! drain signals as a readiness event, bounded ACK/DONE sends, and a queue
//! of DONE reports flushed once per loop turn.
//!
//! * [`DrainSignals`]: SIGTERM/SIGINT set a flag and write to an eventfd
//!   whose fd you register with your poller (mio's `SourceFd`, readable).
//!   Not a signalfd: that would have to exist before the sandbox is
//!   applied, which closes every fd it was not told to keep, and seccomp
//!   refuses to create one after; `rt_sigaction` and `eventfd2` it allows.
//! * [`bound_channel_sends`]: the channel stays blocking with a send
//!   timeout rather than non-blocking: [`Worker::poll_events`] receives
//!   with `MSG_DONTWAIT` whatever the mode, but an ACK (or DONE) that
//!   failed with `EAGAIN` because the acceptor is a few messages behind
//!   could not be retried, and the acceptor would give the connection to
//!   another worker. Blocking briefly is the right backpressure; the
//!   timeout bounds it if the acceptor is stuck.
//! * [`DoneQueue`]: connections closed during a turn of the loop, reported
//!   in as few DONE messages as possible at its end.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

use crate::Worker;

/// SIGTERM/SIGINT received so far.
static SEEN: AtomicU32 = AtomicU32::new(0);
/// The last of them.
static LAST: AtomicI32 = AtomicI32::new(0);
/// The eventfd the handler writes to (-1: none yet).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let saved = nix::errno::Errno::last_raw();
    LAST.store(sig, Ordering::SeqCst);
    SEEN.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 valid bytes,
        // as an eventfd takes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    nix::errno::Errno::set_raw(saved);
}

/// SIGTERM and SIGINT as events: see the [module docs](self). One per
/// process.
#[derive(Debug)]
pub struct DrainSignals {
    fd: OwnedFd,
    handled: u32,
}

impl DrainSignals {
    /// Installs the handlers; register [`DrainSignals::as_raw_fd`] for
    /// readability with your poller.
    pub fn install() -> io::Result<DrainSignals> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        // SAFETY: integer arguments only.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if WAKE_FD
            .compare_exchange(-1, raw, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(io::Error::other("drain signals are already installed"));
        }
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            // SAFETY: `on_signal` is async-signal-safe: it stores to
            // atomics, writes to an eventfd and restores errno.
            unsafe { sigaction(sig, &action) }?;
        }
        Ok(DrainSignals { fd, handled: 0 })
    }

    /// The next signal not handled yet (its name), if any. Call it until
    /// None whenever the fd is readable, or on every loop turn (a signal
    /// can land between the poll and the read).
    pub fn take(&mut self) -> Option<&'static str> {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer from our eventfd
        // (non-blocking: EAGAIN when nothing is pending).
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if self.handled == SEEN.load(Ordering::SeqCst) {
            return None;
        }
        self.handled += 1;
        let sig = nix::sys::signal::Signal::try_from(LAST.load(Ordering::SeqCst));
        Some(sig.map_or("?", |s| s.as_str()))
    }
}

impl AsRawFd for DrainSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Leaves the worker's channel blocking with a send timeout of `timeout`
/// (see the [module docs](self)).
pub fn bound_channel_sends(worker: &Worker, timeout: Duration) -> io::Result<()> {
    worker.set_nonblocking(false)?;
    set_send_timeout(worker.as_fd(), timeout)
}

fn set_send_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval that outlives the call; its size is
    // passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connections closed and not yet reported DONE.
#[derive(Debug, Default)]
pub struct DoneQueue {
    ids: Vec<u64>,
}

impl DoneQueue {
    pub fn push(&mut self, id: u64) {
        self.ids.push(id);
    }

    /// Forgets what is queued (the channel is gone: nobody to tell).
    pub fn clear(&mut self) {
        self.ids.clear();
    }

    /// Sends DONE for everything queued, batched. A send that timed out
    /// keeps the rest for the next call; any other error means the channel
    /// is broken (the queue is cleared, and the caller drains).
    pub fn flush(&mut self, worker: &Worker) -> io::Result<()> {
        let mut sent = 0;
        let mut result = Ok(());
        for chunk in self.ids.chunks(crate::proto::MAX_IDS) {
            match worker.done_many(chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.ids.drain(..sent);
        if result.is_err() {
            self.ids.clear();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_an_event() {
        let mut s = DrainSignals::install().unwrap();
        assert_eq!(s.take(), None);
        assert!(DrainSignals::install().is_err(), "one per process");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            // SAFETY: the eventfd lives as long as `s`.
            unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) },
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)),
            Ok(1)
        );
        assert_eq!(s.take(), Some("SIGTERM"));
        assert_eq!(s.take(), None);
    }
}
