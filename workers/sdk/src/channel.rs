//! A SOCK_SEQPACKET channel that sends and receives [`proto`](crate::proto)
//! messages with their file descriptors.
//!
//! Both sides use this type: the acceptor on its non-blocking end, a worker
//! usually on a blocking one. Each OS call is wrapped once here.
//!
//! We call `sendmsg`/`recvmsg` through nix rather than the `sendfd` crate:
//! the protocol needs `MSG_CMSG_CLOEXEC` on receive and must see
//! `MSG_CTRUNC`/`MSG_TRUNC` to refuse truncated messages, and `sendfd`'s
//! receive passes no flags and reports neither.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

use crate::proto::{self, Msg, ProtoError, MAX_MSG};

/// Why receiving a message failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The OS call failed (`WouldBlock` on a non-blocking channel with
    /// nothing queued).
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something the protocol refuses; the channel is unusable.
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
}

impl RecvError {
    pub fn would_block(&self) -> bool {
        matches!(self, RecvError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One received message, with the fd it carried (only CONN carries one).
#[derive(Debug)]
pub struct Received {
    pub msg: Msg,
    pub fd: Option<OwnedFd>,
}

/// One end of a handoff channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// How many fds the receive buffer has room for: the kernel's SCM_MAX_FD,
/// the most one message can carry. With that room the kernel never
/// truncates SCM_RIGHTS, so every fd a peer sends is owned here and closed,
/// and a peer sending extras cannot leak fds into this process.
const RECV_FDS: usize = 253;

impl Channel {
    /// A connected pair, both ends close-on-exec and non-blocking.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an fd that must be a connected `AF_UNIX` `SOCK_SEQPACKET`
    /// socket; anything else is refused with `InvalidInput`.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        let ty = socket::getsockopt(&fd, socket::sockopt::SockType).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("not a socket: {e}"))
        })?;
        if ty != SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("channel is a {ty:?} socket, expected SeqPacket"),
            ));
        }
        Ok(Channel { fd })
    }

    /// Connects to a listening SEQPACKET socket at `path` (blocking, close-on-exec).
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        socket::connect(fd.as_raw_fd(), &addr)?;
        Ok(Channel { fd })
    }

    /// Switches the channel between blocking and non-blocking mode.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let raw = self.fd.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
        let flags = if nonblocking {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(raw, FcntlArg::F_SETFL(flags))?;
        Ok(())
    }

    /// Sends one message, with `fd` attached when the kind carries one.
    /// Never raises SIGPIPE; a closed peer is `BrokenPipe`.
    pub fn send(&self, msg: &Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        debug_assert_eq!(msg.kind().fd_count(), usize::from(fd.is_some()));
        let mut buf = [0u8; MAX_MSG];
        let n = proto::encode(msg, &mut buf);
        let iov = [io::IoSlice::new(&buf[..n])];
        let raw: [RawFd; 1];
        let cmsg_storage;
        let cmsgs: &[ControlMessage] = match fd {
            Some(fd) => {
                raw = [fd.as_raw_fd()];
                cmsg_storage = [ControlMessage::ScmRights(&raw)];
                &cmsg_storage
            }
            None => &[],
        };
        loop {
            match socket::sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(sent) if sent == n => return Ok(()),
                Ok(sent) => {
                    // SEQPACKET sends are atomic; a short count means the
                    // kernel broke that promise, which we refuse to paper over.
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short sendmsg: {sent} of {n} bytes"),
                    ));
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one message. `Ok(None)` means the peer closed the channel.
    ///
    /// Every fd that arrives is owned (and closed on drop) before any check,
    /// so a peer sending extra fds cannot leak them into this process.
    pub fn recv(&self) -> Result<Option<Received>, RecvError> {
        self.recv_flags(MsgFlags::empty())
    }

    /// Like [`Channel::recv`] but never blocks, whatever the channel's mode:
    /// `WouldBlock` when nothing is queued.
    pub fn try_recv(&self) -> Result<Option<Received>, RecvError> {
        self.recv_flags(MsgFlags::MSG_DONTWAIT)
    }

    fn recv_flags(&self, extra: MsgFlags) -> Result<Option<Received>, RecvError> {
        let mut buf = [0u8; MAX_MSG + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; RECV_FDS]);
        let (bytes, flags, mut fds) = loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            match socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | extra,
            ) {
                Ok(r) => {
                    let mut fds: Vec<OwnedFd> = Vec::new();
                    // cmsgs() fails only on MSG_CTRUNC, which the buffer's size
                    // rules out for SCM_RIGHTS (see RECV_FDS).
                    let Ok(cmsgs) = r.cmsgs() else {
                        return Err(ProtoError::Truncated.into());
                    };
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raws) = c {
                            for raw in raws {
                                // SAFETY: the kernel just installed `raw` in our
                                // fd table for this message; nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                            }
                        }
                    }
                    break (r.bytes, r.flags, fds);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(RecvError::Io(e.into())),
            }
        };
        if flags.intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC) || bytes > MAX_MSG {
            return Err(ProtoError::Truncated.into());
        }
        if bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        let msg = proto::decode(&buf[..bytes], fds.len())?;
        Ok(Some(Received { msg, fd: fds.pop() }))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(c: Channel) -> OwnedFd {
        c.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ConnInfo;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn conn_carries_exactly_its_fd() {
        let (a, b) = Channel::pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        let info = ConnInfo {
            id: 7,
            listener: 0,
            peer: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:2".parse().unwrap(),
        };
        a.send(&Msg::Conn(info), Some(y.as_fd())).unwrap();
        drop(y);
        let r = b.recv().unwrap().unwrap();
        assert_eq!(r.msg, Msg::Conn(info));
        let mut passed = UnixStream::from(r.fd.unwrap());
        x.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        passed.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn wrong_fd_count_and_eof() {
        let (a, b) = Channel::pair().unwrap();
        let (_x, y) = UnixStream::pair().unwrap();
        // A DRAIN with an fd attached: refused, and the fd is not leaked.
        let mut buf = [0u8; MAX_MSG];
        let n = proto::encode(&Msg::Drain, &mut buf);
        let raw = [y.as_raw_fd()];
        socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[io::IoSlice::new(&buf[..n])],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Proto(ProtoError::FdCount { .. }))
        ));
        assert!(b.recv().unwrap_err().would_block());
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn oversized_message_is_truncation() {
        let (a, b) = Channel::pair().unwrap();
        let big = [1u8; MAX_MSG + 100];
        socket::send(a.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Proto(ProtoError::Truncated))
        ));
    }
}
