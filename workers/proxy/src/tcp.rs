//! TCP mode: one client connection relayed to one upstream server.
//!
//! A connection goes through up to four phases; the event loop
//! ([`crate::server`]) drives it on every readiness event of either socket
//! and owns the decisions that need pool state (which server, health):
//!
//! 1. [`Phase::Header`] (only with `--accept-proxy`): the PROXY header is
//!    read with `MSG_PEEK` until [`baton_sdk::proxy_protocol::parse`] says
//!    complete, then exactly its length is consumed, so not one byte of
//!    the client's own data is read into user space. A malformed header, or
//!    none, closes the connection (never guessed). It is plaintext, before
//!    any TLS.
//! 2. [`Phase::Handshake`] (only when the pool has `--tls-cert`): the TLS
//!    handshake, bounded by `--tls-handshake-timeout` (a stalled one is
//!    closed and logged). The upstream is connected only once it has
//!    finished: a port scanner, a client that does not trust the
//!    certificate or one that speaks plaintext never costs an upstream
//!    connection (nor, with `--send-proxy`, a PROXY header to it); the
//!    price is one connect round trip after the handshake instead of
//!    during it. Plaintext on the port (HTTP or anything else) is closed
//!    and logged without an answer: the service behind a TCP relay need
//!    not speak HTTP, so the HTTP mode's plain `400 use https` would be a
//!    guess.
//! 3. [`Phase::Connecting`]: a non-blocking connect to the chosen server,
//!    bounded by `--connect-timeout`; on failure the loop picks another.
//! 4. [`Phase::Relay`]: the optional PROXY header to the upstream first
//!    (a few dozen bytes, written before any client byte), then both
//!    directions with `splice(2)` through a pipe each ([`crate::relay`]);
//!    with TLS, copied through rustls and bounded buffers instead
//!    ([`crate::tls_relay`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use baton_sdk::proxy_protocol::{self, Parsed, V2_MAX};

use crate::relay::{retry_eintr, Direction, End};
use crate::tls_relay::{HandshakeStep, TlsClient};

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Header,
    Handshake,
    Connecting,
    Relay,
}

/// One relayed client connection.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub client: mio::net::TcpStream,
    /// The client's address: the socket's peer, or the PROXY header's.
    pub peer: SocketAddr,
    /// The address the client connected to (the header's, if any).
    pub local: SocketAddr,
    pub upstream: Option<mio::net::TcpStream>,
    /// The server `upstream` is (being) connected to.
    pub server: Option<usize>,
    /// Servers tried for this connection.
    pub tried: Vec<bool>,
    pub attempts: u32,
    pub phase: Phase,
    /// When the current phase times out (relay: idle).
    pub deadline: Instant,
    pub c2u: Option<Direction>,
    pub u2c: Option<Direction>,
    /// The client's TLS session and relay state, when the pool terminates
    /// TLS (then `c2u` and `u2c` stay None: nothing is spliced).
    pub tls: Option<Box<TlsClient>>,
    /// Bytes to write to the upstream before relaying (a PROXY header).
    pub preamble: Vec<u8>,
    pub started: Instant,
}

/// What reading the PROXY header came to.
#[derive(Debug)]
pub enum HeaderStep {
    Wait,
    /// Complete; the header's addresses (None: LOCAL/UNKNOWN, keep the
    /// socket's).
    Done(Option<(SocketAddr, SocketAddr)>),
    /// The client closed (or reset) before a whole header.
    Closed,
    Bad(proxy_protocol::Error),
}

/// What an upstream connect came to.
#[derive(Debug)]
pub enum ConnectStep {
    Wait,
    Connected,
    Failed(io::Error),
}

/// Which socket an I/O error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// What a relay turn came to.
#[derive(Debug)]
pub enum RelayStep {
    /// Still open; `more`: the budget ran out with work left.
    Open {
        moved: usize,
        more: bool,
    },
    /// Both directions finished.
    Finished,
    Failed(Side, io::Error),
}

fn recv(fd: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length for the call.
    retry_eintr(|| unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    })
}

fn send(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length for the call.
    retry_eintr(|| unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Peeks at what `client` sent for a PROXY header; consumes exactly the
/// header once it is whole, so not one byte of the client's own data is
/// read (shared by both modes).
pub fn read_proxy_header(client: &mio::net::TcpStream) -> HeaderStep {
    let mut buf = [0u8; V2_MAX];
    let n = match recv(client, &mut buf, libc::MSG_PEEK) {
        Ok(0) => return HeaderStep::Closed,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeaderStep::Wait,
        Err(_) => return HeaderStep::Closed,
    };
    match proxy_protocol::parse(&buf[..n]) {
        Ok(Parsed::Incomplete) => HeaderStep::Wait,
        Ok(Parsed::Complete { header, len }) => {
            // The bytes are queued (we just peeked at them): this reads
            // exactly the header, nothing after it.
            let mut sink = [0u8; V2_MAX];
            match recv(client, &mut sink[..len], 0) {
                Ok(got) if got == len => HeaderStep::Done(header.addrs),
                _ => HeaderStep::Closed,
            }
        }
        Err(e) => HeaderStep::Bad(e),
    }
}

/// Whether a non-blocking connect of `sock` finished, and how.
pub fn connect_status(sock: &mio::net::TcpStream) -> ConnectStep {
    match sock.take_error() {
        Ok(Some(e)) | Err(e) => return ConnectStep::Failed(e),
        Ok(None) => {}
    }
    match sock.peer_addr() {
        Ok(_) => ConnectStep::Connected,
        Err(e)
            if e.kind() == io::ErrorKind::NotConnected
                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
        {
            ConnectStep::Wait
        }
        Err(e) => ConnectStep::Failed(e),
    }
}

impl Conn {
    pub fn new(
        id: u64,
        client: mio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        servers: usize,
        phase: Phase,
        now: Instant,
    ) -> Conn {
        Conn {
            id,
            client,
            peer,
            local,
            upstream: None,
            server: None,
            tried: vec![false; servers],
            attempts: 0,
            phase,
            deadline: now,
            c2u: None,
            u2c: None,
            tls: None,
            preamble: Vec::new(),
            started: now,
        }
    }

    /// Peeks at what the client sent for a PROXY header; consumes exactly
    /// the header once it is whole ([`read_proxy_header`]).
    pub fn read_header(&mut self) -> HeaderStep {
        read_proxy_header(&self.client)
    }

    /// Goes on with the TLS handshake (`Done` at once without TLS).
    pub fn handshake(&mut self) -> HandshakeStep {
        match self.tls.as_mut() {
            Some(t) => t.handshake(),
            None => HandshakeStep::Done,
        }
    }

    /// With TLS: queues close_notify and writes it as far as the socket
    /// takes it (best effort, before a close by a timeout).
    pub fn close_notify(&mut self) {
        if let Some(t) = self.tls.as_mut() {
            t.close_notify();
        }
    }

    /// Whether the pending connect finished, and how.
    pub fn connect_status(&mut self) -> ConnectStep {
        match &self.upstream {
            Some(up) => connect_status(up),
            None => ConnectStep::Failed(io::Error::other("no upstream socket")),
        }
    }

    /// Moves bytes both ways, at most `budget` per direction.
    pub fn relay(&mut self, budget: usize) -> RelayStep {
        let Some(up) = &self.upstream else {
            return RelayStep::Failed(Side::Upstream, io::Error::other("relay without upstream"));
        };
        while !self.preamble.is_empty() {
            match send(up, &self.preamble) {
                Ok(n) => {
                    self.preamble.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return RelayStep::Open {
                        moved: 0,
                        more: false,
                    }
                }
                Err(e) => return RelayStep::Failed(Side::Upstream, e),
            }
        }
        let (cfd, ufd) = (self.client.as_raw_fd(), up.as_raw_fd());
        if let Some(t) = self.tls.as_mut() {
            return match t.pump(cfd, ufd, budget) {
                Ok(_) if t.finished() => RelayStep::Finished,
                Ok(p) => RelayStep::Open {
                    moved: p.moved,
                    more: p.more,
                },
                Err((side, e)) => RelayStep::Failed(side, e),
            };
        }
        let (Some(c2u), Some(u2c)) = (&mut self.c2u, &mut self.u2c) else {
            return RelayStep::Failed(Side::Upstream, io::Error::other("relay without pipes"));
        };
        let mut moved = 0;
        let mut more = false;
        // Each way, with which side its source and destination are.
        for (dir, src, dst, sides) in [
            (&mut *c2u, cfd, ufd, (Side::Client, Side::Upstream)),
            (&mut *u2c, ufd, cfd, (Side::Upstream, Side::Client)),
        ] {
            if dir.finished() {
                continue;
            }
            match dir.pump(src, dst, budget) {
                Ok(p) => {
                    moved += p.moved;
                    more |= p.more;
                }
                Err((End::Source, e)) => return RelayStep::Failed(sides.0, e),
                Err((End::Destination, e)) => return RelayStep::Failed(sides.1, e),
            }
        }
        if c2u.finished() && u2c.finished() {
            return RelayStep::Finished;
        }
        RelayStep::Open { moved, more }
    }

    /// Bytes delivered to the upstream and to the client.
    pub fn totals(&self) -> (u64, u64) {
        if let Some(t) = &self.tls {
            return (t.up_total, t.down_total);
        }
        (
            self.c2u.as_ref().map_or(0, |d| d.total),
            self.u2c.as_ref().map_or(0, |d| d.total),
        )
    }
}
