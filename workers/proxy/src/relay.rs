//! Moving bytes from one socket to another through a kernel pipe with
//! `splice(2)`: the data never enters user space, and what is in flight
//! per direction is bounded by the pipe's size.
//!
//! One [`Direction`] per way. [`Direction::pump`] alternates "socket →
//! pipe" and "pipe → socket" until neither makes progress (both sockets
//! would block, or the pipe is full and the destination would block) or
//! the turn's byte budget is spent. Edge-triggered readiness is safe with
//! it: it stops only on `EAGAIN` from the side that must then signal.
//!
//! End of stream: when the source says EOF and the pipe is empty, the
//! destination gets `shutdown(SHUT_WR)` (a FIN), and the other direction
//! goes on: a client that half-closes still receives the whole answer.
//!
//! Not for a TLS client (the pool has `--tls-cert`): the kernel would move
//! ciphertext one way and plaintext the other. Those connections are
//! copied through rustls instead ([`crate::tls_relay`]); [`Pumped`] and
//! [`shutdown_write`] are shared with it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pipe's two ends and what is in it.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub(crate) r: OwnedFd,
    pub(crate) w: OwnedFd,
    /// Bytes in the pipe.
    pub(crate) held: usize,
    /// Its capacity.
    pub(crate) cap: usize,
}

impl Pipe {
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is an array of two ints that pipe2 fills.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are new and ours alone.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on an fd we own, with integer arguments. A refused
        // size (above pipe-max-size for an unprivileged user) keeps the
        // default, read back below.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        // SAFETY: as above.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(Pipe {
            r,
            w,
            held: 0,
            cap: usize::try_from(cap)
                .ok()
                .filter(|c| *c > 0)
                .unwrap_or(65536),
        })
    }
}

/// Runs a system call returning a byte count or -1, again on `EINTR`.
pub(crate) fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `splice(from, to, len)`, non-blocking on the pipe side (the sockets are
/// non-blocking themselves). Ok(0) is end of file on `from`.
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds and null offsets (neither end is seekable); the
    // kernel touches no memory of ours.
    retry_eintr(|| unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    })
}

/// What one [`Direction::pump`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pumped {
    /// Bytes delivered to the destination.
    pub moved: usize,
    /// The budget ran out with work possibly left: pump again soon.
    pub more: bool,
}

/// Which end of a direction an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// One way of a relayed connection.
#[derive(Debug)]
pub struct Direction {
    pipe: Pipe,
    /// The source said EOF.
    pub eof: bool,
    /// The destination was shut down for writing (this way is finished).
    pub shut: bool,
    /// Bytes delivered so far.
    pub total: u64,
}

impl Direction {
    /// A direction with a pipe of about `pipe_size` bytes.
    pub fn new(pipe_size: usize) -> io::Result<Direction> {
        Ok(Direction {
            pipe: Pipe::new(pipe_size)?,
            eof: false,
            shut: false,
            total: 0,
        })
    }

    /// Whether this way is over: EOF read, everything delivered, FIN sent.
    pub fn finished(&self) -> bool {
        self.shut
    }

    /// Moves what it can from `src` to `dst`, at most `budget` bytes.
    /// An error is fatal for the connection (reset, broken pipe); it says
    /// which end failed.
    pub fn pump(
        &mut self,
        src: RawFd,
        dst: RawFd,
        budget: usize,
    ) -> Result<Pumped, (End, io::Error)> {
        let mut out = Pumped::default();
        loop {
            let mut progress = false;
            if !self.eof && self.pipe.held < self.pipe.cap {
                match splice(src, self.pipe.w.as_raw_fd(), self.pipe.cap - self.pipe.held) {
                    Ok(0) => {
                        self.eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.pipe.held += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err((End::Source, e)),
                }
            }
            if self.pipe.held > 0 {
                match splice(self.pipe.r.as_raw_fd(), dst, self.pipe.held) {
                    Ok(0) => {}
                    Ok(n) => {
                        self.pipe.held -= n;
                        self.total += n as u64;
                        out.moved += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err((End::Destination, e)),
                }
            }
            if self.eof && self.pipe.held == 0 && !self.shut {
                shutdown_write(dst).map_err(|e| (End::Destination, e))?;
                self.shut = true;
            }
            if !progress || self.shut {
                return Ok(out);
            }
            if out.moved >= budget {
                out.more = true;
                return Ok(out);
            }
        }
    }
}

/// `shutdown(fd, SHUT_WR)`; a peer already gone is not an error here (the
/// other direction reports it).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: integer arguments only.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        return Ok(());
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn splices_a_stream_and_its_end() {
        // client_out -> [relay_in  ==pump==>  relay_out] -> server_in
        let (mut client, relay_in) = pair();
        let (relay_out, mut server) = pair();
        relay_in.set_nonblocking(true).unwrap();
        relay_out.set_nonblocking(true).unwrap();
        let mut d = Direction::new(4096).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                client.write_all(&data).unwrap();
                client.shutdown(std::net::Shutdown::Write).unwrap();
                client
            })
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        let start = std::time::Instant::now();
        while !d.finished() {
            let p = d
                .pump(relay_in.as_raw_fd(), relay_out.as_raw_fd(), 64 * 1024)
                .unwrap();
            if p.moved == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(start.elapsed().as_secs() < 20);
        }
        let _client = writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), data);
        assert_eq!(d.total, data.len() as u64);
    }
}
