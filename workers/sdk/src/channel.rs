//! A SOCK_SEQPACKET channel that sends and receives [`proto`](crate::proto)
//! messages with their file descriptors.
//!
//! Both sides use this type: the acceptor on its non-blocking end, a worker
//! usually on a blocking one. Each OS call is wrapped once here.
//!
//! We call `sendmsg` through nix and `recvmsg` through libc rather than the
//! `sendfd` crate: the protocol needs `MSG_CMSG_CLOEXEC` on receive and must
//! see `MSG_CTRUNC`/`MSG_TRUNC`, and `sendfd`'s receive passes no flags and
//! reports neither. (nix's receive refuses to walk control messages after
//! `MSG_CTRUNC`, which would leak the fds the kernel did install.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
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
    /// A well-formed message arrived but the kernel could not install every
    /// fd it carried: this process is out of file descriptors. `fds` are
    /// the ones it did install, in order (the first of the message's). Only
    /// that message is affected; the channel is still usable.
    #[error("{msg:?} arrived without all its file descriptors: this process is at its fd limit")]
    FdDropped { msg: Box<Msg>, fds: Vec<OwnedFd> },
}

impl RecvError {
    pub fn would_block(&self) -> bool {
        matches!(self, RecvError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One received message, with the fds it carried (CONN one, CONNS and PARK
/// one per record, in order) and the version in its header.
#[derive(Debug)]
pub struct Received {
    pub msg: Msg,
    pub fds: Vec<OwnedFd>,
    pub version: u8,
}

/// One end of a handoff channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    /// The protocol version agreed in the handshake; 0 until then (every
    /// supported version is received, and [`proto::VERSION`] is sent).
    version: AtomicU8,
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
        Ok((Channel::wrap(a), Channel::wrap(b)))
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
        Ok(Channel::wrap(fd))
    }

    fn wrap(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            version: AtomicU8::new(0),
        }
    }

    /// Records the protocol version agreed in the handshake: messages are
    /// sent with it from now on, and a message of another version is a
    /// protocol violation.
    pub fn set_version(&self, version: u8) {
        self.version.store(version, Ordering::Relaxed);
    }

    /// The agreed version (0 before the handshake).
    pub fn version(&self) -> u8 {
        self.version.load(Ordering::Relaxed)
    }

    /// The version messages go out with: the agreed one, or before the
    /// handshake the highest this library speaks.
    fn send_version(&self) -> u8 {
        match self.version() {
            0 => proto::VERSION,
            v => v,
        }
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
        Ok(Channel::wrap(fd))
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

    /// Shuts the channel down both ways (`shutdown(2)`). The peer's sends
    /// fail with `EPIPE` from then on, while what it had already queued
    /// here can still be received, then EOF: after this, the queue holds
    /// everything the peer will ever have said.
    pub fn shutdown(&self) -> io::Result<()> {
        socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Both)?;
        Ok(())
    }

    /// Sends one message, with `fd` attached when the kind carries one.
    /// Never raises SIGPIPE; a closed peer is `BrokenPipe`.
    pub fn send(&self, msg: &Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        self.send_fds(msg, fd.as_slice())
    }

    /// Sends one message with `fds` attached, in order (as many as the
    /// message has records), in the channel's agreed version. Never raises
    /// SIGPIPE; a closed peer is `BrokenPipe`.
    pub fn send_fds(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        debug_assert_eq!(msg.fd_count(), fds.len());
        let mut buf = [0u8; MAX_MSG];
        let n = proto::encode_v(msg, self.send_version(), &mut buf);
        let iov = [io::IoSlice::new(&buf[..n])];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg_storage;
        let cmsgs: &[ControlMessage] = if raw.is_empty() {
            &[]
        } else {
            cmsg_storage = [ControlMessage::ScmRights(&raw)];
            &cmsg_storage
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
        self.recv_flags(0)
    }

    /// Like [`Channel::recv`] but never blocks, whatever the channel's mode:
    /// `WouldBlock` when nothing is queued.
    pub fn try_recv(&self) -> Result<Option<Received>, RecvError> {
        self.recv_flags(libc::MSG_DONTWAIT)
    }

    fn recv_flags(&self, extra: libc::c_int) -> Result<Option<Received>, RecvError> {
        let mut buf = [0u8; MAX_MSG + 1];
        let (bytes, flags, fds) = recvmsg_fds(self.fd.as_fd(), &mut buf, extra)?;
        if flags & libc::MSG_CTRUNC != 0 {
            // The kernel could not install every fd the message carried:
            // this process is at its fd limit (the buffer has room for the
            // most a message can carry). The fds it did install are owned
            // by `fds`.
            let b = &buf[..bytes.min(MAX_MSG)];
            return match proto::decode(b, proto::kind_fd_count(b)) {
                Ok(msg) if fds.len() < msg.fd_count() => Err(RecvError::FdDropped {
                    msg: Box::new(msg),
                    fds,
                }),
                _ => Err(ProtoError::Truncated.into()),
            };
        }
        if flags & libc::MSG_TRUNC != 0 || bytes > MAX_MSG {
            return Err(ProtoError::Truncated.into());
        }
        if bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        let msg = proto::decode(&buf[..bytes], fds.len())?;
        let version = proto::version_of(&buf[..bytes]);
        let agreed = self.version();
        if agreed != 0 && version != agreed {
            return Err(ProtoError::WrongVersion {
                got: version,
                agreed,
            }
            .into());
        }
        Ok(Some(Received { msg, fds, version }))
    }
}

/// Room for [`RECV_FDS`] descriptors and their header, in u64 words so that
/// the buffer is aligned for `cmsghdr` (CMSG_SPACE(253 * 4) is 1032 bytes on
/// 64-bit Linux; this gives a header's worth more).
const CMSG_WORDS: usize =
    (RECV_FDS * std::mem::size_of::<RawFd>() + 2 * std::mem::size_of::<libc::cmsghdr>()) / 8 + 1;

/// `recvmsg(2)` with `MSG_CMSG_CLOEXEC`, once, retried on EINTR. Returns
/// the byte count, the returned `msg_flags` and every fd that arrived,
/// owned.
///
/// Called directly rather than through nix: nix refuses to walk the control
/// messages when `MSG_CTRUNC` is set, and then the fds the kernel did
/// install would leak. The kernel only ever writes whole `cmsghdr`s, so
/// walking them with `CMSG_FIRSTHDR`/`CMSG_NXTHDR` is safe either way.
fn recvmsg_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    extra: libc::c_int,
) -> io::Result<(usize, libc::c_int, Vec<OwnedFd>)> {
    let mut cbuf = [0u64; CMSG_WORDS];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; the fields
        // set below point at `iov` and `cbuf`, which outlive the call.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: `mh` describes live buffers of the lengths it gives; the
        // kernel writes at most that much into them.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC | extra) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut fds = Vec::new();
        // SAFETY: `mh` is the header the kernel just filled in; its
        // msg_controllen covers only complete control messages it wrote.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&mh) };
        while !c.is_null() {
            // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a
            // pointer to a whole cmsghdr inside `cbuf`.
            let h = unsafe { &*c };
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_DATA points just past the header, inside the
                // same control message.
                let data = unsafe { libc::CMSG_DATA(c) };
                let header = data as usize - c as usize;
                let count =
                    (h.cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: `count` ints fit in this message's data (its
                    // cmsg_len says so); they may be unaligned.
                    let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                    // SAFETY: the kernel just installed `raw` in our fd
                    // table for this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: `c` is a valid header inside `mh`'s control buffer.
            c = unsafe { libc::CMSG_NXTHDR(&mh, c) };
        }
        return Ok((n as usize, mh.msg_flags, fds));
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
        let mut passed = UnixStream::from(r.fds.into_iter().next().unwrap());
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
    fn after_shutdown_the_queue_is_all_the_peer_said() {
        let (a, b) = Channel::pair().unwrap();
        b.send(&Msg::Ack(vec![1]), None).unwrap();
        b.send(&Msg::Done(vec![1]), None).unwrap();
        a.shutdown().unwrap();
        let e = b.send(&Msg::Done(vec![2]), None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        assert_eq!(a.try_recv().unwrap().unwrap().msg, Msg::Ack(vec![1]));
        assert_eq!(a.try_recv().unwrap().unwrap().msg, Msg::Done(vec![1]));
        assert!(a.try_recv().unwrap().is_none(), "then EOF");
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
