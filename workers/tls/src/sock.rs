//! The `SOCK_SEQPACKET` calls of the key channel, each wrapped once.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// Room for the kernel's SCM_MAX_FD: with it, SCM_RIGHTS is never
/// truncated, so every fd a peer sends is owned here and closed.
const RECV_FDS: usize = 253;

/// A connected `SOCK_SEQPACKET` pair, both ends close-on-exec and blocking.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Sends one record, with `fds` attached. `MSG_NOSIGNAL`: a closed peer is
/// `EPIPE`, not a signal.
pub fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_flags(fd, bytes, fds, MsgFlags::MSG_NOSIGNAL)
}

/// Sends one record without waiting: `WouldBlock` when the peer's queue
/// is full.
pub fn send_nonblocking(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    send_flags(
        fd,
        bytes,
        &[],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
    )
}

fn send_flags(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd], flags: MsgFlags) -> io::Result<()> {
    let iov = [io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short send")),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received record.
#[derive(Debug)]
pub struct Record {
    /// Bytes received (0 with no fds: the peer closed).
    pub len: usize,
    /// The record was longer than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    pub fds: Vec<OwnedFd>,
}

/// Receives one record into `buf` (`MSG_CMSG_CLOEXEC`; `MSG_DONTWAIT` when
/// `nonblocking`).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], nonblocking: bool) -> io::Result<Record> {
    let mut cmsg = nix::cmsg_space!([RawFd; RECV_FDS]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = match socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for r in raw {
                        // SAFETY: the kernel just installed `r` in this
                        // process for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
        }
        return Ok(Record {
            len: msg.bytes,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            fds,
        });
    }
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes; `false`
/// on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for any of `fds` to be readable or hung up; returns which.
pub fn wait_any(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<usize>> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    loop {
        match nix::poll::poll(&mut polls, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(polls
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
        .map(|(i, _)| i)
        .collect())
}
