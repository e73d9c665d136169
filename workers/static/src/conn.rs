//! One client connection: read, parse, answer in order, write, close.
//!
//! [`Conn::drive`] makes all the progress it can and returns when the socket
//! would block (or its turn is used up, see [`Next`]):
//!
//! 1. parse every complete request already buffered (pipelining) and append
//!    the responses to one output buffer, stopping at a response with a
//!    `sendfile` body, at a response that closes the connection, or when
//!    [`HIGH_WATER`] bytes are waiting;
//! 2. write the buffer and then the file with `sendfile(2)`, resuming at the
//!    recorded offset after `EAGAIN` or a partial send; while a file body
//!    goes out the socket is corked (`TCP_CORK`, and `MSG_MORE` on the head),
//!    so that the head and the start of the body share segments and no
//!    short segment leaves between two `sendfile` calls;
//! 3. read more only when the output is flushed (backpressure): a client
//!    that pipelines without reading stalls itself, not the worker.
//!
//! System calls per request are counted: every read and write passes
//! `MSG_DONTWAIT`, so the socket needs `O_NONBLOCK` only before its first
//! `sendfile`; `TCP_NODELAY` is set only on a connection that outlives a
//! response; the socket is registered with epoll (edge-triggered, both
//! directions, once) only if it outlives its first turn, so a one-request
//! connection whose request had arrived costs `recv`, `openat`, `fstat`,
//! `pread`, `send` and two `close`s. A read that returns less than the room
//! offered means the socket is empty (as nginx assumes with edge-triggered
//! epoll), which saves the `EAGAIN` read per request; an `EPOLLRDHUP` turns
//! that shortcut off so that the peer's FIN is read.
//!
//! Requests are parsed by `baton-http` (within `--max-header-bytes` and
//! `--max-header-fields`); a request body is decoded after its response
//! has been queued (a [`BodyDecoder`], `Content-Length` or chunked, split
//! anywhere across reads) and dropped, up to `--max-body-bytes`; a body
//! that breaks its framing or grows past that closes the connection.
//!
//! With `--accept-proxy` a fresh connection first owes its PROXY header
//! (v1 or v2, [`baton_sdk::proxy_protocol`]): it is parsed from the same
//! read buffer as the request heads (no `MSG_PEEK`, no extra system call),
//! and its source address becomes [`Conn::peer`], the access log's. A
//! malformed header, data that is not one, or none within
//! `--accept-proxy-timeout`, closes the connection with a log line and no
//! answer. A connection parked after its header comes back carrying that
//! address, not the socket's peer: that is how the worker that gets it
//! knows the header was read (see `Server::accept`). One whose header named
//! no address, or the socket's own, could not be told apart, so it is never
//! parked.
//!
//! Closing after an error response is "lingering": stop writing
//! (`shutdown(SHUT_WR)`), read and discard for a short while, then close, so
//! that unread request bytes do not make the kernel reset the connection
//! before the client has read the response.

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags};

use baton_http::{BodyDecoder, ChunkLimits};
use baton_sdk::proxy_protocol::{self, Parsed};

use crate::config::Config;
use crate::http::{self, ConnState, FileBody, Shared};

/// Stop parsing pipelined requests while this many response bytes wait.
pub const HIGH_WATER: usize = 256 * 1024;
/// Largest single `sendfile` call.
const SENDFILE_CHUNK: u64 = 2 << 20;
/// Bytes one connection may write in one turn before the loop serves the
/// others: a client that reads as fast as loopback (the socket never says
/// EAGAIN) must not monopolise the worker.
const WRITE_BUDGET: u64 = 4 << 20;
/// Requests one connection may have answered in one turn (pipelining).
const REQUEST_BUDGET: u32 = 256;
/// Reads one lingering connection may discard in one turn.
const LINGER_BUDGET: u32 = 64;

/// What the event loop should do with a connection after driving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for readiness (or the deadline).
    Wait,
    /// It used up its turn with work left: drive it again soon, without
    /// waiting for an event (edge-triggered readiness will not repeat).
    Again,
    /// Close it now.
    Close,
}
/// Draining, an idle keep-alive connection that was active this recently
/// stays open this long for its next request, which it gets answered with
/// `Connection: close`. Closing it at once races with a request already on
/// its way (the client sees a reset or an empty reply, nginx's reload race);
/// a client idle longer than this meets the same race as at any idle
/// timeout, no more.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Read buffers kept for reuse by the next connection that needs one.
const POOL_MAX: usize = 256;

/// Per-loop context shared by every connection: reusable buffers and the
/// loop's clock.
#[derive(Debug)]
pub struct Io {
    pool: Vec<Box<[u8]>>,
    out_pool: Vec<Vec<u8>>,
    buf_size: usize,
    /// Decoded request path, reused.
    pub scratch: Vec<u8>,
    /// When the current loop iteration woke up.
    pub now: Instant,
    /// Whether to log each request.
    pub access_log: bool,
}

impl Io {
    pub fn new(cfg: &Config) -> Io {
        Io {
            pool: Vec::new(),
            out_pool: Vec::new(),
            buf_size: cfg.max_header_bytes as usize,
            scratch: Vec::with_capacity(256),
            now: Instant::now(),
            access_log: cfg.access_log(),
        }
    }

    fn take_buf(&mut self) -> Box<[u8]> {
        self.pool
            .pop()
            .unwrap_or_else(|| vec![0u8; self.buf_size].into_boxed_slice())
    }

    fn give_buf(&mut self, b: Box<[u8]>) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(b);
        }
    }

    fn take_out(&mut self) -> Vec<u8> {
        self.out_pool.pop().unwrap_or_default()
    }

    fn give_out(&mut self, mut v: Vec<u8>) {
        // Keep ordinary-sized buffers only: one that grew for a burst of
        // pipelined responses goes back to the allocator.
        if self.out_pool.len() < POOL_MAX && v.capacity() <= 64 * 1024 {
            v.clear();
            self.out_pool.push(v);
        }
    }
}

/// A response waiting to be fully written, for the access log.
#[derive(Debug)]
struct LogRec {
    method: String,
    path: String,
    status: u16,
    bytes: u64,
    start: Instant,
    /// Value of `Conn::sent` once this response is fully written.
    end: u64,
}

use baton_tls::FdIo;

// kTLS: with `ktls_wanted` (the bundle said the kernel has it), each
// turn first tries `try_ktls`; once the session is the kernel's, `tls` is
// None and the connection is sent and read as a plain one (sendfile
// included) except that it is never parked and an `EIO` from recv (a TLS
// record that is not data) closes it. See `baton_tls::ktls`.

/// Plaintext of a file body read per TLS write.
const TLS_FILE_CHUNK: usize = 16 * 1024;

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    /// The TLS session, when the pool terminates TLS: every byte goes
    /// through it (and file bodies are read, not sendfile'd).
    pub tls: Option<Box<baton_tls::TlsConn<FdIo>>>,
    /// Hand the TLS session to the kernel once it can be (kTLS).
    ktls_wanted: bool,
    /// The session is the kernel's: the socket is read and written in
    /// plaintext (sendfile too), the kernel encrypts.
    ktls: bool,
    /// The acceptor's id for this connection (for DONE).
    pub id: u64,
    pub sock: mio::net::TcpStream,
    pub peer: SocketAddr,
    /// The acceptor's listener index and the local address (for PARK).
    pub listener: u16,
    pub local: SocketAddr,
    /// Hand it back to the acceptor once idle this long (None: never).
    pub park_after: Option<Duration>,
    /// Whether the socket is registered with the event loop yet.
    pub registered: bool,
    /// Its PROXY header is still to come (`--accept-proxy`).
    pub awaiting_proxy: bool,
    /// What was read is not a PROXY header: close without an answer.
    proxy_refused: bool,
    /// Its PROXY header named no address of its own: a worker given it
    /// back from parking could not tell that the header was read.
    never_park: bool,
    rbuf: Option<Box<[u8]>>,
    rlen: usize,
    /// The request body being skipped, if any.
    discard: Option<BodyDecoder>,
    out: Vec<u8>,
    out_pos: usize,
    file: Option<FileBody>,
    requests: u32,
    /// No `EAGAIN` seen since the last readiness event.
    read_ready: bool,
    read_eof: bool,
    /// The peer's FIN has been signalled (it may still be behind data).
    peer_fin: bool,
    /// Whether the socket has O_NONBLOCK (set before the first sendfile;
    /// every other call passes MSG_DONTWAIT).
    nonblocking: bool,
    /// Whether TCP_NODELAY is set.
    nodelay: bool,
    /// Whether TCP_CORK is set (while a file body goes out).
    corked: bool,
    /// Close once the output is written.
    close_after: bool,
    /// Closing must linger (an error, or unread input).
    linger: bool,
    lingering: bool,
    /// Finish the current request, then close.
    draining: bool,
    /// When the request being read started (or the connection arrived).
    req_start: Instant,
    /// Last progress in either direction.
    last_active: Instant,
    linger_since: Instant,
    /// When this connection times out in its current state.
    pub deadline: Instant,
    /// Bytes written so far, and bytes queued so far (responses).
    sent: u64,
    queued: u64,
    logs: VecDeque<LogRec>,
}

impl Conn {
    pub fn new(id: u64, sock: mio::net::TcpStream, peer: SocketAddr, now: Instant) -> Conn {
        Conn {
            tls: None,
            ktls_wanted: false,
            ktls: false,
            id,
            sock,
            peer,
            listener: 0,
            local: peer,
            park_after: None,
            registered: false,
            awaiting_proxy: false,
            proxy_refused: false,
            never_park: false,
            rbuf: None,
            rlen: 0,
            discard: None,
            out: Vec::new(),
            out_pos: 0,
            file: None,
            requests: 0,
            read_ready: true,
            read_eof: false,
            peer_fin: false,
            nonblocking: false,
            nodelay: false,
            corked: false,
            close_after: false,
            linger: false,
            lingering: false,
            draining: false,
            req_start: now,
            last_active: now,
            linger_since: now,
            deadline: now,
            sent: 0,
            queued: 0,
            logs: VecDeque::new(),
        }
    }

    /// Called on every readiness event: the socket may have changed state.
    /// `read_closed` (EPOLLRDHUP): the peer's FIN is queued, so reads must
    /// go on until they see it rather than stop at the first short read.
    pub fn ready(&mut self, readable: bool, read_closed: bool) {
        if readable || read_closed {
            self.read_ready = true;
        }
        self.peer_fin |= read_closed;
    }

    fn output_empty(&self) -> bool {
        self.out_pos == self.out.len() && self.file.is_none()
    }

    /// Nothing in flight: no partial request, no pending output, and at
    /// least one request answered (a fresh connection is owed an answer to
    /// the request it is about to send).
    pub fn is_idle(&self) -> bool {
        self.rlen == 0 && self.discard.is_none() && self.output_empty() && self.requests > 0
    }

    /// Asks the connection to close after the response in progress, or
    /// after the next request if it is idle and was active within
    /// [`DRAIN_IDLE_GRACE`]. Returns false when it should be closed now.
    pub fn drain(&mut self, cfg: &Config, now: Instant) -> bool {
        self.draining = true;
        if self.lingering
            || (self.is_idle()
                && now.saturating_duration_since(self.last_active) >= DRAIN_IDLE_GRACE)
        {
            return false;
        }
        self.set_deadline(cfg);
        true
    }

    /// Whether it may be handed back to the acceptor now: idle (its
    /// response fully written, nothing of the next request buffered), and
    /// neither closing nor closed by the client.
    pub fn parkable(&self) -> bool {
        // A TLS session lives in this process (or its kernel state on
        // this socket): it cannot be handed back.
        self.tls.is_none()
            && !self.ktls
            && self.is_idle()
            && !self.never_park
            && !self.lingering
            && !self.close_after
            && !self.read_eof
            && !self.peer_fin
    }

    /// Starts a TLS session on the connection.
    pub fn start_tls(
        &mut self,
        config: std::sync::Arc<rustls::ServerConfig>,
        ktls: bool,
    ) -> Result<(), baton_tls::TlsError> {
        let t = baton_tls::TlsConn::new(config, FdIo(self.sock.as_raw_fd()))?;
        self.tls = Some(Box::new(t));
        self.ktls_wanted = ktls;
        Ok(())
    }

    /// Whether its TLS session went to the kernel.
    pub fn is_ktls(&self) -> bool {
        self.ktls
    }

    /// Hands the TLS session to the kernel if it can go now (see
    /// `baton_tls::ktls`); false: the connection must close (the keys
    /// left rustls but the kernel did not take them).
    fn try_ktls(&mut self) -> bool {
        use baton_tls::ktls::KtlsError;
        if !self.ktls_wanted || self.tls.as_ref().is_none_or(|t| t.is_handshaking()) {
            return true;
        }
        let Some(t) = self.tls.take() else {
            return true;
        };
        match t.into_ktls(&mut baton_tls::ktls::System) {
            Ok(_) => {
                self.ktls = true;
                self.ktls_wanted = false;
                // Whatever arrived since is the kernel's to decrypt now.
                self.read_ready = true;
                tracing::debug!(conn = self.id, "kTLS: the session is the kernel's");
                true
            }
            Err(baton_tls::Handoff::Kept(t, e)) => {
                self.tls = Some(t);
                if !matches!(e, KtlsError::NotReady(_)) {
                    self.ktls_wanted = false;
                    tracing::info!(conn = self.id, error = %e, "kTLS: not handed off; this connection stays on userspace rustls");
                }
                true
            }
            Err(baton_tls::Handoff::Failed(_, e)) => {
                tracing::warn!(conn = self.id, peer = %self.peer, error = %e, "kTLS: the kernel did not take the session keys; closing the connection");
                false
            }
        }
    }

    /// Whether it has been idle long enough to be parked at `now`.
    pub fn park_due(&self, now: Instant) -> bool {
        self.parkable()
            && self
                .park_after
                .is_some_and(|d| now.saturating_duration_since(self.last_active) >= d)
    }

    /// What is left of its idle timeout at `now`, in ms (at least 1), for
    /// the acceptor to keep it no longer than this worker would have.
    pub fn idle_left_ms(&self, cfg: &Config, now: Instant) -> u32 {
        let left = later(self.last_active, cfg.idle_timeout).saturating_duration_since(now);
        left.as_millis().clamp(1, u128::from(u32::MAX)) as u32
    }

    fn wants_input(&self) -> bool {
        !self.close_after && self.file.is_none() && self.out.len() - self.out_pos < HIGH_WATER
    }

    /// Makes all the progress possible; false means "close me now".
    pub fn drive(&mut self, sh: &Shared<'_>, io: &mut Io) -> Next {
        let next = self.drive_inner(sh, io);
        if next != Next::Close {
            self.release_buf(io);
            self.set_deadline(sh.cfg);
        }
        next
    }

    fn drive_inner(&mut self, sh: &Shared<'_>, io: &mut Io) -> Next {
        let (sent0, requests0) = (self.sent, self.requests);
        loop {
            if self.lingering {
                return self.linger_read(io);
            }
            if self.requests - requests0 >= REQUEST_BUDGET {
                return Next::Again;
            }
            if !self.try_ktls() {
                return Next::Close;
            }
            let mut progress = self.process(sh, io);
            if self.proxy_refused {
                return Next::Close;
            }
            if !self.close_after && !self.output_empty() {
                self.ensure_nodelay();
            }
            let blocked = match self.flush(sent0 + WRITE_BUDGET) {
                Ok((p, Flushed::Done)) => {
                    progress |= p;
                    false
                }
                Ok((p, Flushed::Blocked)) => {
                    progress |= p;
                    true
                }
                Ok((_, Flushed::Budget)) => {
                    self.last_active = io.now;
                    return Next::Again;
                }
                Err(_) => return Next::Close,
            };
            if progress {
                self.last_active = io.now;
            }
            if self.output_empty() {
                self.emit_logs();
                if self.close_after {
                    if self.linger || self.rlen > 0 || self.discard.is_some() {
                        self.start_linger(io);
                        continue;
                    }
                    return Next::Close;
                }
                if self.read_eof && !progress {
                    return Next::Close;
                }
                if self.draining
                    && self.is_idle()
                    && io.now.saturating_duration_since(self.last_active) >= DRAIN_IDLE_GRACE
                {
                    return Next::Close;
                }
            }
            if !blocked && self.read_ready && !self.read_eof && self.wants_input() {
                match self.fill(io) {
                    Fill::Data | Fill::Eof => progress = true,
                    Fill::Blocked | Fill::Full => {}
                    Fill::Failed => return Next::Close,
                }
            }
            if !progress {
                return Next::Wait;
            }
        }
    }

    /// Parses and answers every complete buffered request it may.
    fn process(&mut self, sh: &Shared<'_>, io: &mut Io) -> bool {
        let Some(buf) = self.rbuf.as_deref() else {
            return false;
        };
        if self.out.capacity() == 0 {
            self.out = io.take_out();
        }
        let limits = sh.cfg.limits();
        let mut fields = Vec::new();
        let mut consumed = 0;
        let mut handled = false;
        if self.awaiting_proxy {
            match proxy_protocol::parse(&buf[..self.rlen]) {
                Ok(Parsed::Incomplete) => return false,
                Ok(Parsed::Complete { header, len }) => {
                    consumed = len;
                    self.awaiting_proxy = false;
                    // The balancer's own address (LOCAL, UNKNOWN) stays the
                    // peer, and so does a header naming the socket's own
                    // peer; neither could be recognised back from parking.
                    match header.addrs {
                        Some((src, dst)) if src != self.peer => {
                            self.peer = src;
                            self.local = dst;
                        }
                        _ => self.never_park = true,
                    }
                }
                Err(e) => {
                    tracing::warn!(conn = self.id, peer = %self.peer, error = %e, "--accept-proxy: closing a connection that does not start with a valid PROXY header");
                    self.proxy_refused = true;
                    return false;
                }
            }
        }
        while self.wants_input() {
            if let Some(body) = &mut self.discard {
                match body.skip(&buf[consumed..self.rlen], sh.cfg.max_body_bytes) {
                    Ok((n, done)) => {
                        consumed += n;
                        if !done {
                            break;
                        }
                        self.discard = None;
                    }
                    Err(_) => {
                        // Its end is unknown, or too far: close (what is
                        // queued is still sent).
                        self.close_after = true;
                        self.linger = true;
                        break;
                    }
                }
            }
            if consumed == self.rlen {
                break;
            }
            if fields.is_empty() {
                fields = limits.fields();
            }
            // The buffer is `--max-header-bytes` long, so only a head that
            // starts at its beginning can fill it; one further in is moved
            // there and read on.
            let avail = &buf[consumed..self.rlen];
            let before = self.out.len();
            let (reply, method, target) =
                match baton_http::parse_request(avail, &limits, &mut fields) {
                    Ok(Some(req)) => {
                        let state = ConnState {
                            may_keep_alive: !self.draining
                                && (sh.cfg.max_requests == 0
                                    || self.requests + 1 < sh.cfg.max_requests),
                        };
                        let reply = http::respond(sh, &req, state, &mut io.scratch, &mut self.out);
                        consumed += req.len;
                        (reply, req.method, req.target)
                    }
                    Ok(None) => break, // room to read the rest
                    Err(e) => {
                        consumed = self.rlen;
                        (
                            http::bad_request(&mut self.out, sh.date, e.status()),
                            "-",
                            "-",
                        )
                    }
                };
            handled = true;
            self.requests = self.requests.saturating_add(1);
            let file_len = reply.file.as_ref().map_or(0, |f| f.end - f.offset);
            self.queued += (self.out.len() - before) as u64 + file_len;
            if io.access_log {
                self.logs.push_back(LogRec {
                    method: method.to_owned(),
                    path: target.to_owned(),
                    status: reply.status,
                    bytes: reply.body_bytes,
                    start: self.req_start,
                    end: self.queued,
                });
            }
            self.file = reply.file;
            if reply.body.has_body() {
                self.discard = Some(BodyDecoder::new(reply.body, ChunkLimits::default()));
            }
            if !reply.keep_alive {
                self.close_after = true;
                self.linger |= reply.linger;
            }
            self.req_start = io.now;
        }
        if consumed > 0 {
            if let Some(buf) = self.rbuf.as_deref_mut() {
                buf.copy_within(consumed..self.rlen, 0);
            }
            self.rlen -= consumed;
        }
        handled
    }

    /// Writes buffered bytes, then the file body, the latter until `sent`
    /// reaches `limit`. Ok((progress, how it stopped)).
    fn flush(&mut self, limit: u64) -> Result<(bool, Flushed), Errno> {
        if self.tls.is_some() {
            return self.flush_tls(limit);
        }
        let fd = self.sock.as_raw_fd();
        let mut progress = false;
        if self.file.is_some() && !self.corked {
            // Hold partial segments while a file body goes out (nginx's
            // tcp_nopush): each sendfile call ends with a segment shorter
            // than the MSS, which TCP_NODELAY would otherwise push on its
            // own. Uncorked when the body is done.
            self.set_cork(true);
        }
        while self.out_pos < self.out.len() {
            let mut flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            if self.file.is_some() {
                // nix has no name for MSG_MORE; the kernel knows it.
                flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
            }
            match socket::send(fd, &self.out[self.out_pos..], flags) {
                Ok(n) => {
                    self.out_pos += n;
                    self.sent += n as u64;
                    progress = true;
                    if self.out_pos < self.out.len() {
                        // The socket buffer is full; EPOLLOUT will follow.
                        return Ok((progress, Flushed::Blocked));
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok((progress, Flushed::Blocked)),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.file.is_some() && !self.nonblocking {
            // sendfile(2) takes no flags: the socket itself must not block.
            self.sock_nonblocking()?;
        }
        while let Some(fb) = &mut self.file {
            if self.sent >= limit {
                return Ok((progress, Flushed::Budget));
            }
            let count = (fb.end - fb.offset).min(SENDFILE_CHUNK) as usize;
            let mut off = fb.offset as libc::off64_t;
            match nix::sys::sendfile::sendfile64(&self.sock, &fb.file, Some(&mut off), count) {
                // The file shrank after its length was promised.
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => {
                    fb.offset += n as u64;
                    self.sent += n as u64;
                    progress = true;
                    if fb.offset >= fb.end {
                        self.file = None;
                        if self.corked {
                            self.set_cork(false);
                        }
                    }
                    // A short count is retried once: the next call says
                    // EAGAIN (wait for EPOLLOUT) or 0 (file truncated).
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok((progress, Flushed::Blocked)),
                Err(e) => return Err(e),
            }
        }
        Ok((progress, Flushed::Done))
    }

    /// [`Conn::flush`] through the TLS session: buffered bytes, then the
    /// file body read in chunks (no sendfile: the kernel would send
    /// plaintext), each encrypted and written as far as the socket takes.
    fn flush_tls(&mut self, limit: u64) -> Result<(bool, Flushed), Errno> {
        let tls_err = |e: baton_tls::TlsError| {
            tracing::debug!(kind = e.kind(), error = %e, "TLS write failed");
            Errno::EPIPE
        };
        let Some(t) = self.tls.as_mut() else {
            return Ok((false, Flushed::Done));
        };
        let mut progress = false;
        // What rustls holds from before goes first.
        if !t.flush_tls().map_err(tls_err)? {
            return Ok((progress, Flushed::Blocked));
        }
        use std::io::Write;
        while self.out_pos < self.out.len() {
            match t.write(&self.out[self.out_pos..]) {
                Ok(0) => return Ok((progress, Flushed::Blocked)),
                Ok(n) => {
                    self.out_pos += n;
                    self.sent += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok((progress, Flushed::Blocked))
                }
                Err(e) => return Err(tls_err(baton_tls::TlsError::from_io(e))),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        let mut chunk = [0u8; TLS_FILE_CHUNK];
        while let Some(fb) = &mut self.file {
            if self.sent >= limit {
                return Ok((progress, Flushed::Budget));
            }
            let want = (fb.end - fb.offset).min(TLS_FILE_CHUNK as u64) as usize;
            use std::os::unix::fs::FileExt;
            let n = match fb.file.read_at(&mut chunk[..want], fb.offset) {
                // The file shrank after its length was promised.
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => n,
                Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
            };
            match t.write(&chunk[..n]) {
                Ok(0) => return Ok((progress, Flushed::Blocked)),
                Ok(w) => {
                    fb.offset += w as u64;
                    self.sent += w as u64;
                    progress = true;
                    if fb.offset >= fb.end {
                        self.file = None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok((progress, Flushed::Blocked))
                }
                Err(e) => return Err(tls_err(baton_tls::TlsError::from_io(e))),
            }
        }
        if !t.flush_tls().map_err(tls_err)? {
            return Ok((progress, Flushed::Blocked));
        }
        Ok((progress, Flushed::Done))
    }

    /// [`Conn::fill`] through the TLS session.
    fn fill_tls(&mut self, io: &mut Io) -> Fill {
        let Some(t) = self.tls.as_mut() else {
            return Fill::Failed;
        };
        let buf = self.rbuf.get_or_insert_with(|| io.take_buf());
        let room = buf.len() - self.rlen;
        if room == 0 {
            return Fill::Full;
        }
        if let Err(e) = t.on_readable() {
            if e.kind() == "plaintext-http" {
                // Plain HTTP on the TLS port: say so in plain HTTP.
                let _ = socket::send(
                    self.sock.as_raw_fd(),
                    baton_tls::PLAINTEXT_HTTP_RESPONSE,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                );
            }
            tracing::info!(peer = %self.peer, kind = e.kind(), error = %e, "TLS connection closed");
            return Fill::Failed;
        }
        use std::io::Read;
        match t.read(&mut buf[self.rlen..]) {
            Ok(0) => {
                self.read_eof = true;
                Fill::Eof
            }
            Ok(n) => {
                if self.rlen == 0 && self.requests > 0 {
                    self.req_start = io.now;
                }
                self.rlen += n;
                // rustls may hold more plaintext than fit: read again then.
                self.read_ready = n == room || self.peer_fin;
                Fill::Data
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.read_ready = false;
                if t.peer_closed() {
                    self.read_eof = true;
                    return Fill::Eof;
                }
                Fill::Blocked
            }
            Err(e) => {
                let e = baton_tls::TlsError::from_io(e);
                tracing::info!(peer = %self.peer, kind = e.kind(), error = %e, "TLS connection closed");
                Fill::Failed
            }
        }
    }

    fn set_cork(&mut self, on: bool) {
        // A refusal only costs some segment coalescing.
        let _ = socket2::SockRef::from(&self.sock).set_cork(on);
        self.corked = on;
    }

    fn sock_nonblocking(&mut self) -> Result<(), Errno> {
        socket2::SockRef::from(&self.sock)
            .set_nonblocking(true)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        self.nonblocking = true;
        Ok(())
    }

    /// Turns Nagle's algorithm off once a connection outlives a response:
    /// a small response must not wait for the ACK of the one before it.
    /// A connection that closes after its response never needs it (the
    /// close pushes the last segment), which saves a system call on every
    /// one-request connection.
    fn ensure_nodelay(&mut self) {
        if !self.nodelay {
            self.nodelay = true;
            let _ = self.sock.set_nodelay(true);
        }
    }

    fn fill(&mut self, io: &mut Io) -> Fill {
        if self.tls.is_some() {
            return self.fill_tls(io);
        }
        let buf = self.rbuf.get_or_insert_with(|| io.take_buf());
        let room = buf.len() - self.rlen;
        if room == 0 {
            return Fill::Full;
        }
        let fd = self.sock.as_raw_fd();
        loop {
            match socket::recv(fd, &mut buf[self.rlen..], MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    self.read_eof = true;
                    return Fill::Eof;
                }
                Ok(n) => {
                    if self.rlen == 0 && self.requests > 0 {
                        self.req_start = io.now;
                    }
                    self.rlen += n;
                    if n < room && !self.peer_fin {
                        self.read_ready = false;
                    }
                    return Fill::Data;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    self.read_ready = false;
                    return Fill::Blocked;
                }
                Err(Errno::EIO) if self.ktls => {
                    // A record that is not application data (an alert such
                    // as close_notify, a TLS 1.3 KeyUpdate): a plain recv
                    // cannot take it, and baton does not handle them after
                    // the hand-off (see baton_tls::ktls).
                    tracing::debug!(
                        conn = self.id,
                        "kTLS: a non-data TLS record ends the connection"
                    );
                    return Fill::Failed;
                }
                Err(_) => return Fill::Failed,
            }
        }
    }

    fn start_linger(&mut self, io: &mut Io) {
        if let Some(t) = self.tls.as_mut() {
            // close_notify first, then the FIN.
            let _ = t.close();
        }
        let _ = self.sock.shutdown(Shutdown::Write);
        self.lingering = true;
        self.linger_since = io.now;
        self.rlen = 0;
        self.discard = None;
    }

    /// Reads and discards until EOF.
    fn linger_read(&mut self, io: &mut Io) -> Next {
        for _ in 0..LINGER_BUDGET {
            self.rlen = 0;
            match self.fill(io) {
                Fill::Data | Fill::Full => continue,
                Fill::Blocked => return Next::Wait,
                Fill::Eof | Fill::Failed => return Next::Close,
            }
        }
        Next::Again
    }

    /// Between requests a connection holds no buffer: an idle keep-alive
    /// connection costs its struct and its socket, nothing more.
    fn release_buf(&mut self, io: &mut Io) {
        if self.rlen == 0 {
            if let Some(b) = self.rbuf.take() {
                io.give_buf(b);
            }
        }
        if self.output_empty() && self.out.capacity() > 0 {
            io.give_out(std::mem::take(&mut self.out));
        }
    }

    /// Sets the deadline for the current state (also after `park_after`
    /// changed).
    pub fn set_deadline(&mut self, cfg: &Config) {
        self.deadline = if self.lingering {
            later(self.linger_since, cfg.linger_timeout)
        } else if self.awaiting_proxy {
            later(self.req_start, cfg.accept_proxy_timeout)
        } else if !self.output_empty() {
            later(self.last_active, cfg.send_timeout)
        } else if self.rlen > 0 || self.discard.is_some() || self.requests == 0 {
            later(self.req_start, cfg.header_timeout)
        } else if self.draining {
            later(self.last_active, cfg.idle_timeout.min(DRAIN_IDLE_GRACE))
        } else if let Some(park) = self.park_after.filter(|p| *p < cfg.idle_timeout) {
            // Parked when this passes (see `park_due`).
            later(self.last_active, park)
        } else {
            later(self.last_active, cfg.idle_timeout)
        };
    }

    /// The connection's deadline passed. A client in the middle of sending
    /// a request head gets 408 (best effort); every other state just
    /// closes. Returns why, for the log.
    pub fn timed_out(&mut self, sh: &Shared<'_>) -> &'static str {
        if self.lingering {
            "linger done"
        } else if !self.output_empty() {
            "send timeout"
        } else if self.awaiting_proxy {
            tracing::warn!(conn = self.id, peer = %self.peer, bytes = self.rlen, "--accept-proxy: no whole PROXY header within --accept-proxy-timeout; closing");
            "no PROXY header"
        } else if self.rlen > 0 || self.discard.is_some() {
            let mut out = Vec::new();
            http::bad_request(&mut out, sh.date, 408);
            let _ = socket::send(
                self.sock.as_raw_fd(),
                &out,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            );
            "header timeout"
        } else if self.requests == 0 {
            "no request"
        } else {
            "idle"
        }
    }

    /// Logs every response fully written.
    fn emit_logs(&mut self) {
        while let Some(l) = self.logs.front() {
            if l.end > self.sent {
                break;
            }
            log_access(l, self.peer, true);
            self.logs.pop_front();
        }
    }

    /// Before the connection is dropped: logs what is left (incomplete).
    pub fn close(&mut self, io: &mut Io) {
        if let Some(t) = self.tls.as_mut() {
            // Best effort: a client that sees close_notify knows the
            // response was not cut.
            let _ = t.close();
        }
        self.emit_logs();
        for l in self.logs.drain(..) {
            log_access(&l, self.peer, false);
        }
        if let Some(b) = self.rbuf.take() {
            io.give_buf(b);
        }
        io.give_out(std::mem::take(&mut self.out));
    }

    pub fn requests(&self) -> u32 {
        self.requests
    }
}

/// `t + d`, saturating at about a century (an absurd timeout flag must
/// not overflow `Instant`).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d.min(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(t)
}

fn log_access(l: &LogRec, peer: SocketAddr, complete: bool) {
    let elapsed = Instant::now().saturating_duration_since(l.start);
    let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    tracing::info!(
        target: "access",
        peer = %peer,
        method = %l.method,
        path = %l.path,
        status = l.status,
        bytes = l.bytes,
        duration_us,
        complete,
    );
}

enum Flushed {
    /// Everything queued was written.
    Done,
    /// The socket is full: wait for EPOLLOUT.
    Blocked,
    /// The turn's write budget is spent; more can be written.
    Budget,
}

enum Fill {
    Data,
    Eof,
    Blocked,
    Full,
    Failed,
}
