//! HTTP mode: each request of a client connection is balanced on its own
//! to an upstream server, over a keep-alive connection from this worker's
//! pool when one is idle.
//!
//! ## A request's way
//!
//! 1. **Head.** Bytes from the client are parsed by
//!    [`baton_http::parse_request`] (strict: CL with TE, differing lengths,
//!    `chunked` not last, CR/LF/NUL in a field, a bad `Host`... are 400 and
//!    the connection is closed after the answer). A `Content-Length` over
//!    `--max-body-bytes` is 413 before any byte goes upstream; `CONNECT`
//!    is 405. `Expect: 100-continue` is answered by the proxy (`100
//!    Continue` at once, the field not forwarded).
//! 2. **Server.** The policy ([`crate::balance`]) picks among the servers
//!    up ([`crate::health`], shared by the pool) and not yet tried; none:
//!    503. An idle pooled connection to it is taken (the most recent
//!    first), else a new one is connected (`--connect-timeout`). A connect
//!    that fails counts against the server and the request goes to another
//!    one (nothing was sent: safe for any method), up to `--retries`; then
//!    502 (504 if the last attempt timed out).
//! 3. **Forwarding.** The head is rewritten ([`crate::forward`]) and the
//!    body streamed as it arrives, re-framed (`Content-Length` as is,
//!    chunked re-encoded chunk by chunk, chunk extensions and trailers
//!    dropped). At most [`HIGH`] bytes wait per direction: the side that
//!    is not read from is the one whose peer is slow (bounded buffers).
//! 4. **Stale connections.** A pooled connection may have been closed by
//!    the upstream while idle (its keep-alive timeout, a restart) just as
//!    a request goes out on it: EOF or RST before one byte of response.
//!    That request is sent again on a fresh connection to the same server,
//!    once, and this does not count against the server. To be able to, the
//!    first [`REPLAY_MAX`] bytes sent are kept; a request with a larger
//!    body that meets a stale connection after sending more than that is
//!    answered 502 (the body is gone).
//! 5. **Response.** Parsed as strictly as a request
//!    ([`baton_http::parse_response`]); malformed, empty or cut short
//!    before its head ends: 502; no head within `--response-timeout`: 504
//!    (both count as a failure of the server). 1xx answers other than 101
//!    are dropped (the proxy answered `100 Continue` itself). The body
//!    streams to the client re-framed; a body that runs until the upstream
//!    closes (or a chunked one to an HTTP/1.0 client) closes the client's
//!    connection at its end.
//! 6. **After.** The upstream connection goes back to the pool if both
//!    sides framed their messages, the upstream keeps it alive and sent
//!    nothing extra; at most `--pool-size` idle per server, closed after
//!    `--pool-idle-timeout` or as soon as the upstream closes it. With
//!    `--send-proxy` a connection carries one client's PROXY header, so it
//!    is never pooled: it stays with its client connection and serves only
//!    that client's next requests.
//! 7. **Upgrade.** A request with `Connection: upgrade` and `Upgrade`
//!    (WebSocket) is forwarded with both; a `101` answer turns the pair of
//!    connections into a two-way tunnel (half-close honoured) closed after
//!    `--tunnel-timeout` of silence.
//!
//! ## TLS
//!
//! When the pool has `--tls-cert`, the acceptor gives every worker the
//! pool's certificate chains and session-ticket keys and a channel to its
//! key process ([`baton_tls::bundle`]); the private keys stay there. Each
//! client connection then gets a rustls session ([`baton_tls::TlsConn`]
//! over the raw fd) at once: the PROXY header (`--accept-proxy`), which
//! comes before the handshake, is still read from the socket, and every
//! byte after it goes through the session: reads through
//! [`read_client`], writes through [`Sink`]. The handshake has
//! `--tls-handshake-timeout`; plaintext HTTP on the port gets a plain
//! 400 saying to use https. Nothing is spliced to or from a TLS client
//! (the kernel would see ciphertext on one side, plaintext on the other),
//! so bodies are copied through rustls's buffers, still bounded by
//! [`HIGH`]. The upstream is told `X-Forwarded-Proto: https` and
//! `Forwarded: ...;proto=https`; a client cannot claim otherwise unless it
//! is a `--trusted-proxy`. Closes send close_notify first, best effort.
//!
//! ## Cost per request
//!
//! Every socket call passes `MSG_DONTWAIT`, so a client socket needs
//! `O_NONBLOCK` only before its first `splice(2)`; it is registered with
//! epoll only once it has to wait for the client (a connection answered
//! and closed in its first turn never is), `TCP_NODELAY` is set only when
//! a response goes out in more than one write or another request may
//! follow, and a clean close is immediate (the linger is kept for error
//! answers and unread bytes). A `Content-Length` response body with at
//! least [`SPLICE_MIN`] left and nothing buffered is spliced (upstream →
//! pipe → client) instead of copied; so is a `Content-Length` request body
//! once past the [`REPLAY_MAX`] bytes kept for a retry. Upstream connections are registered
//! once, for their life, pooled or not.
//!
//! Every request ends with one access log line (unless
//! `--no-access-log`): client, method, target, upstream, status, bytes
//! both ways, upstream connect, first byte and total times. Every error
//! answer (502, 503, 504, 4xx) gets one warning line naming the upstream.
//! An error answer closes the client connection after a short linger.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use baton_http::chunked::{ChunkHead, CRLF, LAST_CHUNK};
use baton_http::write::{self as w, DateCache, ErrorPage};
use baton_http::{BodyDecoder, ChunkLimits, Framing, Limits, Version, EMPTY_FIELD};
use baton_sdk::log::Level;
use baton_tls::{FdIo, TlsConn};

use crate::tls_relay::tls_io;
use mio::{Interest, Token};
use slab::Slab;

use crate::config::SendProxy;
use crate::forward::{self, Hop, OutBody};
use crate::log;
use crate::relay::{retry_eintr, shutdown_write, splice, End, Pipe};
use crate::server::{Server, FIRST};
use crate::tcp::{self, ConnectStep, HeaderStep};

/// Tokens of upstream connections start here (client `k` is `FIRST + k`).
pub const UPS: usize = usize::MAX / 4;
/// Bytes read from a socket at most at once.
pub const READ_CHUNK: usize = 64 * 1024;
/// Bytes read at once while a request head is awaited: most heads fit,
/// and a one-request connection does not cost a 64 KiB buffer.
pub const HEAD_CHUNK: usize = 16 * 1024;
/// Bytes that may wait to be written to one peer before the other side
/// stops being read.
pub const HIGH: usize = 64 * 1024;
/// Bytes of a request kept to send it again after a stale connection.
pub const REPLAY_MAX: usize = 128 * 1024;
/// Most header fields of a head.
const MAX_FIELDS: usize = 100;
/// How long a connection closed after an error answer is read from.
const LINGER: Duration = Duration::from_secs(2);
/// Passes of one connection's state machine per turn.
const TURN_STEPS: usize = 64;
/// A `Content-Length` response body with at least this much left, and
/// nothing buffered, is moved with `splice(2)` through a pipe of the
/// client connection's: no copy through user space.
pub const SPLICE_MIN: u64 = 64 * 1024;

// ---- buffers and socket calls ---------------------------------------------

/// Bytes waiting, with a read position.
#[derive(Debug, Default)]
pub struct Buf {
    data: Vec<u8>,
    at: usize,
}

impl Buf {
    fn pending(&self) -> &[u8] {
        &self.data[self.at..]
    }
    fn len(&self) -> usize {
        self.data.len() - self.at
    }
    fn is_empty(&self) -> bool {
        self.at == self.data.len()
    }
    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.data.len());
        if self.at == self.data.len() {
            self.data.clear();
            self.at = 0;
        }
    }
    fn extend(&mut self, b: &[u8]) {
        if self.is_empty() {
            self.data.clear();
            self.at = 0;
        }
        self.data.extend_from_slice(b);
    }
    /// Reads once from `fd`, at most `want` bytes. Ok(0) is end of stream;
    /// fewer than `want` means the socket is empty now.
    fn fill(&mut self, fd: RawFd, want: usize) -> io::Result<usize> {
        if self.at > 0 {
            self.data.drain(..self.at);
            self.at = 0;
        }
        self.data.reserve(want);
        let len = self.data.len();
        let room = (self.data.capacity() - len).min(want);
        // SAFETY: the pointer is to `room` bytes of spare capacity of
        // `data`, valid for writes for the call; recv writes at most that.
        let n = retry_eintr(|| unsafe {
            libc::recv(
                fd,
                self.data.as_mut_ptr().add(len).cast(),
                room,
                libc::MSG_DONTWAIT,
            )
        })?;
        // SAFETY: recv initialised the first `n` (<= room) spare bytes.
        unsafe { self.data.set_len(len + n) };
        Ok(n)
    }
}

/// One `sendmsg` of up to four slices (no SIGPIPE).
fn send_parts(fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 4];
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()).take(4) {
        iov[n] = libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    // SAFETY: `msg` points to `n` iovecs over slices borrowed for the call.
    retry_eintr(|| unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// One way out to a peer: its socket's fd, whether it may be written now,
/// and what waits for it.
struct Sink<'a> {
    fd: RawFd,
    ready: &'a mut bool,
    out: &'a mut Buf,
    /// The client's TLS session, if it has one: plaintext goes through it.
    tls: Option<&'a mut TlsConn<FdIo>>,
}

impl Sink<'_> {
    /// Queues `parts` after what waits, writing what the socket takes at
    /// once when it may be written (one system call). Returns the bytes
    /// written.
    fn emit(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
        if let Some(t) = self.tls.as_deref_mut() {
            return emit_tls(t, self.ready, self.out, parts);
        }
        let total: usize = self.out.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        if !*self.ready || total == 0 {
            for p in parts {
                self.out.extend(p);
            }
            return Ok(0);
        }
        let mut all: [&[u8]; 4] = [&[]; 4];
        all[0] = self.out.pending();
        for (slot, p) in all[1..].iter_mut().zip(parts) {
            *slot = p;
        }
        let n = match send_parts(self.fd, &all[..=parts.len().min(3)]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if n < total {
            *self.ready = false;
        }
        let from_out = n.min(self.out.len());
        self.out.consume(from_out);
        let mut rest = n - from_out;
        for p in parts {
            if rest >= p.len() {
                rest -= p.len();
            } else {
                self.out.extend(&p[rest..]);
                rest = 0;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<usize> {
        let tls_waits = self
            .tls
            .as_ref()
            .is_some_and(|t| t.connection().wants_write());
        if self.out.is_empty() && !tls_waits {
            return Ok(0);
        }
        self.emit(&[])
    }
}

/// [`Sink::emit`] through a TLS session: what waits, then `parts`, is
/// encrypted into rustls's buffer in one vectored write (so a head and a
/// small body make one record, not one each; rustls takes no more than its
/// limit) and written as far as the socket takes it; the rest waits in
/// `out`. Returns the plaintext bytes rustls took.
fn emit_tls(
    t: &mut TlsConn<FdIo>,
    ready: &mut bool,
    out: &mut Buf,
    parts: &[&[u8]],
) -> io::Result<usize> {
    use std::io::{IoSlice, Write};
    if *ready && !t.flush_tls().map_err(tls_io)? {
        *ready = false;
    }
    let mut taken = 0;
    while *ready {
        let mut iov = [IoSlice::new(&[]); 5];
        let mut k = 0;
        let mut skip = taken;
        for b in std::iter::once(out.pending()).chain(parts.iter().copied()) {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            if k < iov.len() {
                iov[k] = IoSlice::new(&b[skip..]);
                k += 1;
            }
            skip = 0;
        }
        if k == 0 {
            break;
        }
        let n = t.connection_mut().writer().write_vectored(&iov[..k])?;
        taken += n;
        if !t.flush_tls().map_err(tls_io)? {
            *ready = false;
        }
        if n == 0 {
            // rustls's buffer is full (or, in the handshake, holds
            // plaintext until it ends): the rest waits.
            break;
        }
    }
    let from_out = taken.min(out.len());
    out.consume(from_out);
    let mut rest = taken - from_out;
    for p in parts {
        if rest >= p.len() {
            rest -= p.len();
        } else {
            out.extend(&p[rest..]);
            rest = 0;
        }
    }
    Ok(taken)
}

/// Reads once more from the client, at most `want` bytes of plaintext,
/// into `inb`: `Ok(0)` is its end. Keeps `rd` true while the socket (or,
/// with TLS, rustls) may hold more, false once it is empty.
fn read_client(
    fd: RawFd,
    tls: Option<&mut TlsConn<FdIo>>,
    inb: &mut Buf,
    rd: &mut bool,
    want: usize,
) -> io::Result<usize> {
    let Some(t) = tls else {
        return match inb.fill(fd, want) {
            Ok(n) => {
                if n > 0 && n < want {
                    *rd = false;
                }
                Ok(n)
            }
            Err(e) => {
                if would_block(&e) {
                    *rd = false;
                }
                Err(e)
            }
        };
    };
    use std::io::BufRead;
    let mut got = 0;
    loop {
        let from_socket = match t.on_readable() {
            Ok(n) => n,
            // Connected and gone before a handshake (health checks, port
            // scans): an end of stream, not worth a log line.
            Err(e) if e.kind() == "eof-in-handshake" => return Ok(0),
            Err(e) => {
                if e.kind() == "plaintext-http" {
                    // Plain HTTP to the TLS port: say so in plain HTTP.
                    let _ = send_parts(fd, &[baton_tls::PLAINTEXT_HTTP_RESPONSE]);
                }
                return Err(tls_io(e));
            }
        };
        let r = {
            let mut reader = t.connection_mut().reader();
            match reader.fill_buf() {
                Ok(chunk) => {
                    let n = chunk.len().min(want - got);
                    inb.extend(&chunk[..n]);
                    reader.consume(n);
                    Ok(n)
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(0) => return Ok(got),
            Ok(n) => {
                got += n;
                if got == want {
                    return Ok(got);
                }
            }
            Err(e) if would_block(&e) => {
                if from_socket == 0 {
                    *rd = false;
                    return if got > 0 { Ok(got) } else { Err(e) };
                }
            }
            // The socket closed without close_notify: most clients do.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(got),
            Err(e) => return Err(e),
        }
    }
}

/// Whether an I/O error is "the peer is gone" rather than ours.
fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

// ---- state ----------------------------------------------------------------

/// Where a client connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Waiting for its PROXY header (`--accept-proxy`).
    ProxyHeader,
    /// Waiting for (the rest of) a request head.
    Head,
    /// A request is being forwarded and answered.
    Request,
    /// After a 101: bytes both ways.
    Tunnel,
    /// Its last answer is going out; then closed (after a linger).
    Closing,
}

/// The response to the current request, once its head is in.
#[derive(Debug)]
struct Resp {
    status: u16,
    body: BodyDecoder,
    out: OutBody,
    /// The upstream lets the connection be reused.
    reusable: bool,
    done: bool,
    /// Spliced: body bytes still to come from the upstream.
    splice_left: Option<u64>,
}

/// The request being served.
#[derive(Debug)]
struct Req {
    method: String,
    target: String,
    version: Version,
    keep_alive: bool,
    upgrade: bool,
    body: BodyDecoder,
    chunked: bool,
    /// The whole request body has been passed on.
    body_done: bool,
    /// Everything sent for this request so far (head first), while it
    /// fits in [`REPLAY_MAX`]; None once it did not.
    replay: Option<Vec<u8>>,
    /// Spliced: body bytes still to come from the client.
    splice_left: Option<u64>,
    server: Option<usize>,
    tried: Vec<bool>,
    attempts: u32,
    stale_retried: bool,
    /// The last failure, for the answer's log line.
    last_error: Option<String>,
    timed_out: bool,
    t0: Instant,
    connect_time: Option<Duration>,
    first_byte: Option<Duration>,
    bytes_up: u64,
    bytes_down: u64,
    resp: Option<Resp>,
}

/// A client connection.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    sock: mio::net::TcpStream,
    /// Its TLS session when the pool terminates TLS: every byte to and
    /// from the client goes through it (and nothing is spliced).
    tls: Option<Box<TlsConn<FdIo>>>,
    pub peer: SocketAddr,
    local: SocketAddr,
    rd: bool,
    wr: bool,
    eof: bool,
    inb: Buf,
    out: Buf,
    st: St,
    /// Its upstream connection (in flight, or private with --send-proxy).
    up: Option<usize>,
    req: Option<Box<Req>>,
    /// Last time a byte moved.
    active: Instant,
    started: Instant,
    linger_until: Option<Instant>,
    shut: bool,
    close_after: bool,
    /// Tunnel: FIN passed on each way (client→upstream, upstream→client).
    fin_up: bool,
    fin_down: bool,
    pub deadline: Instant,
    requests: u64,
    /// For spliced response bodies, made on first use.
    pipe: Option<Pipe>,
    /// For spliced request bodies, made on first use.
    up_pipe: Option<Pipe>,
    /// Watched by epoll: only once it has to wait for the client.
    registered: bool,
    /// O_NONBLOCK set (for splice(2); everything else passes MSG_DONTWAIT).
    nonblocking: bool,
    nodelay: bool,
    /// Closing: read what the client still sends for a while first.
    linger: bool,
}

impl Client {
    /// Nothing waits to be written to the client, not even in rustls.
    fn out_done(&self) -> bool {
        self.out.is_empty()
            && !self
                .tls
                .as_ref()
                .is_some_and(|t| t.connection().wants_write())
    }

    /// Still in its TLS handshake.
    fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Queues close_notify and writes it as far as the socket takes it.
    fn close_notify(&mut self) {
        if let Some(t) = self.tls.as_mut() {
            if !t.is_handshaking() {
                let _ = t.close();
            }
        }
    }

    /// Writes what waits for the client, as far as it takes it.
    fn flush(&mut self) -> io::Result<usize> {
        Sink {
            fd: self.sock.as_raw_fd(),
            ready: &mut self.wr,
            out: &mut self.out,
            tls: self.tls.as_deref_mut(),
        }
        .flush()
    }
}

/// A connection to an upstream server.
#[derive(Debug)]
pub struct Up {
    sock: mio::net::TcpStream,
    pub server: usize,
    /// The client key it serves; None while idle in the pool.
    owner: Option<usize>,
    connected: bool,
    connect_deadline: Instant,
    rd: bool,
    wr: bool,
    eof: bool,
    inb: Buf,
    out: Buf,
    /// It has served a request before (so it may be stale).
    reused: bool,
    /// Response bytes received for the current request.
    got: u64,
    /// Carries one client's PROXY header: never pooled.
    private: bool,
    idle_until: Instant,
}

/// HTTP mode's part of the server.
#[derive(Debug, Default)]
pub struct Http {
    pub clients: Slab<Client>,
    pub ups: Slab<Up>,
    /// Idle pooled connections per server, oldest first.
    pub idle: Vec<Vec<usize>>,
    date: Option<DateCache>,
    pub rules: forward::Rules,
}

impl Http {
    pub fn new(servers: usize, rules: forward::Rules) -> Http {
        Http {
            idle: vec![Vec::new(); servers],
            rules,
            ..Http::default()
        }
    }
}

/// What a pass of the state machine needs the server for.
#[derive(Debug)]
enum Act {
    /// Nothing more now.
    Wait,
    /// Progress made: another pass.
    Again,
    /// A request head is in: pick a server, get a connection.
    Start,
    /// The upstream connection was established.
    Connected,
    /// The response head arrived (the server answered).
    Answered,
    /// The upstream connection failed.
    UpFailed {
        connecting: bool,
        why: String,
    },
    /// Answer this status and close.
    Error(u16, String),
    /// The response has been passed on entirely.
    Finished,
    /// A 101 went out: tunnel from now on.
    Tunnel,
    Close(String),
}

// ---- the state machine (one client, its upstream) -------------------------

impl Server {
    /// Takes a client connection the acceptor handed over (blocking, with
    /// Nagle: every call passes MSG_DONTWAIT, and O_NONBLOCK and
    /// TCP_NODELAY are set only when needed).
    pub(crate) fn http_accept(&mut self, c: baton_sdk::Connection) {
        let id = c.id;
        let now = self.now;
        let st = if self.cfg.accept_proxy {
            St::ProxyHeader
        } else {
            St::Head
        };
        let Ok(tls) = self.tls_session(&c) else {
            return;
        };
        let tls = tls.map(Box::new);
        let client = Client {
            id,
            sock: mio::net::TcpStream::from_std(c.stream),
            tls,
            peer: c.peer,
            local: c.local,
            rd: true,
            wr: true,
            eof: false,
            inb: Buf::default(),
            out: Buf::default(),
            st,
            up: None,
            req: None,
            active: now,
            started: now,
            linger_until: None,
            shut: false,
            close_after: self.draining,
            fin_up: false,
            fin_down: false,
            deadline: now,
            requests: 0,
            pipe: None,
            up_pipe: None,
            registered: false,
            nonblocking: false,
            nodelay: false,
            linger: false,
        };
        // Not watched yet: the request is usually there already, and a
        // connection that is answered and closed in its first turn never
        // costs an epoll_ctl.
        let key = self.http.clients.insert(client);
        self.http_drive(key);
    }

    /// A readiness event for client `key`.
    pub(crate) fn http_client_event(&mut self, key: usize, ev: &mio::event::Event) {
        if let Some(c) = self.http.clients.get_mut(key) {
            c.rd |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            c.wr |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            self.http_drive(key);
        }
    }

    /// A readiness event for upstream connection `uk`.
    pub(crate) fn http_up_event(&mut self, uk: usize, ev: &mio::event::Event) {
        let Some(u) = self.http.ups.get_mut(uk) else {
            return;
        };
        u.rd |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
        u.wr |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
        match u.owner {
            Some(k) => self.http_drive(k),
            None if u.rd => {
                // Idle in the pool: anything but "nothing to read" (the
                // upstream closed it, or sent bytes nobody asked for)
                // ends it.
                let mut b = [0u8; 1];
                // SAFETY: `b` is valid for one byte of writes.
                let r = retry_eintr(|| unsafe {
                    libc::recv(
                        u.sock.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                });
                match r {
                    Err(e) if would_block(&e) => u.rd = false,
                    _ => self.drop_idle(uk),
                }
            }
            None => {}
        }
    }

    /// Runs client `key`'s state machine until it waits.
    pub(crate) fn http_drive(&mut self, key: usize) {
        let mut steps = 0;
        loop {
            steps += 1;
            if steps > TURN_STEPS {
                self.again.push(key);
                break;
            }
            let act = self.http_step(key);
            match act {
                Act::Wait => break,
                Act::Again => {}
                Act::Start => self.http_start(key),
                Act::Connected => {
                    let now = self.now;
                    if let Some(r) = self.http.clients.get_mut(key).and_then(|c| c.req.as_mut()) {
                        r.connect_time = Some(now.saturating_duration_since(r.t0));
                    }
                }
                Act::Answered => {
                    if let Some(i) = self.req_server(key) {
                        self.success(i);
                    }
                }
                Act::UpFailed { connecting, why } => self.http_up_failed(key, connecting, why),
                Act::Error(status, why) => self.http_error(key, status, &why),
                Act::Finished => self.http_finished(key),
                Act::Tunnel => self.http_tunnel(key),
                Act::Close(why) => {
                    self.http_close(key, &why);
                    return;
                }
            }
        }
        if !self.http_watch(key) {
            return;
        }
        self.http_schedule(key);
    }

    /// Registers client `key` with epoll once it has to wait for the
    /// client (to read, or to write). False if it was closed.
    fn http_watch(&mut self, key: usize) -> bool {
        let Some(c) = self.http.clients.get_mut(key) else {
            return false;
        };
        let must_read = match c.st {
            St::ProxyHeader | St::Head | St::Tunnel => !c.rd,
            St::Closing => c.linger && !c.rd,
            St::Request => !c.rd && c.req.as_ref().is_some_and(|r| !r.body_done),
        };
        let must_write = !c.wr && (!c.out_done() || c.pipe.as_ref().is_some_and(|p| p.held > 0));
        if c.registered || !(must_read || must_write) {
            return true;
        }
        match self.poll.registry().register(
            &mut c.sock,
            Token(FIRST + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            Ok(()) => {
                c.registered = true;
                true
            }
            Err(e) => {
                let id = c.id;
                log!(
                    Level::Warn,
                    "conn {id}: cannot watch the client socket: {e}"
                );
                self.http_close(key, "");
                false
            }
        }
    }

    fn req_server(&self, key: usize) -> Option<usize> {
        self.http.clients.get(key)?.req.as_ref()?.server
    }

    /// One pass: all the I/O and parsing that needs no pool state.
    fn http_step(&mut self, key: usize) -> Act {
        let now = self.now;
        let cfg = &self.cfg;
        let Http {
            clients,
            ups,
            rules,
            ..
        } = &mut self.http;
        let Some(c) = clients.get_mut(key) else {
            return Act::Wait;
        };
        match c.st {
            St::ProxyHeader => {
                if !c.rd {
                    return Act::Wait;
                }
                match tcp::read_proxy_header(&c.sock) {
                    HeaderStep::Wait => {
                        c.rd = false;
                        Act::Wait
                    }
                    HeaderStep::Done(addrs) => {
                        if let Some((src, dst)) = addrs {
                            c.peer = src;
                            c.local = dst;
                        }
                        c.st = St::Head;
                        Act::Again
                    }
                    HeaderStep::Bad(e) => Act::Close(format!("PROXY header refused: {e}")),
                    HeaderStep::Closed => Act::Close("closed before a whole PROXY header".into()),
                }
            }
            St::Head => {
                if let Err(e) = c.flush() {
                    return Act::Close(format!("client write: {e}"));
                }
                if c.out.len() >= HIGH {
                    // Pipelined requests wait for the client to read.
                    return Act::Wait;
                }
                if !c.inb.is_empty() {
                    let up_name = |i: usize| self.upstreams[i].name.as_str();
                    match parse_head(c, cfg, rules, up_name, now) {
                        Ok(true) => return Act::Start,
                        Ok(false) => {}
                        Err((status, why)) => return Act::Error(status, why),
                    }
                }
                if !c.rd || c.eof {
                    if c.eof {
                        return if c.inb.is_empty() {
                            if !c.out_done() {
                                // A client that half-closed after its
                                // request still reads the response: the
                                // rest goes out first (wr's edge).
                                return Act::Wait;
                            }
                            Act::Close(String::new())
                        } else {
                            Act::Error(400, "client closed in the middle of a request head".into())
                        };
                    }
                    return Act::Wait;
                }
                let fd = c.sock.as_raw_fd();
                match read_client(fd, c.tls.as_deref_mut(), &mut c.inb, &mut c.rd, HEAD_CHUNK) {
                    Ok(0) => {
                        c.eof = true;
                        Act::Again
                    }
                    Ok(_) => {
                        c.active = now;
                        Act::Again
                    }
                    // (With TLS, the handshake may have gone on.)
                    Err(e) if would_block(&e) => Act::Wait,
                    Err(e) => Act::Close(format!("client read: {e}")),
                }
            }
            St::Request => {
                let Some(uk) = c.up else { return Act::Wait };
                let Some(u) = ups.get_mut(uk) else {
                    return Act::Wait;
                };
                step_request(c, u, cfg.max_body_bytes, now)
            }
            St::Tunnel => {
                let Some(u) = c.up.and_then(|uk| ups.get_mut(uk)) else {
                    return Act::Close("tunnel without upstream".into());
                };
                step_tunnel(c, u, now)
            }
            St::Closing => {
                if let Err(e) = c.flush() {
                    return Act::Close(format!("client write: {e}"));
                }
                if !c.out_done() {
                    return Act::Wait;
                }
                if !c.linger && c.inb.is_empty() {
                    // The request was read whole: unless the client sent
                    // more already, closing now sends a FIN, not a reset.
                    let mut b = [0u8; 1];
                    // SAFETY: `b` is valid for one byte of writes.
                    let r = retry_eintr(|| unsafe {
                        libc::recv(
                            c.sock.as_raw_fd(),
                            b.as_mut_ptr().cast(),
                            1,
                            libc::MSG_PEEK | libc::MSG_DONTWAIT,
                        )
                    });
                    match r {
                        Ok(n) if n > 0 => {}
                        _ => {
                            c.close_notify();
                            return Act::Close(String::new());
                        }
                    }
                }
                c.linger = true;
                if !c.shut {
                    c.shut = true;
                    c.close_notify();
                    let _ = shutdown_write(c.sock.as_raw_fd());
                    c.linger_until = Some(now + LINGER);
                }
                // Read and drop what the client still sends, so that its
                // unread bytes do not reset the answer before it is read.
                let mut sink = [0u8; 4096];
                loop {
                    if !c.rd {
                        return Act::Wait;
                    }
                    // SAFETY: `sink` is valid for writes of its length.
                    let r = retry_eintr(|| unsafe {
                        libc::recv(
                            c.sock.as_raw_fd(),
                            sink.as_mut_ptr().cast(),
                            sink.len(),
                            libc::MSG_DONTWAIT,
                        )
                    });
                    match r {
                        Ok(0) => return Act::Close(String::new()),
                        Ok(_) => {}
                        Err(e) if would_block(&e) => c.rd = false,
                        Err(_) => return Act::Close(String::new()),
                    }
                }
            }
        }
    }

    // ---- actions that need the pool, the balancer, health -----------------

    /// Gets the current request an upstream connection: the client's
    /// private one (--send-proxy), a pooled one, or a new one.
    fn http_start(&mut self, key: usize) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let Some(req) = c.req.as_mut() else { return };
        let peer = c.peer;
        // A private connection stays with its client.
        if let Some(uk) = c.up {
            let reusable = self
                .http
                .ups
                .get(uk)
                .is_some_and(|u| u.connected && !u.eof && u.inb.is_empty());
            if reusable {
                if let (Some(u), Some(bytes)) = (self.http.ups.get_mut(uk), req.replay.as_ref()) {
                    let i = u.server;
                    u.out.extend(bytes);
                    u.got = 0;
                    req.server = Some(i);
                    req.attempts += 1;
                    self.outstanding[i] += 1;
                    return;
                }
            }
            c.up = None;
            self.close_up(uk);
        }
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let Some(req) = c.req.as_mut() else { return };
        if req.attempts > self.cfg.retries {
            let (status, why) = exhausted(req);
            self.http_error(key, status, &why);
            return;
        }
        let tried = req.tried.clone();
        let (why, status) = match &req.last_error {
            None => ("no upstream is up".to_string(), 503),
            Some(l) => (
                format!("no other upstream to try (last: {l})"),
                exhausted(req).0,
            ),
        };
        let Some(i) = self.pick(&tried, peer) else {
            self.http_error(key, status, &why);
            return;
        };
        if let Some(req) = self.http.clients.get_mut(key).and_then(|c| c.req.as_mut()) {
            req.tried[i] = true;
            req.attempts += 1;
        }
        // The most recently used idle connection first.
        let pooled = self.http.idle[i].pop();
        let uk = match pooled {
            Some(uk) => uk,
            None => match self.http_connect(i, key) {
                Ok(uk) => uk,
                Err(e) => {
                    let why = format!(
                        "connect to {} ({}): {e}",
                        self.upstreams[i].name, self.upstreams[i].addr
                    );
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        self.failure(i, &why);
                    }
                    if let Some(r) = self.http.clients.get_mut(key).and_then(|c| c.req.as_mut()) {
                        r.last_error = Some(why);
                    }
                    self.http_start(key);
                    return;
                }
            },
        };
        self.attach(key, uk, i);
    }

    /// Hands connection `uk` (to server `i`) to client `key`'s request.
    fn attach(&mut self, key: usize, uk: usize, i: usize) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let Some(req) = c.req.as_mut() else { return };
        let Some(u) = self.http.ups.get_mut(uk) else {
            return;
        };
        u.owner = Some(key);
        u.got = 0;
        if let Some(bytes) = &req.replay {
            u.out.extend(bytes);
        }
        req.server = Some(i);
        c.up = Some(uk);
        self.outstanding[i] += 1;
    }

    /// Starts a connection to server `i` (not pooled yet).
    fn http_connect(&mut self, i: usize, key: usize) -> io::Result<usize> {
        let addr = self.upstreams[i].addr;
        let mut out = Buf::default();
        if let Some(c) = self.http.clients.get(key) {
            out.extend(&proxy_preamble(self.cfg.send_proxy, c.peer, c.local));
        }
        let sock = mio::net::TcpStream::connect(addr)?;
        let entry = self.http.ups.vacant_entry();
        let uk = entry.key();
        let up = entry.insert(Up {
            sock,
            server: i,
            owner: None,
            connected: false,
            connect_deadline: self.now + self.cfg.connect_timeout,
            rd: false,
            wr: false,
            eof: false,
            inb: Buf::default(),
            out,
            reused: false,
            got: 0,
            private: self.cfg.send_proxy.is_some(),
            idle_until: self.now,
        });
        if let Err(e) = self.poll.registry().register(
            &mut up.sock,
            Token(UPS + uk),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.http.ups.remove(uk);
            return Err(e);
        }
        Ok(uk)
    }

    /// The upstream connection of `key`'s request failed.
    fn http_up_failed(&mut self, key: usize, connecting: bool, why: String) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let (id, peer) = (c.id, c.peer);
        let Some(uk) = c.up.take() else { return };
        let Some(req) = c.req.as_mut() else { return };
        let Some(u) = self.http.ups.try_remove(uk) else {
            return;
        };
        let i = u.server;
        self.outstanding[i] = self.outstanding[i].saturating_sub(1);
        let name = self.upstreams[i].name.clone();
        if connecting {
            let why = format!("connect to {name}: {why}");
            log!(
                Level::Info,
                "conn {id} from {peer}: {why}; trying another server"
            );
            req.timed_out = why.ends_with("timed out");
            req.last_error = Some(why.clone());
            self.failure(i, &why);
            self.http_start(key);
            return;
        }
        let stale = u.reused && u.got == 0 && req.resp.is_none();
        if stale && !req.stale_retried && req.replay.is_some() {
            // The keep-alive race: the upstream closed this idle
            // connection as the request went out. Not the server's fault.
            req.stale_retried = true;
            log!(
                Level::Info,
                "conn {id} from {peer}: a pooled connection to {name} was closed by the upstream ({why}); sending the request again on a new one"
            );
            match self.http_connect(i, key) {
                Ok(nk) => self.attach(key, nk, i),
                Err(e) => {
                    let why = format!("connect to {name}: {e}");
                    self.failure(i, &why);
                    if let Some(r) = self.http.clients.get_mut(key).and_then(|c| c.req.as_mut()) {
                        r.last_error = Some(why);
                    }
                    self.http_start(key);
                }
            }
            return;
        }
        let resp_started = req.resp.is_some();
        let why = if stale {
            format!("{name} closed a reused connection ({why}) and the request is too large to send again")
        } else if u.got == 0 {
            format!("{name} closed the connection without answering ({why})")
        } else {
            format!("{name}: the response was cut short ({why})")
        };
        if !stale {
            self.failure(i, &why);
        }
        if resp_started {
            self.http_close(key, &why);
        } else {
            self.http_error(key, 502, &why);
        }
    }

    /// Answers `status` with a small page, logs why, and closes after it.
    /// If the response already began, the connection is just closed.
    fn http_error(&mut self, key: usize, status: u16, why: &str) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let server = c.req.as_ref().and_then(|r| r.server);
        let upstream = server.map_or("-", |i| self.upstreams[i].name.as_str());
        log!(
            Level::Warn,
            "conn {} from {}: answering {status}: {why} (upstream {upstream})",
            c.id,
            c.peer
        );
        if c.req.as_ref().is_some_and(|r| r.resp.is_some()) {
            self.http_close(key, why);
            return;
        }
        let date = self.http.date.get_or_insert_with(DateCache::default);
        date.refresh(std::time::SystemTime::now());
        let page = ErrorPage::new(status);
        let mut head = Vec::with_capacity(256);
        w::status_line(&mut head, status);
        w::field(&mut head, "Date", date.value());
        w::field(&mut head, "Content-Type", ErrorPage::CONTENT_TYPE);
        w::num_field(&mut head, "Content-Length", page.body_len() as u64);
        w::field(&mut head, "Connection", b"close");
        head.extend_from_slice(b"\r\n");
        page.write(&mut head);
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        c.out.extend(&head);
        if let Some(r) = c.req.as_mut() {
            r.bytes_down += head.len() as u64;
        }
        c.st = St::Closing;
        c.linger = true;
        c.close_after = true;
        self.end_request(key, status);
        // Its upstream connection (if any) is in an unknown state.
        if let Some(uk) = self.http.clients.get_mut(key).and_then(|c| c.up.take()) {
            self.close_up(uk);
        }
    }

    /// The response has gone out: log, release, next request.
    fn http_finished(&mut self, key: usize) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let Some(req) = c.req.as_ref() else { return };
        let Some(resp) = req.resp.as_ref() else {
            return;
        };
        let status = resp.status;
        let client_keep = req.keep_alive && req.body_done && !c.close_after && !self.draining;
        let up_keep = resp.reusable && req.body_done && resp.out != OutBody::UntilClose;
        if !client_keep {
            c.close_after = true;
        }
        if !req.body_done {
            c.linger = true;
        }
        if client_keep && !c.nodelay {
            // More responses follow on this connection: no Nagle delay
            // for their last segments.
            c.nodelay = true;
            let _ = c.sock.set_nodelay(true);
        }
        self.end_request(key, status);
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        c.requests += 1;
        c.st = if c.close_after { St::Closing } else { St::Head };
        if let Some(uk) = c.up {
            let private = self.http.ups.get(uk).is_some_and(|u| u.private);
            let clean = self
                .http
                .ups
                .get(uk)
                .is_some_and(|u| !u.eof && u.inb.is_empty() && u.out.is_empty());
            if up_keep && clean && private && client_keep {
                // Stays with this client (its PROXY header was sent).
                if let Some(u) = self.http.ups.get_mut(uk) {
                    u.reused = true;
                }
            } else {
                c.up = None;
                if up_keep && clean && !private {
                    self.pool_put(uk);
                } else {
                    self.close_up(uk);
                }
            }
        }
    }

    /// Logs the access line of `key`'s request and forgets it.
    fn end_request(&mut self, key: usize, status: u16) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let Some(req) = c.req.take() else { return };
        if let Some(i) = req.server {
            self.outstanding[i] = self.outstanding[i].saturating_sub(1);
        }
        if self.cfg.no_access_log {
            return;
        }
        let ms = |d: Option<Duration>| {
            d.map_or_else(
                || "-".to_string(),
                |d| format!("{:.3}", d.as_secs_f64() * 1e3),
            )
        };
        let upstream = req.server.map_or("-", |i| self.upstreams[i].name.as_str());
        let target: String = req.target.chars().take(256).collect();
        log!(
            Level::Info,
            "access: {} \"{} {} {}\" upstream {upstream} status {status} bytes_in {} bytes_out {} connect_ms {} first_byte_ms {} total_ms {}",
            c.peer,
            req.method,
            target,
            req.version.as_str(),
            req.bytes_up,
            req.bytes_down,
            ms(req.connect_time),
            ms(req.first_byte),
            ms(Some(self.now.saturating_duration_since(req.t0)))
        );
    }

    /// A 101 went out: both connections become a tunnel.
    fn http_tunnel(&mut self, key: usize) {
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        c.st = St::Tunnel;
        c.close_after = true;
        self.end_request(key, 101);
    }

    /// Puts idle connection `uk` in its server's pool (closing the oldest
    /// beyond --pool-size).
    fn pool_put(&mut self, uk: usize) {
        let Some(u) = self.http.ups.get_mut(uk) else {
            return;
        };
        if self.cfg.pool_size == 0 || self.draining {
            self.close_up(uk);
            return;
        }
        u.owner = None;
        u.reused = true;
        u.idle_until = self.now + self.cfg.pool_idle_timeout;
        self.next_check = crate::server::earliest(self.next_check, Some(u.idle_until));
        let list = &mut self.http.idle[u.server];
        list.push(uk);
        if list.len() > self.cfg.pool_size {
            let old = list.remove(0);
            self.http.ups.try_remove(old);
        }
        // Whatever the upstream sends from now on ends it.
        self.http_check_idle(uk);
    }

    /// Reacts to what an idle connection may already have pending.
    fn http_check_idle(&mut self, uk: usize) {
        if self.http.ups.get(uk).is_some_and(|u| u.rd) {
            // A readable edge may have come while it served: look now.
            let ev_free_check = self.http.ups.get_mut(uk).map(|u| {
                let mut b = [0u8; 1];
                // SAFETY: `b` is valid for one byte of writes.
                retry_eintr(|| unsafe {
                    libc::recv(
                        u.sock.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                })
            });
            match ev_free_check {
                Some(Err(e)) if would_block(&e) => {
                    if let Some(u) = self.http.ups.get_mut(uk) {
                        u.rd = false;
                    }
                }
                _ => self.drop_idle(uk),
            }
        }
    }

    /// Closes an idle pooled connection.
    fn drop_idle(&mut self, uk: usize) {
        if let Some(u) = self.http.ups.try_remove(uk) {
            self.http.idle[u.server].retain(|k| *k != uk);
        }
    }

    /// Closes an upstream connection that is not in the pool.
    fn close_up(&mut self, uk: usize) {
        self.http.ups.try_remove(uk);
    }

    /// Closes client `key` (and its upstream connection); `why` non-empty
    /// is logged.
    pub(crate) fn http_close(&mut self, key: usize, why: &str) {
        let Some(mut c) = self.http.clients.try_remove(key) else {
            return;
        };
        // close_notify says "nothing was cut": only on an orderly end (no
        // reason to log), never after an error or a timeout in the middle
        // of a response. Best effort.
        if why.is_empty() {
            c.close_notify();
        }
        if let Some(req) = &c.req {
            if let Some(i) = req.server {
                self.outstanding[i] = self.outstanding[i].saturating_sub(1);
            }
        }
        if let Some(uk) = c.up {
            self.close_up(uk);
        }
        if !why.is_empty() {
            log!(
                Level::Info,
                "conn {} from {}: closed: {why} ({} request(s), {} ms)",
                c.id,
                c.peer,
                c.requests,
                self.now.saturating_duration_since(c.started).as_millis()
            );
        }
        self.done.push(c.id);
    }

    /// Recomputes `key`'s deadline and arranges for it to be checked.
    fn http_schedule(&mut self, key: usize) {
        let cfg = &self.cfg;
        let Some(c) = self.http.clients.get_mut(key) else {
            return;
        };
        let up = c.up.and_then(|uk| self.http.ups.get(uk));
        let d = match c.st {
            St::ProxyHeader => c.started + cfg.accept_proxy_timeout,
            St::Head if c.handshaking() => c.started + cfg.tls_handshake_timeout,
            St::Head if c.inb.is_empty() => c.active + cfg.keepalive_timeout,
            St::Head => c.active + cfg.idle_timeout.min(cfg.keepalive_timeout),
            St::Request => {
                let d = match (up, c.req.as_ref()) {
                    (Some(u), _) if !u.connected => u.connect_deadline,
                    (_, Some(r)) if r.resp.is_none() => c.active + cfg.response_timeout,
                    _ => c.active + cfg.idle_timeout,
                };
                match c.req.as_ref() {
                    Some(r) if !cfg.request_timeout.is_zero() => d.min(r.t0 + cfg.request_timeout),
                    _ => d,
                }
            }
            St::Tunnel => c.active + cfg.tunnel_timeout,
            St::Closing => c.linger_until.unwrap_or(c.active + LINGER),
        };
        c.deadline = d;
        self.next_check = crate::server::earliest(self.next_check, Some(d));
    }

    /// Acts on every HTTP deadline that passed; returns the next one.
    pub(crate) fn http_expire(&mut self) -> Option<std::time::Instant> {
        let now = self.now;
        let mut next = None;
        let mut late = Vec::new();
        for (k, c) in self.http.clients.iter() {
            if c.deadline <= now {
                late.push(k);
            } else {
                next = crate::server::earliest(next, Some(c.deadline));
            }
        }
        let mut stale = Vec::new();
        for list in &self.http.idle {
            for &uk in list {
                if let Some(u) = self.http.ups.get(uk) {
                    if u.idle_until <= now {
                        stale.push(uk);
                    } else {
                        next = crate::server::earliest(next, Some(u.idle_until));
                    }
                }
            }
        }
        for uk in stale {
            self.drop_idle(uk);
        }
        for k in late {
            self.http_timeout(k);
            if let Some(c) = self.http.clients.get(k) {
                next = crate::server::earliest(next, Some(c.deadline));
            }
        }
        next
    }

    fn http_timeout(&mut self, key: usize) {
        let cfg = &self.cfg;
        let Some(c) = self.http.clients.get(key) else {
            return;
        };
        let up = c.up.and_then(|uk| self.http.ups.get(uk));
        let total_passed = c.req.as_ref().is_some_and(|r| {
            !cfg.request_timeout.is_zero() && self.now >= r.t0 + cfg.request_timeout
        });
        match c.st {
            St::ProxyHeader => {
                let why = format!(
                    "no PROXY header within {}",
                    humantime::format_duration(cfg.accept_proxy_timeout)
                );
                self.http_close(key, &why);
            }
            St::Head if c.handshaking() => {
                let why = format!(
                    "TLS handshake not finished within --tls-handshake-timeout {}",
                    humantime::format_duration(cfg.tls_handshake_timeout)
                );
                self.http_close(key, &why);
            }
            St::Head if c.inb.is_empty() => self.http_close(key, ""),
            St::Head => self.http_error(key, 408, "the request head did not arrive in time"),
            St::Request => {
                let connecting = up.is_some_and(|u| !u.connected);
                let server = c.req.as_ref().and_then(|r| r.server);
                let headed = c.req.as_ref().is_some_and(|r| r.resp.is_some());
                if total_passed {
                    let why = format!(
                        "the request took longer than --request-timeout {}",
                        humantime::format_duration(cfg.request_timeout)
                    );
                    self.http_error(key, 504, &why);
                } else if connecting {
                    self.http_up_failed(key, true, "timed out".into());
                } else if !headed {
                    let why = format!(
                        "{} sent no response head within {}",
                        server.map_or("-", |i| self.upstreams[i].name.as_str()),
                        humantime::format_duration(cfg.response_timeout)
                    );
                    if let Some(i) = server {
                        self.failure(i, &why);
                    }
                    self.http_error(key, 504, &why);
                } else {
                    self.http_close(key, "idle timeout in the middle of a response");
                }
                // A retry may have continued the request.
                self.http_drive(key);
            }
            St::Tunnel => self.http_close(key, "tunnel idle timeout"),
            St::Closing => self.http_close(key, ""),
        }
        if self.http.clients.contains(key) {
            self.http_schedule(key);
        }
    }

    /// Draining: idle clients are closed now, the others after their
    /// current response; pooled connections are closed.
    pub(crate) fn http_drain(&mut self) {
        let idle: Vec<usize> = self
            .http
            .clients
            .iter()
            .filter(|(_, c)| c.st == St::Head && c.inb.is_empty())
            .map(|(k, _)| k)
            .collect();
        for k in idle {
            self.http_close(k, "");
        }
        for c in self.http.clients.iter_mut().map(|(_, c)| c) {
            c.close_after = true;
        }
        let pooled: Vec<usize> = self.http.idle.iter().flatten().copied().collect();
        for uk in pooled {
            self.drop_idle(uk);
        }
    }

    /// Closes every client connection now.
    pub(crate) fn http_close_all(&mut self, why: &str) {
        let keys: Vec<usize> = self.http.clients.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.http_close(k, why);
        }
    }
}

/// The answer when every attempt to connect failed.
fn exhausted(req: &Req) -> (u16, String) {
    let last = req.last_error.as_deref().unwrap_or("?");
    let status = if req.timed_out { 504 } else { 502 };
    (
        status,
        format!(
            "no upstream answered after {} attempt(s) (last: {last})",
            req.attempts
        ),
    )
}

/// Parses a request head at the start of `c.inb`: Ok(true) when one is in
/// and the request is set up; Ok(false) when more bytes are needed; the
/// status to answer otherwise.
fn parse_head<'n>(
    c: &mut Client,
    cfg: &crate::config::Config,
    rules: &forward::Rules,
    up_name: impl Fn(usize) -> &'n str,
    now: Instant,
) -> Result<bool, (u16, String)> {
    let limits = Limits {
        max_head_bytes: cfg.max_header_bytes,
        max_fields: MAX_FIELDS,
        lone_lf: false,
    };
    let mut fields = [EMPTY_FIELD; MAX_FIELDS];
    let head = match baton_http::parse_request(c.inb.pending(), &limits, &mut fields) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(false),
        Err(e) => return Err((e.status(), format!("refused request: {e}"))),
    };
    if head.method == "CONNECT" {
        return Err((405, "CONNECT is not proxied".into()));
    }
    if let Framing::Length(n) = head.framing {
        if n > cfg.max_body_bytes {
            return Err((
                413,
                format!(
                    "a {n}-byte body is over --max-body-bytes {}",
                    cfg.max_body_bytes
                ),
            ));
        }
    }
    let upgrade = forward::wants_upgrade(&head);
    let mut out = Vec::with_capacity(head.len + 256);
    let hop = Hop {
        client: c.peer,
        upstream: up_name(0),
        upgrade,
        tls: c.tls.is_some(),
    };
    forward::request_head(&mut out, &head, &hop, rules);
    let body = BodyDecoder::new(head.framing, ChunkLimits::default());
    let req = Req {
        method: head.method.to_string(),
        target: head.target.to_string(),
        version: head.version,
        keep_alive: head.keep_alive && !upgrade,
        upgrade,
        body_done: body.is_done(),
        chunked: head.framing == Framing::Chunked,
        body,
        replay: Some(out),
        splice_left: None,
        server: None,
        tried: vec![false; cfg.upstreams.len()],
        attempts: 0,
        stale_retried: false,
        last_error: None,
        timed_out: false,
        t0: now,
        connect_time: None,
        first_byte: None,
        bytes_up: 0,
        bytes_down: 0,
        resp: None,
    };
    if head.expect_continue && head.framing.has_body() && head.version == Version::Http11 {
        c.out.extend(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let len = head.len;
    c.inb.consume(len);
    c.req = Some(Box::new(req));
    c.st = St::Request;
    Ok(true)
}

/// One pass over a request in flight: connect, body up, response down.
fn step_request(c: &mut Client, u: &mut Up, max_body: u64, now: Instant) -> Act {
    let Client {
        sock: csock,
        tls: ctls,
        rd: crd,
        wr: cwr,
        eof: ceof,
        inb: cin,
        out: cout,
        req,
        active,
        close_after,
        pipe,
        up_pipe,
        nonblocking,
        nodelay,
        ..
    } = c;
    let Some(req) = req.as_mut() else {
        return Act::Wait;
    };
    let cfd = csock.as_raw_fd();
    let ufd = u.sock.as_raw_fd();
    if !u.connected {
        if !(u.wr || u.rd) {
            return Act::Wait;
        }
        match tcp::connect_status(&u.sock) {
            ConnectStep::Wait => {
                u.wr = false;
                u.rd = false;
                return Act::Wait;
            }
            ConnectStep::Connected => {
                u.connected = true;
                u.wr = true;
                return Act::Connected;
            }
            ConnectStep::Failed(e) => {
                return Act::UpFailed {
                    connecting: true,
                    why: e.to_string(),
                }
            }
        }
    }
    let mut progress = false;
    let mut up = Sink {
        fd: ufd,
        ready: &mut u.wr,
        out: &mut u.out,
        tls: None,
    };
    // The request body, client to upstream. Past the replay window (it
    // can no longer be sent again anyway) a Content-Length body with
    // nothing buffered is spliced.
    if !req.body_done
        && req.replay.is_none()
        && u.connected
        && cin.is_empty()
        && up.out.is_empty()
        && ctls.is_none()
    {
        if let BodyDecoder::Length { left, .. } = req.body {
            if left >= SPLICE_MIN && req.splice_left.is_none() {
                if up_pipe.is_none() {
                    *up_pipe = Pipe::new(256 * 1024).ok();
                }
                if !*nonblocking {
                    *nonblocking = socket2::SockRef::from(&*csock)
                        .set_nonblocking(true)
                        .is_ok();
                }
                if up_pipe.is_some() && *nonblocking {
                    req.splice_left = Some(left);
                    req.body = BodyDecoder::new(Framing::None, ChunkLimits::default());
                }
            }
        }
    }
    if let (Some(left), Some(p)) = (req.splice_left.as_mut(), up_pipe.as_mut()) {
        match splice_body(p, left, crd, up.ready, cfd, ufd) {
            Ok((got, sent)) => {
                if got > 0 {
                    *active = now;
                }
                req.bytes_up += sent as u64;
                progress |= got + sent > 0;
            }
            Err((End::Source, e)) => return Act::Close(format!("the client's request body: {e}")),
            Err((End::Destination, e)) => {
                return Act::UpFailed {
                    connecting: false,
                    why: e.to_string(),
                }
            }
        }
        if *left == 0 && p.held == 0 {
            req.splice_left = None;
            req.body_done = true;
        }
    } else if !req.body_done {
        if cin.is_empty() && *crd && !*ceof {
            match read_client(cfd, ctls.as_deref_mut(), cin, crd, READ_CHUNK) {
                Ok(0) => *ceof = true,
                Ok(_) => {
                    progress = true;
                    *active = now;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Act::Close(format!("client read: {e}")),
            }
        }
        while !cin.is_empty() && up.out.len() < HIGH {
            let step = match req.body.decode(cin.pending()) {
                Ok(s) => s,
                Err(e) => return Act::Error(e.status(), format!("refused request body: {e}")),
            };
            if req.body.total() > max_body {
                return Act::Error(
                    413,
                    format!("the body grew over --max-body-bytes {max_body}"),
                );
            }
            let data = step.data;
            let head = ChunkHead::new(data.len() as u64);
            let parts: &[&[u8]] = match (req.chunked, data.is_empty(), step.done) {
                (true, false, true) => &[head.as_bytes(), data, CRLF, LAST_CHUNK],
                (true, false, false) => &[head.as_bytes(), data, CRLF],
                (true, true, true) => &[LAST_CHUNK],
                (true, true, false) => &[],
                (false, _, _) => &[data],
            };
            if let Some(r) = req.replay.as_mut() {
                let size: usize = parts.iter().map(|p| p.len()).sum();
                if r.len() + size <= REPLAY_MAX {
                    for p in parts {
                        r.extend_from_slice(p);
                    }
                } else {
                    req.replay = None;
                }
            }
            req.bytes_up += data.len() as u64;
            if let Err(e) = up.emit(parts) {
                return Act::UpFailed {
                    connecting: false,
                    why: e.to_string(),
                };
            }
            let (consumed, done) = (step.consumed, step.done);
            cin.consume(consumed);
            progress = true;
            if done {
                req.body_done = true;
                break;
            }
            if consumed == 0 {
                break;
            }
        }
        if !req.body_done && cin.is_empty() && *ceof {
            return Act::Close("the client closed in the middle of its request body".into());
        }
    }
    match up.flush() {
        Ok(n) => progress |= n > 0,
        Err(e) => {
            return Act::UpFailed {
                connecting: false,
                why: e.to_string(),
            }
        }
    }
    // The response, upstream to client.
    // (A spliced body is read by splice_body, below.)
    let done = req
        .resp
        .as_ref()
        .is_some_and(|r| r.done || r.splice_left.is_some());
    if u.rd && !u.eof && !done && cout.len() < HIGH && u.inb.len() < HIGH {
        match u.inb.fill(ufd, READ_CHUNK) {
            Ok(0) => {
                u.eof = true;
                progress = true;
            }
            Ok(n) => {
                if u.got == 0 {
                    req.first_byte = Some(now.saturating_duration_since(req.t0));
                }
                u.got += n as u64;
                if n < READ_CHUNK {
                    u.rd = false;
                }
                progress = true;
                *active = now;
            }
            Err(e) if would_block(&e) => u.rd = false,
            Err(e) => {
                return Act::UpFailed {
                    connecting: false,
                    why: e.to_string(),
                }
            }
        }
    }
    let mut down = Sink {
        fd: cfd,
        ready: cwr,
        out: cout,
        tls: ctls.as_deref_mut(),
    };
    if req.resp.is_none() && !u.inb.is_empty() {
        let limits = Limits {
            max_head_bytes: 64 * 1024,
            max_fields: MAX_FIELDS,
            lone_lf: false,
        };
        let mut fields = [EMPTY_FIELD; MAX_FIELDS];
        match baton_http::parse_response(u.inb.pending(), &limits, &mut fields) {
            Ok(None) => {
                if u.eof {
                    return Act::Error(
                        502,
                        "the upstream closed in the middle of its response head".into(),
                    );
                }
            }
            Err(e) => return Act::Error(502, format!("invalid response from the upstream: {e}")),
            Ok(Some(h)) => {
                let len = h.len;
                if h.status < 200 && h.status != 101 {
                    // An interim answer: 100 Continue was ours to send.
                    u.inb.consume(len);
                    return Act::Again;
                }
                let framing = match h.framing(&req.method) {
                    Ok(f) => f,
                    Err(e) => {
                        return Act::Error(502, format!("invalid response from the upstream: {e}"))
                    }
                };
                let tunnel = framing == Framing::Tunnel;
                if tunnel && !(h.status == 101 && req.upgrade) {
                    return Act::Error(
                        502,
                        format!("the upstream switched protocols ({}) unasked", h.status),
                    );
                }
                let mut head = Vec::with_capacity(len + 64);
                let out = forward::response_head(
                    &mut head,
                    &h,
                    framing,
                    req.version == Version::Http10,
                    *close_after || !req.keep_alive,
                    tunnel,
                );
                if out == OutBody::UntilClose {
                    *close_after = true;
                }
                let reusable = h.keep_alive && framing != Framing::UntilClose;
                req.resp = Some(Resp {
                    status: h.status,
                    body: BodyDecoder::new(framing, ChunkLimits::default()),
                    out,
                    reusable,
                    done: !framing.has_body() || framing == Framing::Tunnel,
                    splice_left: None,
                });
                req.bytes_down += head.len() as u64;
                u.inb.consume(len);
                let whole = match framing {
                    Framing::Length(n) => n <= u.inb.len() as u64,
                    f => !f.has_body(),
                };
                if !whole && !*nodelay {
                    // The body goes out in several writes.
                    *nodelay = true;
                    let _ = csock.set_nodelay(true);
                }
                down.out.extend(&head);
                if tunnel {
                    if let Err(e) = down.flush() {
                        return Act::Close(format!("client write: {e}"));
                    }
                    return Act::Tunnel;
                }
                return Act::Answered;
            }
        }
    }
    if let Some(resp) = req.resp.as_mut() {
        if let BodyDecoder::Length { left, .. } = resp.body {
            if left >= SPLICE_MIN
                && u.inb.is_empty()
                && down.out.is_empty()
                && down.tls.is_none()
                && resp.splice_left.is_none()
            {
                if pipe.is_none() {
                    *pipe = Pipe::new(256 * 1024).ok();
                }
                if !*nonblocking {
                    // splice(2) to a blocking socket would block.
                    *nonblocking = socket2::SockRef::from(&*csock)
                        .set_nonblocking(true)
                        .is_ok();
                }
                if !*nonblocking {
                    *pipe = None;
                }
                if pipe.is_some() {
                    resp.splice_left = Some(left);
                    resp.body = BodyDecoder::new(Framing::None, ChunkLimits::default());
                }
            }
        }
        if let (Some(left), Some(p)) = (resp.splice_left.as_mut(), pipe.as_mut()) {
            match splice_body(p, left, &mut u.rd, down.ready, ufd, cfd) {
                Ok((got, sent)) => {
                    if got > 0 {
                        u.got += got as u64;
                        *active = now;
                    }
                    req.bytes_down += sent as u64;
                    progress |= got + sent > 0;
                }
                Err((End::Source, e)) => {
                    return Act::UpFailed {
                        connecting: false,
                        why: e.to_string(),
                    }
                }
                Err((End::Destination, e)) => return Act::Close(format!("client write: {e}")),
            }
            if *left == 0 && p.held == 0 {
                resp.done = true;
            }
        }
        while !resp.done && !u.inb.is_empty() && down.out.len() < HIGH {
            let step = match resp.body.decode(u.inb.pending()) {
                Ok(s) => s,
                Err(e) => {
                    return Act::Close(format!("invalid response body from the upstream: {e}"))
                }
            };
            let data = step.data;
            let head = ChunkHead::new(data.len() as u64);
            let parts: &[&[u8]] = match (resp.out, data.is_empty(), step.done) {
                (OutBody::Chunked, false, true) => &[head.as_bytes(), data, CRLF, LAST_CHUNK],
                (OutBody::Chunked, false, false) => &[head.as_bytes(), data, CRLF],
                (OutBody::Chunked, true, true) => &[LAST_CHUNK],
                (OutBody::Chunked, true, false) => &[],
                _ => &[data],
            };
            req.bytes_down += data.len() as u64;
            if let Err(e) = down.emit(parts) {
                return Act::Close(format!("client write: {e}"));
            }
            let (consumed, done) = (step.consumed, step.done);
            u.inb.consume(consumed);
            progress = true;
            if done {
                resp.done = true;
            }
            if consumed == 0 {
                break;
            }
        }
        if !resp.done && u.eof && u.inb.is_empty() {
            if matches!(resp.body, BodyDecoder::UntilClose { .. }) {
                resp.done = true;
                resp.reusable = false;
            } else {
                return Act::UpFailed {
                    connecting: false,
                    why: "closed in the middle of the body".into(),
                };
            }
        }
    } else if u.eof && u.inb.is_empty() {
        return Act::UpFailed {
            connecting: false,
            why: "end of stream".into(),
        };
    }
    match down.flush() {
        Ok(n) => progress |= n > 0,
        Err(e) => return Act::Close(format!("client write: {e}")),
    }
    if req.resp.as_ref().is_some_and(|r| r.done) {
        return Act::Finished;
    }
    if progress {
        Act::Again
    } else {
        Act::Wait
    }
}

/// Splices up to `left` body bytes from `ufd` through `p` to `cfd`, as far
/// as both sockets take them: (bytes in from the upstream, bytes out to the
/// client). An end of stream before `left` is an error of the source.
fn splice_body(
    p: &mut Pipe,
    left: &mut u64,
    urd: &mut bool,
    cwr: &mut bool,
    ufd: RawFd,
    cfd: RawFd,
) -> Result<(usize, usize), (End, io::Error)> {
    let (mut got, mut sent) = (0, 0);
    loop {
        let mut moved = false;
        if *left > 0 && p.held < p.cap && *urd {
            let want = usize::try_from(*left)
                .unwrap_or(usize::MAX)
                .min(p.cap - p.held);
            match splice(ufd, p.w.as_raw_fd(), want) {
                Ok(0) => {
                    return Err((
                        End::Source,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed in the middle of the body",
                        ),
                    ))
                }
                Ok(n) => {
                    *left -= n as u64;
                    p.held += n;
                    got += n;
                    moved = true;
                }
                // With bytes in the pipe, EAGAIN may be the pipe's (its
                // slots full of partial pages), not the socket's.
                Err(e) if would_block(&e) => *urd = p.held > 0,
                Err(e) => return Err((End::Source, e)),
            }
        }
        if p.held > 0 && *cwr {
            match splice(p.r.as_raw_fd(), cfd, p.held) {
                Ok(n) => {
                    p.held -= n;
                    sent += n;
                    moved |= n > 0;
                }
                Err(e) if would_block(&e) => *cwr = false,
                Err(e) => return Err((End::Destination, e)),
            }
        }
        if !moved || sent >= 4 << 20 || (*urd && p.held > 0 && !*cwr) {
            return Ok((got, sent));
        }
    }
}

/// One pass of a tunnel: bytes both ways, FIN passed on each way.
fn step_tunnel(c: &mut Client, u: &mut Up, now: Instant) -> Act {
    let mut progress = false;
    let cfd = c.sock.as_raw_fd();
    let ufd = u.sock.as_raw_fd();
    // Client to upstream.
    if c.rd && !c.eof && u.out.len() < HIGH && c.inb.is_empty() {
        match read_client(cfd, c.tls.as_deref_mut(), &mut c.inb, &mut c.rd, READ_CHUNK) {
            Ok(0) => c.eof = true,
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => return Act::Close(format!("tunnel: client: {e}")),
        }
        progress = true;
    }
    if !c.inb.is_empty() {
        let mut s = Sink {
            fd: ufd,
            ready: &mut u.wr,
            out: &mut u.out,
            tls: None,
        };
        if let Err(e) = s.emit(&[c.inb.pending()]) {
            return Act::Close(format!("tunnel: upstream: {e}"));
        }
        c.inb.consume(c.inb.len());
        c.active = now;
    }
    let mut s = Sink {
        fd: ufd,
        ready: &mut u.wr,
        out: &mut u.out,
        tls: None,
    };
    match s.flush() {
        Ok(n) => progress |= n > 0,
        Err(e) => return Act::Close(format!("tunnel: upstream: {e}")),
    }
    if c.eof && u.out.is_empty() && !c.fin_up {
        c.fin_up = true;
        let _ = shutdown_write(ufd);
    }
    // Upstream to client.
    if u.rd && !u.eof && c.out.len() < HIGH && u.inb.is_empty() {
        match u.inb.fill(ufd, READ_CHUNK) {
            Ok(0) => u.eof = true,
            Ok(_) => {}
            Err(e) if would_block(&e) => u.rd = false,
            Err(e) => return Act::Close(format!("tunnel: upstream: {e}")),
        }
        progress = true;
    }
    let mut s = Sink {
        fd: cfd,
        ready: &mut c.wr,
        out: &mut c.out,
        tls: c.tls.as_deref_mut(),
    };
    if !u.inb.is_empty() {
        if let Err(e) = s.emit(&[u.inb.pending()]) {
            return Act::Close(format!("tunnel: client: {e}"));
        }
        u.inb.consume(u.inb.len());
        c.active = now;
    }
    match s.flush() {
        Ok(n) => progress |= n > 0,
        Err(e) => return Act::Close(format!("tunnel: client: {e}")),
    }
    if u.eof && c.out_done() && !c.fin_down {
        c.fin_down = true;
        c.close_notify();
        let _ = shutdown_write(cfd);
    }
    if c.fin_up && c.fin_down {
        return Act::Close(String::new());
    }
    if progress {
        Act::Again
    } else {
        Act::Wait
    }
}

/// Which PROXY header an upstream connection of this worker starts with.
pub(crate) fn proxy_preamble(v: Option<SendProxy>, peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match v {
        Some(SendProxy::V2) => baton_sdk::proxy_protocol::encode_v2(peer, local),
        Some(SendProxy::V1) => baton_sdk::proxy_protocol::encode_v1(peer, local).into_bytes(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers() {
        let mut b = Buf::default();
        b.extend(b"hello");
        b.consume(2);
        assert_eq!(b.pending(), b"llo");
        b.extend(b"!");
        assert_eq!(b.pending(), b"llo!");
        b.consume(4);
        assert!(b.is_empty());
    }
}
