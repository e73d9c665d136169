//! A non-blocking TLS server connection for a worker's mio loop.
//!
//! [`TlsConn`] owns a rustls `ServerConnection` and the socket (any
//! non-blocking `Read + Write`: a `mio::net::TcpStream`, a
//! `std::net::TcpStream` set non-blocking, ...). The worker's loop drives
//! it the way rustls's mio example and sozu do:
//!
//! * readable → [`TlsConn::on_readable`]: `read_tls` until the socket says
//!   `WouldBlock` (or rustls's buffer is full), `process_new_packets`
//!   after each read, and any handshake bytes rustls wants to send are
//!   written at once;
//! * then the application reads plaintext with [`Read`] (`WouldBlock`:
//!   nothing yet; `Ok(0)`: the client sent close_notify; when rustls's
//!   buffer had filled up, a read reads the socket again, so nothing is
//!   left behind under edge-triggered readiness), writes with
//!   [`Write`] (plaintext is encrypted into rustls's buffer, then written
//!   as far as the socket takes it);
//! * writable → [`TlsConn::flush_tls`];
//! * [`TlsConn::interest`] says what to register for next;
//! * [`TlsConn::close`] queues close_notify and flushes it; the worker
//!   then shuts the socket down and drops it.
//!
//! A worker's loop, in short (mio, edge-triggered):
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use baton_tls::{TlsConn, TlsError};
//! use mio::{Events, Interest, Poll, Token};
//!
//! fn serve(config: Arc<rustls::ServerConfig>, stream: std::net::TcpStream) -> Result<(), TlsError> {
//!     stream.set_nonblocking(true)?;
//!     let mut poll = Poll::new()?;
//!     let mut tls = TlsConn::new(config, mio::net::TcpStream::from_std(stream))?;
//!     tls.set_handshake_deadline(Duration::from_secs(10));
//!     poll.registry()
//!         .register(tls.get_mut(), Token(0), Interest::READABLE | Interest::WRITABLE)?;
//!     let mut events = Events::with_capacity(8);
//!     loop {
//!         let timeout = tls.handshake_deadline().map(|at| at.saturating_duration_since(std::time::Instant::now()));
//!         poll.poll(&mut events, timeout)?;
//!         tls.check_deadline(std::time::Instant::now())?;
//!         tls.on_readable()?;
//!         let mut buf = [0u8; 4096];
//!         match tls.read(&mut buf) {
//!             Ok(0) => break, // close_notify
//!             Ok(n) => { tls.write_all(&buf[..n]).map_err(TlsError::from_io)?; }
//!             Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
//!             Err(e) => return Err(TlsError::from_io(e)),
//!         }
//!         tls.flush_tls()?;
//!     }
//!     tls.close()?;
//!     Ok(())
//! }
//! ```
//!
//! The handshake has a deadline ([`TlsConn::set_handshake_deadline`],
//! checked by [`TlsConn::check_deadline`] from the worker's timer): a
//! client that opens a connection and sends nothing, or trickles, costs a
//! slot only until then.
//!
//! # Errors
//!
//! [`TlsError`] says what went wrong in a way a worker can log and count
//! ([`TlsError::kind`]): a client that sent **plaintext HTTP** to the TLS
//! port (the first bytes are an HTTP method: the worker may answer
//! [`PLAINTEXT_HTTP_RESPONSE`] in clear text, as nginx does), bytes that
//! are **not TLS** at all, an **alert** from the client (for example
//! `bad_certificate` when it does not trust ours), the **key process**
//! failing or timing out, the **handshake timeout**, an **EOF** during the
//! handshake, another TLS protocol error, or an I/O error. After an error
//! the connection is dead; rustls's alert, if any, has been flushed best
//! effort (not for plaintext HTTP: a TLS alert means nothing to that
//! client). `Read` and `Write` return `io::Error`s; [`TlsError::from_io`]
//! gets the classified error back out of one.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, ServerConfig, ServerConnection};

use crate::ktls::{self, Kernel, KtlsError};
use crate::signer::SignError;

/// What a worker may write, in clear, to a client that spoke plain HTTP
/// to the TLS port, before closing.
pub const PLAINTEXT_HTTP_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\nContent-Length: 48\r\nConnection: close\r\n\r\n\
This port speaks HTTPS; use https:// to reach it\n";

/// How many first bytes of a connection are kept to classify errors.
const SNIFF: usize = 8;

/// How a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the client sent plaintext HTTP (\"{0}\") to the TLS port")]
    PlaintextHttp(String),
    #[error("the client sent bytes that are not TLS (first byte 0x{0:02x})")]
    NotTls(u8),
    #[error("the client sent a TLS alert: {0:?}")]
    Alert(AlertDescription),
    #[error("signing with the key process failed: {0}")]
    KeyProcess(String),
    #[error("the TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the client closed the connection during the TLS handshake")]
    EofInHandshake,
    #[error("TLS error: {0}")]
    Tls(rustls::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl TlsError {
    /// The `TlsError` inside an `io::Error` from [`TlsConn`]'s `Read` or
    /// `Write` (which must speak `io::Error`), else the I/O error itself:
    /// the classification survives the trip.
    pub fn from_io(e: io::Error) -> TlsError {
        if e.get_ref().is_some_and(|inner| inner.is::<TlsError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(t) = inner.downcast::<TlsError>() {
                    return *t;
                }
            }
            return TlsError::Io(io::Error::other("TLS error"));
        }
        TlsError::Io(e)
    }

    /// A short stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::PlaintextHttp(_) => "plaintext-http",
            TlsError::NotTls(_) => "not-tls",
            TlsError::Alert(_) => "alert",
            TlsError::KeyProcess(_) => "key-process",
            TlsError::HandshakeTimeout(_) => "handshake-timeout",
            TlsError::EofInHandshake => "eof-in-handshake",
            TlsError::Tls(_) => "tls",
            TlsError::Io(_) => "io",
        }
    }
}

/// The first bytes of an HTTP/1 request or an HTTP/2 preface.
const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI ",
];

/// Classifies a rustls error given the first bytes the client sent.
fn classify(err: rustls::Error, first: &[u8]) -> TlsError {
    if let rustls::Error::AlertReceived(a) = err {
        return TlsError::Alert(a);
    }
    if let rustls::Error::Other(ref o) = err {
        if let Some(s) = o.0.downcast_ref::<SignError>() {
            return TlsError::KeyProcess(s.to_string());
        }
    }
    if let Some(&b0) = first.first() {
        if b0 != 0x16 {
            let looks_http = HTTP_METHODS.iter().any(|m| {
                let n = m.len().min(first.len());
                n >= 3 && first[..n] == m[..n]
            });
            if looks_http {
                let word = first
                    .split(|&b| b == b' ')
                    .next()
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .unwrap_or_default();
                return TlsError::PlaintextHttp(word);
            }
            return TlsError::NotTls(b0);
        }
    }
    TlsError::Tls(err)
}

/// Follows the record framing of the bytes read from the socket, so that
/// a hand-off to the kernel happens only at a record boundary (rustls holds
/// no partial record the kernel would never see).
#[derive(Debug, Default, Clone, Copy)]
struct Framing {
    hdr: [u8; 5],
    hlen: usize,
    /// Body bytes of the current record still to come.
    left: usize,
}

impl Framing {
    fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.left > 0 {
                let n = self.left.min(b.len());
                self.left -= n;
                b = &b[n..];
                continue;
            }
            let n = (5 - self.hlen).min(b.len());
            self.hdr[self.hlen..self.hlen + n].copy_from_slice(&b[..n]);
            self.hlen += n;
            b = &b[n..];
            if self.hlen == 5 {
                self.hlen = 0;
                self.left = usize::from(u16::from_be_bytes([self.hdr[3], self.hdr[4]]));
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.hlen == 0 && self.left == 0
    }
}

/// Records the first bytes read from the socket, and their framing.
struct Tap<'a, S> {
    inner: &'a mut S,
    first: &'a mut [u8; SNIFF],
    len: &'a mut usize,
    framing: &'a mut Framing,
}

impl<S: Read> Read for Tap<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let take = (SNIFF - *self.len).min(n);
        self.first[*self.len..*self.len + take].copy_from_slice(&buf[..take]);
        *self.len += take;
        self.framing.feed(&buf[..n]);
        Ok(n)
    }
}

/// What [`TlsConn::interest`] asks the loop to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

/// A socket a worker owns elsewhere, read and written by its raw fd with
/// `MSG_DONTWAIT` (and `MSG_NOSIGNAL`): the transport under a [`TlsConn`]
/// whose socket stays blocking, or is also used for `splice(2)` or epoll
/// by the worker. The fd must outlive it; it never closes the fd.
#[derive(Debug, Clone, Copy)]
pub struct FdIo(pub std::os::fd::RawFd);

impl std::os::fd::AsRawFd for FdIo {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::sys::socket::recv(self.0, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::MsgFlags;
        loop {
            match nix::sys::socket::send(
                self.0,
                buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One `sendmsg(2)` of every slice: rustls hands all its queued TLS
    /// records at once, and the default (the first slice only) would cost
    /// a system call per record.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        use nix::sys::socket::MsgFlags;
        loop {
            match nix::sys::socket::sendmsg::<()>(
                self.0,
                bufs,
                &[],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS server connection over a non-blocking socket.
pub struct TlsConn<S> {
    conn: ServerConnection,
    sock: S,
    first: [u8; SNIFF],
    first_len: usize,
    /// The socket reached its end.
    eof: bool,
    /// The client sent close_notify.
    peer_closed: bool,
    deadline: Option<(Instant, Duration)>,
    failed: bool,
    framing: Framing,
}

/// A [`TlsConn::into_ktls`] that did not happen.
pub enum Handoff<S> {
    /// Nothing was lost: the session is still rustls's (not ready yet, an
    /// unsupported suite, or the kernel refused the ULP).
    Kept(Box<TlsConn<S>>, KtlsError),
    /// The keys were extracted but the kernel did not take them: the
    /// connection cannot go on; close the socket.
    Failed(S, KtlsError),
}

impl<S> std::fmt::Debug for Handoff<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handoff::Kept(_, e) => write!(f, "Kept({e})"),
            Handoff::Failed(_, e) => write!(f, "Failed({e})"),
        }
    }
}

impl<S> std::fmt::Debug for TlsConn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("handshaking", &self.conn.is_handshaking())
            .field("eof", &self.eof)
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl<S: Read + Write> TlsConn<S> {
    pub fn new(config: Arc<ServerConfig>, sock: S) -> Result<TlsConn<S>, TlsError> {
        let conn = ServerConnection::new(config).map_err(TlsError::Tls)?;
        Ok(TlsConn {
            conn,
            sock,
            first: [0; SNIFF],
            first_len: 0,
            eof: false,
            peer_closed: false,
            deadline: None,
            failed: false,
            framing: Framing::default(),
        })
    }

    /// The handshake must finish within `timeout` from now.
    pub fn set_handshake_deadline(&mut self, timeout: Duration) {
        self.deadline = Some((Instant::now() + timeout, timeout));
    }

    /// When the handshake deadline passes (`None`: no deadline, or the
    /// handshake is over), for the worker's timer.
    pub fn handshake_deadline(&self) -> Option<Instant> {
        match self.deadline {
            Some((at, _)) if self.conn.is_handshaking() => Some(at),
            _ => None,
        }
    }

    /// `Err(HandshakeTimeout)` once the deadline has passed with the
    /// handshake unfinished.
    pub fn check_deadline(&mut self, now: Instant) -> Result<(), TlsError> {
        match self.deadline {
            Some((at, timeout)) if self.conn.is_handshaking() && now >= at => {
                self.failed = true;
                Err(TlsError::HandshakeTimeout(timeout))
            }
            _ => Ok(()),
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The client sent close_notify (reads return `Ok(0)`).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The rustls connection (SNI, ALPN, version, resumption...).
    pub fn connection(&self) -> &ServerConnection {
        &self.conn
    }

    pub fn connection_mut(&mut self) -> &mut ServerConnection {
        &mut self.conn
    }

    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The socket (for example to write [`PLAINTEXT_HTTP_RESPONSE`]).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.sock
    }

    pub fn into_inner(self) -> S {
        self.sock
    }

    /// What to wait for next: readable while rustls wants bytes and the
    /// socket is open, writable while TLS bytes wait to be sent.
    pub fn interest(&self) -> Interest {
        Interest {
            readable: !self.eof && !self.failed && self.conn.wants_read(),
            writable: self.conn.wants_write(),
        }
    }

    /// Reads and processes whatever the socket has; sends what the
    /// handshake wants to send. Returns how many TLS bytes were read.
    pub fn on_readable(&mut self) -> Result<usize, TlsError> {
        if self.failed {
            return Err(TlsError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS connection already failed",
            )));
        }
        let mut total = 0;
        while !self.eof && self.conn.wants_read() {
            let n = self.conn.read_tls(&mut Tap {
                inner: &mut self.sock,
                first: &mut self.first,
                len: &mut self.first_len,
                framing: &mut self.framing,
            });
            match n {
                Ok(0) => self.eof = true,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.failed = true;
                    return Err(TlsError::Io(e));
                }
            }
            self.process()?;
        }
        if self.eof && self.conn.is_handshaking() {
            self.process()?;
            self.failed = true;
            return Err(TlsError::EofInHandshake);
        }
        self.flush_tls()?;
        Ok(total)
    }

    fn process(&mut self) -> Result<(), TlsError> {
        match self.conn.process_new_packets() {
            Ok(state) => {
                if state.peer_has_closed() {
                    self.peer_closed = true;
                }
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                let err = classify(e, &self.first[..self.first_len]);
                if !matches!(err, TlsError::PlaintextHttp(_) | TlsError::NotTls(_)) {
                    // Best effort: tell the client why (rustls queued an alert).
                    let _ = self.flush_tls();
                }
                Err(err)
            }
        }
    }

    /// Writes queued TLS bytes until done or the socket would block.
    /// `Ok(true)` when nothing is left queued.
    pub fn flush_tls(&mut self) -> Result<bool, TlsError> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.failed = true;
                    return Err(TlsError::Io(e));
                }
            }
        }
        Ok(true)
    }

    /// Queues close_notify and writes it as far as the socket takes it;
    /// `Ok(true)` when all was sent.
    pub fn close(&mut self) -> Result<bool, TlsError> {
        self.conn.send_close_notify();
        self.flush_tls()
    }
}

impl<S: Read + Write + std::os::fd::AsRawFd> TlsConn<S> {
    /// Whether the session can go to the kernel now: handshake done,
    /// nothing buffered either way (no received plaintext, no partial
    /// received record, no TLS bytes to write, such as TLS 1.3 session
    /// tickets), the client has not closed, and the suite is one the
    /// kernel knows. Needs [`crate::TlsOptions::ktls`].
    pub fn ktls_ready(&mut self) -> Result<ktls::Version, KtlsError> {
        if self.failed || self.eof || self.peer_closed {
            return Err(KtlsError::NotReady("the connection is closing"));
        }
        if self.conn.is_handshaking() {
            return Err(KtlsError::NotReady("handshaking"));
        }
        if !self.framing.at_boundary() {
            return Err(KtlsError::NotReady("a partial record is buffered"));
        }
        let state = self
            .conn
            .process_new_packets()
            .map_err(|_| KtlsError::NotReady("TLS error"))?;
        if state.plaintext_bytes_to_read() > 0 {
            return Err(KtlsError::NotReady("received plaintext is buffered"));
        }
        if state.tls_bytes_to_write() > 0 || self.conn.wants_write() {
            return Err(KtlsError::NotReady("TLS bytes wait to be sent"));
        }
        if state.peer_has_closed() {
            return Err(KtlsError::NotReady("the client sent close_notify"));
        }
        ktls::supported(
            self.conn.protocol_version(),
            self.conn.negotiated_cipher_suite(),
        )
    }

    /// Hands the session to the kernel (see [`crate::ktls`]): when
    /// [`TlsConn::ktls_ready`], attaches the `tls` ULP (a refusal keeps
    /// the session: [`Handoff::Kept`]), then extracts the keys and sets
    /// `TLS_TX` and `TLS_RX` (a refusal now is [`Handoff::Failed`]: close).
    /// On success the socket is returned, to be used in plaintext.
    pub fn into_ktls(mut self, kernel: &mut dyn Kernel) -> Result<S, Handoff<S>> {
        let version = match self.ktls_ready() {
            Ok(v) => v,
            Err(e) => return Err(Handoff::Kept(Box::new(self), e)),
        };
        let fd = self.sock.as_raw_fd();
        if let Err(e) = kernel.set_ulp(fd) {
            return Err(Handoff::Kept(Box::new(self), KtlsError::Ulp(e)));
        }
        match ktls::install(kernel, fd, version, self.conn) {
            Ok(()) => Ok(self.sock),
            Err(e) => Err(Handoff::Failed(self.sock, e)),
        }
    }
}

impl<S: Read + Write> Read for TlsConn<S> {
    /// Plaintext from the client: `WouldBlock` when none has arrived yet,
    /// `Ok(0)` after close_notify, `UnexpectedEof` when the socket closed
    /// without it (a truncation attack or a careless client).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.conn.reader().read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !self.eof && !self.failed => {
                self.on_readable().map_err(to_io)?;
                self.conn.reader().read(buf)
            }
            other => other,
        }
    }
}

impl<S: Read + Write> Write for TlsConn<S> {
    /// Encrypts plaintext into rustls's buffer and writes as much as the
    /// socket takes; `WouldBlock` when the buffer is full.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush_tls().map_err(to_io)?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        if self.flush_tls().map_err(to_io)? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

fn to_io(e: TlsError) -> io::Error {
    match e {
        TlsError::Io(e) => e,
        // Recovered by TlsError::from_io.
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_finds_record_boundaries() {
        let mut f = Framing::default();
        assert!(f.at_boundary());
        let rec = |len: u16| {
            let mut v = vec![0x17, 3, 3];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend(std::iter::repeat_n(0xee, usize::from(len)));
            v
        };
        let stream = [rec(3), rec(0), rec(300)].concat();
        // Fed whole, then byte by byte, then in odd pieces.
        f.feed(&stream);
        assert!(f.at_boundary());
        for b in &stream[..stream.len() - 1] {
            f.feed(std::slice::from_ref(b));
        }
        assert!(!f.at_boundary());
        f.feed(&stream[stream.len() - 1..]);
        assert!(f.at_boundary());
        f.feed(&stream[..2]);
        assert!(!f.at_boundary(), "half a header");
        f.feed(&stream[2..8]);
        assert!(f.at_boundary(), "the 3-byte record ends at 8");
        f.feed(&stream[8..12]);
        assert!(!f.at_boundary());
    }

    #[test]
    fn classification() {
        let e = || rustls::Error::General("x".into());
        assert!(matches!(classify(e(), b"GET / HT"), TlsError::PlaintextHttp(m) if m == "GET"));
        assert!(matches!(classify(e(), b"OPTIONS "), TlsError::PlaintextHttp(m) if m == "OPTIONS"));
        assert!(matches!(classify(e(), b"\x00\x01"), TlsError::NotTls(0)));
        assert!(matches!(classify(e(), b"\x16\x03\x01"), TlsError::Tls(_)));
        assert!(matches!(
            classify(
                rustls::Error::AlertReceived(AlertDescription::BadCertificate),
                b""
            ),
            TlsError::Alert(AlertDescription::BadCertificate)
        ));
        let se = rustls::Error::Other(rustls::OtherError(Arc::new(SignError::Closed)));
        assert_eq!(classify(se, b"\x16").kind(), "key-process");
        let io = to_io(TlsError::Alert(AlertDescription::BadCertificate));
        assert_eq!(TlsError::from_io(io).kind(), "alert");
        assert_eq!(
            TlsError::from_io(io::ErrorKind::BrokenPipe.into()).kind(),
            "io"
        );
    }
}
