//! TCP mode with TLS (the pool has `--tls-cert`): the client's side of a
//! relayed connection is a rustls session ([`baton_tls::TlsConn`] over the
//! raw fd, keys in baton's key process), the upstream's a plain socket.
//!
//! Nothing is spliced to or from the client (the kernel would see
//! ciphertext on one side and plaintext on the other): bytes are copied
//! through bounded buffers, and the side that is not read from is the one
//! whose peer is slow.
//!
//! * **Client → upstream**: plaintext is sent to the upstream straight
//!   from rustls's buffer of received plaintext (`fill_buf`/`consume`, no
//!   buffer of ours). rustls reads no more from the socket while that
//!   buffer holds anything, so a slow upstream leaves the client's bytes
//!   in the kernel: at most one TLS record or so waits in user space.
//! * **Upstream → client**: at most [`HIGH`] bytes are read from the
//!   upstream into a buffer of ours, and only once it is empty again; rustls
//!   encrypts them into its own outgoing buffer (bounded by rustls's
//!   default limit, 64 KiB) and that is written as far as the client's
//!   socket takes it. A client that does not read leaves the upstream's
//!   bytes in the kernel: about `HIGH` plus rustls's buffer per connection.
//!
//! **End of stream.** The client's close_notify, or its FIN without one
//! (most clients do that), ends the client → upstream way: once all its
//! plaintext was sent, the upstream gets `shutdown(SHUT_WR)`. The
//! upstream's FIN ends the other way: once everything was encrypted and
//! written, the client gets close_notify, then `shutdown(SHUT_WR)`. Each
//! way goes on alone after the other ended (half-close honoured both ways).
//! Bytes that are not TLS after the handshake (or a TLS error) end the
//! connection: rustls's alert is flushed best effort.

use std::io::{self, BufRead, Write};
use std::os::fd::RawFd;

use baton_tls::{FdIo, TlsConn, TlsError};

use crate::relay::{retry_eintr, shutdown_write, Pumped};
use crate::tcp::Side;

/// Bytes read from the upstream at most at once, and at most waiting for
/// rustls to take them.
pub const HIGH: usize = 64 * 1024;

/// A TLS error as an `io::Error` for the relay's log, its kind named.
pub fn tls_io(e: TlsError) -> io::Error {
    io::Error::other(format!("TLS ({}): {e}", e.kind()))
}

/// What a handshake turn came to.
#[derive(Debug)]
pub enum HandshakeStep {
    Wait,
    Done,
    Failed(TlsError),
}

/// A TLS client connection of TCP mode: its session and both ways' state.
#[derive(Debug)]
pub struct TlsClient {
    pub session: TlsConn<FdIo>,
    /// Plaintext read from the upstream that rustls has not taken yet.
    down: Vec<u8>,
    /// Read position in `down`.
    at: usize,
    /// The upstream said FIN.
    up_eof: bool,
    /// close_notify was queued for the client.
    notified: bool,
    /// The upstream was shut down for writing (client → upstream is over).
    pub shut_up: bool,
    /// The client was shut down for writing (upstream → client is over).
    pub shut_down: bool,
    /// The client ended with close_notify (not a bare FIN).
    pub clean_end: bool,
    /// Plaintext bytes delivered to the upstream and handed to rustls for
    /// the client.
    pub up_total: u64,
    pub down_total: u64,
}

impl TlsClient {
    pub fn new(session: TlsConn<FdIo>) -> TlsClient {
        TlsClient {
            session,
            down: Vec::new(),
            at: 0,
            up_eof: false,
            notified: false,
            shut_up: false,
            shut_down: false,
            clean_end: false,
            up_total: 0,
            down_total: 0,
        }
    }

    /// Reads and answers what the client sent of its handshake.
    pub fn handshake(&mut self) -> HandshakeStep {
        match self.session.on_readable() {
            Err(e) => HandshakeStep::Failed(e),
            Ok(_) if self.session.is_handshaking() => HandshakeStep::Wait,
            Ok(_) => HandshakeStep::Done,
        }
    }

    /// Queues close_notify and writes it as far as the socket takes it
    /// (best effort: for a connection closed by a timeout).
    pub fn close_notify(&mut self) {
        if !self.session.is_handshaking() && !self.notified {
            self.notified = true;
            let _ = self.session.close();
        }
    }

    /// Both ways are over.
    pub fn finished(&self) -> bool {
        self.shut_up && self.shut_down
    }

    /// Moves bytes both ways, at most `budget` per way. An error is fatal
    /// for the connection; it says which side failed.
    pub fn pump(
        &mut self,
        cfd: RawFd,
        ufd: RawFd,
        budget: usize,
    ) -> Result<Pumped, (Side, io::Error)> {
        let a = self.client_to_upstream(ufd, budget)?;
        let b = self.upstream_to_client(cfd, ufd, budget)?;
        Ok(Pumped {
            moved: a.moved + b.moved,
            more: a.more || b.more,
        })
    }

    fn client_to_upstream(
        &mut self,
        ufd: RawFd,
        budget: usize,
    ) -> Result<Pumped, (Side, io::Error)> {
        /// What rustls's plaintext buffer came to.
        enum Step {
            Sent(usize),
            /// The upstream would block: wait for it to be writable.
            Blocked,
            /// Nothing deciphered waits: read the socket.
            Empty,
            /// close_notify (clean) or the socket's end without it.
            End(bool),
        }
        let mut out = Pumped::default();
        let mut read_socket = false;
        while !self.shut_up {
            let step = {
                let mut rd = self.session.connection_mut().reader();
                match rd.fill_buf() {
                    Ok([]) => Step::End(true),
                    Ok(chunk) => match send(ufd, chunk) {
                        Ok(n) => {
                            rd.consume(n);
                            Step::Sent(n)
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
                        Err(e) => return Err((Side::Upstream, e)),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Empty,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Step::End(false),
                    Err(e) => return Err((Side::Client, e)),
                }
            };
            match step {
                Step::Sent(n) => {
                    read_socket = false;
                    out.moved += n;
                    self.up_total += n as u64;
                    if out.moved >= budget {
                        out.more = true;
                        break;
                    }
                }
                Step::Blocked => break,
                Step::Empty => {
                    // Once per emptied buffer: the socket is read until it
                    // would block (or rustls has plaintext again).
                    if read_socket {
                        break;
                    }
                    read_socket = true;
                    self.session
                        .on_readable()
                        .map_err(|e| (Side::Client, tls_io(e)))?;
                }
                Step::End(clean) => {
                    self.clean_end = clean;
                    shutdown_write(ufd).map_err(|e| (Side::Upstream, e))?;
                    self.shut_up = true;
                }
            }
        }
        Ok(out)
    }

    fn upstream_to_client(
        &mut self,
        cfd: RawFd,
        ufd: RawFd,
        budget: usize,
    ) -> Result<Pumped, (Side, io::Error)> {
        let client = |e: TlsError| (Side::Client, tls_io(e));
        let mut out = Pumped::default();
        while !self.shut_down {
            if self.at < self.down.len() {
                let n = self
                    .session
                    .connection_mut()
                    .writer()
                    .write(&self.down[self.at..])
                    .map_err(|e| (Side::Client, e))?;
                self.at += n;
                out.moved += n;
                self.down_total += n as u64;
                let flushed = self.session.flush_tls().map_err(client)?;
                if self.at < self.down.len() {
                    if !flushed {
                        // The client's socket is full: wait for writable.
                        return Ok(out);
                    }
                    if n == 0 {
                        return Err((
                            Side::Client,
                            io::Error::other("the TLS session takes no more data"),
                        ));
                    }
                    continue;
                }
                self.down.clear();
                self.at = 0;
                if !flushed {
                    return Ok(out);
                }
            }
            if !self.session.flush_tls().map_err(client)? {
                return Ok(out);
            }
            if self.up_eof {
                if !self.notified {
                    self.notified = true;
                    self.session.close().map_err(client)?;
                    continue;
                }
                shutdown_write(cfd).map_err(|e| (Side::Client, e))?;
                self.shut_down = true;
                break;
            }
            if out.moved >= budget {
                out.more = true;
                break;
            }
            match fill(&mut self.down, ufd, HIGH) {
                Ok(0) => self.up_eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err((Side::Upstream, e)),
            }
        }
        Ok(out)
    }
}

/// Reads once from `fd` into the empty `buf`, at most `want` bytes.
fn fill(buf: &mut Vec<u8>, fd: RawFd, want: usize) -> io::Result<usize> {
    buf.clear();
    buf.reserve_exact(want);
    let room = buf.capacity().min(want);
    // SAFETY: the pointer is to `room` bytes of spare capacity of the
    // empty `buf`, valid for writes for the call; recv writes at most that.
    let n = retry_eintr(|| unsafe {
        libc::recv(fd, buf.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT)
    })?;
    // SAFETY: recv initialised the first `n` (<= room <= capacity) bytes.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// One non-blocking `send` (no SIGPIPE).
fn send(fd: RawFd, b: &[u8]) -> io::Result<usize> {
    // SAFETY: `b` is valid for reads of its length for the call.
    retry_eintr(|| unsafe {
        libc::send(
            fd,
            b.as_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}
