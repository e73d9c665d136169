//! The handoff protocol: every message baton's acceptor and its workers
//! exchange, and the only place that encodes or decodes them.
//!
//! # Transport
//!
//! One `AF_UNIX`/`SOCK_SEQPACKET` socket per worker. SEQPACKET keeps message
//! boundaries and delivers a message and its `SCM_RIGHTS` file descriptors
//! atomically, so there is no framing layer and no partial read. A spawned
//! worker inherits its end as the fd named by the environment variable
//! [`CHANNEL_FD_ENV`]; a worker started by someone else connects to the
//! acceptor's worker socket (`--worker-socket`) and says HELLO.
//!
//! # Wire format (versions 1 and 2)
//!
//! All integers are little-endian. Every message starts with a 4-byte header:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 1    | protocol version: 1, or 2 ([`VERSION`]) |
//! | 1      | 1    | kind (table below)                      |
//! | 2      | 2    | reserved, must be 0                     |
//!
//! | kind | name    | since | direction         | length      | fds | body (offsets from 0)                                   |
//! |-----:|---------|------:|-------------------|-------------|----:|---------------------------------------------------------|
//! | 1    | HELLO   | 1     | worker → acceptor | 16          | 0   | pid u32 @4, capacity u32 @8 (0: no limit of its own), flags u32 @12 (HELLO flags, below) |
//! | 2    | WELCOME | 1     | acceptor → worker | 8           | 0   | worker id u32 @4                                        |
//! | 3    | CONN    | 1     | acceptor → worker | 64          | 1   | conn record (60 bytes, below) @4                        |
//! | 4    | ACK     | 1     | worker → acceptor | 8 + 8·n     | 0   | n u16 @4 (1..=64), reserved u16 @6, n × conn id u64 @8  |
//! | 5    | DONE    | 1     | worker → acceptor | 8 + 8·n     | 0   | same layout as ACK                                      |
//! | 6    | DRAIN   | 1     | acceptor → worker | 4           | 0   | none                                                    |
//! | 7    | CONNS   | 2     | acceptor → worker | 8 + 60·n    | n   | n u16 @4 (1..=64), reserved u16 @6, n × conn record @8; the i-th fd is the i-th connection's |
//! | 8    | PARK    | 2     | worker → acceptor | 8 + 64·n    | n   | n u16 @4 (1..=64), reserved u16 @6, n × (conn record, idle ms u32) @8 |
//!
//! HELLO flags (u32 @12), what the worker declares about itself:
//!
//! | bit | name                 | meaning                                                                 |
//! |----:|----------------------|-------------------------------------------------------------------------|
//! | 0   | TLS ([`FLAG_TLS`])   | it terminates TLS with the bundle it was given (`BATON_TLS_*`) on every connection of a TLS pool |
//! | 1–31 | —                   | reserved, must be 0: a HELLO with an unknown bit set is refused         |
//!
//! A worker that does not set TLS (any worker written before the flag: it
//! sent 0) works in a pool without TLS as before; in a pool with TLS
//! (`--tls-cert`) the acceptor refuses it (closes its channel before
//! WELCOME, gives it no connection, and does not restart a spawned one),
//! because it would answer TLS clients in plaintext. A worker that sets TLS
//! in a pool without TLS is accepted (the acceptor logs a warning: it was
//! given no bundle, so it serves plaintext there, as the pool says).
//! Unknown bits are refused rather than ignored, as every reserved field
//! is: a bit is a promise about what the worker does to its clients, and
//! an acceptor that cannot read it must not guess.
//!
//! A conn record is 60 bytes: conn id u64 @0, listener index u16 @8,
//! reserved u16 @10 (0), peer addr @12, local addr @36.
//!
//! A socket address is 24 bytes: family u8 (4 or 6) @0, reserved u8 @1
//! (0), port u16 @2, IPv6 scope id u32 @4 (0 for IPv4), address @8 (16
//! bytes; an IPv4 address uses the first 4 and the rest must be 0).
//!
//! # Versions
//!
//! The worker's HELLO carries, in its header, the highest version it
//! speaks; the acceptor's WELCOME carries the version both will use (the
//! lower of the two), and every later message on the channel carries that
//! version. A message whose version is not the channel's, or whose kind is
//! newer than its version, ends the channel. So a version 1 worker (its
//! HELLO says 1) keeps working with a version 2 acceptor, unchanged.
//!
//! Version 2 adds:
//!
//! * **CONNS**: several connections in one message, one record and one fd
//!   each, in the same order. When one wake-up accepts several connections
//!   for the same worker, one `sendmsg` carries them all. Ownership is as
//!   for CONN: the acceptor keeps each fd until that id is acknowledged.
//! * **PARK**: the worker hands idle keep-alive connections back (each
//!   record as the acceptor sent it, with the fd, and how many ms are left of
//!   its idle timeout; 0: the acceptor's default). It sends PARK only for a
//!   connection whose response is fully written and of which it has
//!   buffered nothing, and closes its copy after. For the acceptor a parked
//!   connection is finished by that worker (as with DONE); it holds the fd
//!   without reading from it, closes it when the client does or when the
//!   idle time runs out, and hands it to a worker, like a new connection,
//!   when the client sends its next request.
//!
//! # Rules
//!
//! * The worker sends HELLO first. The acceptor answers WELCOME and sends no
//!   CONN before that.
//! * Every CONN carries exactly one fd: the accepted TCP socket. The acceptor
//!   keeps its own copy until the worker ACKs the connection id; if the
//!   worker's channel closes first, the connection goes to another worker.
//!   The worker library sends the ACK before the application sees the
//!   connection, so a connection is never served twice.
//! * The worker sends DONE when it has closed a connection. The number of
//!   CONNs not yet DONE is the worker's in-flight count, which drives
//!   dispatch and capacity.
//! * DRAIN: no CONN follows; the worker finishes its connections and exits.
//! * A message with an unknown version or kind, a bad length, a non-zero
//!   reserved field, a count out of range, the wrong number of fds, or a
//!   truncated payload or control message ends the channel: the receiver
//!   disconnects the peer. Nothing is ever "skipped".
//!
//! This table is enough to write a worker in any language that can pass file
//! descriptors (Python's `socket.recv_fds` does).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The highest protocol version this library speaks.
pub const VERSION: u8 = 2;
/// The lowest version it still speaks (a version 1 peer keeps working).
pub const VERSION_MIN: u8 = 1;
/// The most connections one CONNS or PARK message carries (SCM_RIGHTS
/// could carry 253; 64 keeps a message within 4 KiB and is past the point
/// where batching stops paying).
pub const MAX_BATCH: usize = 64;
/// The environment variable naming the inherited channel fd of a spawned worker.
pub const CHANNEL_FD_ENV: &str = "BATON_CHANNEL_FD";
/// The environment variable naming the worker's id in the pool (informational).
pub const WORKER_ID_ENV: &str = "BATON_WORKER_ID";
/// The most connection ids one ACK or DONE message may carry.
pub const MAX_IDS: usize = 64;
/// The largest valid message, in bytes (a full PARK).
pub const MAX_MSG: usize = 8 + PARK_RECORD * MAX_BATCH;

/// HELLO flag bit 0: the worker terminates TLS with the bundle it was
/// given. See [`HelloFlags`].
pub const FLAG_TLS: u32 = 1 << 0;
/// Every HELLO flag bit this library knows; any other set bit is refused.
pub const HELLO_FLAGS_KNOWN: u32 = FLAG_TLS;

/// What a worker declares about itself in HELLO (flags u32 @12). Only known
/// bits can be held, so an encoded HELLO always decodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HelloFlags(u32);

impl HelloFlags {
    /// No flag: what every worker written before the flags sends.
    pub const NONE: HelloFlags = HelloFlags(0);
    /// It terminates TLS with the bundle it was given ([`FLAG_TLS`]).
    pub const TLS: HelloFlags = HelloFlags(FLAG_TLS);

    /// The flags of these bits, or None if an unknown bit is set.
    pub fn from_bits(bits: u32) -> Option<HelloFlags> {
        (bits & !HELLO_FLAGS_KNOWN == 0).then_some(HelloFlags(bits))
    }

    /// The bits, as on the wire.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether the worker says it terminates TLS ([`FLAG_TLS`]).
    pub fn tls(self) -> bool {
        self.0 & FLAG_TLS != 0
    }

    /// These flags with [`FLAG_TLS`] set or cleared.
    pub fn with_tls(self, on: bool) -> HelloFlags {
        if on {
            HelloFlags(self.0 | FLAG_TLS)
        } else {
            HelloFlags(self.0 & !FLAG_TLS)
        }
    }
}

const HDR: usize = 4;
const ADDR_LEN: usize = 24;
/// A conn record: id, listener, reserved, peer, local.
const RECORD: usize = 60;
/// A PARK record: a conn record and the idle ms left.
const PARK_RECORD: usize = RECORD + 4;
const HELLO_LEN: usize = 16;
const WELCOME_LEN: usize = 8;
const CONN_LEN: usize = 64;
const DRAIN_LEN: usize = 4;

/// Message kinds, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Conn = 3,
    Ack = 4,
    Done = 5,
    Drain = 6,
    Conns = 7,
    Park = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Conn,
            4 => Kind::Ack,
            5 => Kind::Done,
            6 => Kind::Drain,
            7 => Kind::Conns,
            8 => Kind::Park,
            _ => return None,
        })
    }

    /// The first protocol version that has this kind.
    pub fn since(self) -> u8 {
        match self {
            Kind::Conns | Kind::Park => 2,
            _ => 1,
        }
    }

    /// How many file descriptors a message of this kind carries, for the
    /// kinds that carry a fixed number (CONNS and PARK carry one per record).
    pub fn fd_count(self) -> usize {
        match self {
            Kind::Conn => 1,
            _ => 0,
        }
    }
}

/// A connection a worker hands back to the acceptor (PARK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    pub info: ConnInfo,
    /// Milliseconds left of its keep-alive idle timeout (0: the acceptor's
    /// default).
    pub idle_ms: u32,
}

/// What a CONN message says about the connection besides its fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// Acceptor-wide unique id of this connection.
    pub id: u64,
    /// Index of the listener that accepted it, in the order of `--listen`.
    pub listener: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
}

/// One decoded protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        pid: u32,
        capacity: u32,
        /// What the worker declares about itself (see [`HelloFlags`]).
        flags: HelloFlags,
    },
    Welcome {
        worker_id: u32,
    },
    Conn(ConnInfo),
    Ack(Vec<u64>),
    Done(Vec<u64>),
    Drain,
    /// Several connections, one fd each, in order (version 2).
    Conns(Vec<ConnInfo>),
    /// Idle connections handed back, one fd each, in order (version 2).
    Park(Vec<Parked>),
}

impl Msg {
    pub fn kind(&self) -> Kind {
        match self {
            Msg::Hello { .. } => Kind::Hello,
            Msg::Welcome { .. } => Kind::Welcome,
            Msg::Conn(_) => Kind::Conn,
            Msg::Ack(_) => Kind::Ack,
            Msg::Done(_) => Kind::Done,
            Msg::Drain => Kind::Drain,
            Msg::Conns(_) => Kind::Conns,
            Msg::Park(_) => Kind::Park,
        }
    }

    /// How many file descriptors this message carries.
    pub fn fd_count(&self) -> usize {
        match self {
            Msg::Conn(_) => 1,
            Msg::Conns(c) => c.len(),
            Msg::Park(p) => p.len(),
            _ => 0,
        }
    }
}

/// Why a message was refused. Any of these ends the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("message of {0} bytes is shorter than the 4-byte header")]
    Short(usize),
    #[error("unsupported protocol version {0} (this side speaks {VERSION_MIN} to {VERSION})")]
    Version(u8),
    #[error("message of protocol version {got} on a channel that agreed on version {agreed}")]
    WrongVersion { got: u8, agreed: u8 },
    #[error("{kind:?} needs protocol version {since}, the message says {version}")]
    KindVersion { kind: Kind, version: u8, since: u8 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} message has length {len}, expected {expected}")]
    Length {
        kind: Kind,
        len: usize,
        expected: usize,
    },
    #[error("{kind:?} message has a non-zero reserved field")]
    Reserved { kind: Kind },
    #[error("HELLO sets flag bits {0:#x} that this side does not know (it knows {HELLO_FLAGS_KNOWN:#x})")]
    UnknownFlags(u32),
    #[error("{kind:?} message carries {count} ids (allowed 1..={MAX_IDS})")]
    Count { kind: Kind, count: usize },
    #[error("bad socket address family {0}")]
    Family(u8),
    #[error("{kind:?} message carries {got} file descriptors, expected {expected}")]
    FdCount {
        kind: Kind,
        got: usize,
        expected: usize,
    },
    #[error("message or its control data was truncated")]
    Truncated,
    #[error("message size {0} exceeds the maximum of {MAX_MSG}")]
    Oversized(usize),
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put_addr(b: &mut [u8], at: usize, addr: &SocketAddr) {
    let a = &mut b[at..at + ADDR_LEN];
    a.fill(0);
    match addr {
        SocketAddr::V4(v4) => {
            a[0] = 4;
            put_u16(a, 2, v4.port());
            a[8..12].copy_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            a[0] = 6;
            put_u16(a, 2, v6.port());
            put_u32(a, 4, v6.scope_id());
            a[8..24].copy_from_slice(&v6.ip().octets());
        }
    }
}

fn get_addr(b: &[u8], at: usize) -> Result<SocketAddr, ProtoError> {
    let a = &b[at..at + ADDR_LEN];
    let port = get_u16(a, 2);
    if a[1] != 0 {
        return Err(ProtoError::Reserved { kind: Kind::Conn });
    }
    match a[0] {
        4 => {
            // An IPv4 address has no scope and uses 4 of the 16 bytes.
            if get_u32(a, 4) != 0 || a[12..24].iter().any(|b| *b != 0) {
                return Err(ProtoError::Reserved { kind: Kind::Conn });
            }
            let ip = Ipv4Addr::new(a[8], a[9], a[10], a[11]);
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[8..24]);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(o),
                port,
                0,
                get_u32(a, 4),
            )))
        }
        f => Err(ProtoError::Family(f)),
    }
}

fn put_record(b: &mut [u8], at: usize, c: &ConnInfo) {
    put_u64(b, at, c.id);
    put_u16(b, at + 8, c.listener);
    put_u16(b, at + 10, 0);
    put_addr(b, at + 12, &c.peer);
    put_addr(b, at + 36, &c.local);
}

fn get_record(b: &[u8], at: usize, kind: Kind) -> Result<ConnInfo, ProtoError> {
    if get_u16(b, at + 10) != 0 {
        return Err(ProtoError::Reserved { kind });
    }
    Ok(ConnInfo {
        id: get_u64(b, at),
        listener: get_u16(b, at + 8),
        peer: get_addr(b, at + 12)?,
        local: get_addr(b, at + 36)?,
    })
}

/// Encodes `msg` in version [`VERSION`] into `buf` and returns the encoded
/// length.
///
/// # Panics
///
/// See [`encode_v`].
pub fn encode(msg: &Msg, buf: &mut [u8; MAX_MSG]) -> usize {
    encode_v(msg, VERSION, buf)
}

/// Encodes `msg` with `version` in its header into `buf` and returns the
/// encoded length.
///
/// # Panics
///
/// If an ACK or DONE carries no id or more than [`MAX_IDS`], a CONNS or
/// PARK no record or more than [`MAX_BATCH`], or the kind is newer than
/// `version`: that is a bug in the caller, which must split its batches
/// (see [`Msg::id_batches`]) and know the channel's version.
pub fn encode_v(msg: &Msg, version: u8, buf: &mut [u8; MAX_MSG]) -> usize {
    assert!(
        (VERSION_MIN..=VERSION).contains(&version) && msg.kind().since() <= version,
        "{:?} in protocol version {version}",
        msg.kind()
    );
    buf[0] = version;
    buf[1] = msg.kind() as u8;
    buf[2] = 0;
    buf[3] = 0;
    match msg {
        Msg::Hello {
            pid,
            capacity,
            flags,
        } => {
            put_u32(buf, 4, *pid);
            put_u32(buf, 8, *capacity);
            put_u32(buf, 12, flags.bits());
            HELLO_LEN
        }
        Msg::Welcome { worker_id } => {
            put_u32(buf, 4, *worker_id);
            WELCOME_LEN
        }
        Msg::Conn(c) => {
            put_record(buf, 4, c);
            CONN_LEN
        }
        Msg::Conns(cs) => {
            assert!(
                !cs.is_empty() && cs.len() <= MAX_BATCH,
                "CONNS batch of {}",
                cs.len()
            );
            put_u16(buf, 4, cs.len() as u16);
            put_u16(buf, 6, 0);
            for (i, c) in cs.iter().enumerate() {
                put_record(buf, 8 + RECORD * i, c);
            }
            8 + RECORD * cs.len()
        }
        Msg::Park(ps) => {
            assert!(
                !ps.is_empty() && ps.len() <= MAX_BATCH,
                "PARK batch of {}",
                ps.len()
            );
            put_u16(buf, 4, ps.len() as u16);
            put_u16(buf, 6, 0);
            for (i, p) in ps.iter().enumerate() {
                let at = 8 + PARK_RECORD * i;
                put_record(buf, at, &p.info);
                put_u32(buf, at + RECORD, p.idle_ms);
            }
            8 + PARK_RECORD * ps.len()
        }
        Msg::Ack(ids) | Msg::Done(ids) => {
            assert!(
                !ids.is_empty() && ids.len() <= MAX_IDS,
                "ACK/DONE batch of {} ids",
                ids.len()
            );
            put_u16(buf, 4, ids.len() as u16);
            put_u16(buf, 6, 0);
            for (i, id) in ids.iter().enumerate() {
                put_u64(buf, 8 + 8 * i, *id);
            }
            8 + 8 * ids.len()
        }
        Msg::Drain => DRAIN_LEN,
    }
}

impl Msg {
    /// Splits a list of ids into ACK or DONE messages of at most [`MAX_IDS`].
    pub fn id_batches(ids: &[u64], done: bool) -> impl Iterator<Item = Msg> + '_ {
        ids.chunks(MAX_IDS).map(move |c| {
            if done {
                Msg::Done(c.to_vec())
            } else {
                Msg::Ack(c.to_vec())
            }
        })
    }
}

/// How many fds a message with these bytes should carry (0 for an unknown
/// kind, which [`decode`] refuses anyway). For a receiver that lost the fds
/// a message carried and wants to know what the message was.
pub fn kind_fd_count(b: &[u8]) -> usize {
    match b.get(1).and_then(|k| Kind::from_u8(*k)) {
        Some(Kind::Conns | Kind::Park) if b.len() >= 6 => usize::from(get_u16(b, 4)),
        Some(k) => k.fd_count(),
        None => 0,
    }
}

/// The version in a message's header (0 for a message too short to have
/// one).
pub fn version_of(b: &[u8]) -> u8 {
    b.first().copied().unwrap_or(0)
}

/// The record count of a CONNS or PARK message, checked against the length.
fn batch_count(kind: Kind, b: &[u8], record: usize) -> Result<usize, ProtoError> {
    if b.len() < 8 {
        return Err(ProtoError::Length {
            kind,
            len: b.len(),
            expected: 8 + record,
        });
    }
    let n = usize::from(get_u16(b, 4));
    if n == 0 || n > MAX_BATCH {
        return Err(ProtoError::Count { kind, count: n });
    }
    expect_len(kind, b.len(), 8 + record * n)?;
    if get_u16(b, 6) != 0 {
        return Err(ProtoError::Reserved { kind });
    }
    Ok(n)
}

fn expect_len(kind: Kind, len: usize, expected: usize) -> Result<(), ProtoError> {
    if len == expected {
        Ok(())
    } else {
        Err(ProtoError::Length {
            kind,
            len,
            expected,
        })
    }
}

/// Decodes one message, checking it carried `fds` file descriptors.
pub fn decode(b: &[u8], fds: usize) -> Result<Msg, ProtoError> {
    if b.len() < HDR {
        return Err(ProtoError::Short(b.len()));
    }
    if b.len() > MAX_MSG {
        return Err(ProtoError::Oversized(b.len()));
    }
    let version = b[0];
    if !(VERSION_MIN..=VERSION).contains(&version) {
        return Err(ProtoError::Version(version));
    }
    let kind = Kind::from_u8(b[1]).ok_or(ProtoError::UnknownKind(b[1]))?;
    if kind.since() > version {
        return Err(ProtoError::KindVersion {
            kind,
            version,
            since: kind.since(),
        });
    }
    if get_u16(b, 2) != 0 {
        return Err(ProtoError::Reserved { kind });
    }
    if !matches!(kind, Kind::Conns | Kind::Park) && fds != kind.fd_count() {
        return Err(ProtoError::FdCount {
            kind,
            got: fds,
            expected: kind.fd_count(),
        });
    }
    match kind {
        Kind::Hello => {
            expect_len(kind, b.len(), HELLO_LEN)?;
            let bits = get_u32(b, 12);
            let flags = HelloFlags::from_bits(bits)
                .ok_or(ProtoError::UnknownFlags(bits & !HELLO_FLAGS_KNOWN))?;
            Ok(Msg::Hello {
                pid: get_u32(b, 4),
                capacity: get_u32(b, 8),
                flags,
            })
        }
        Kind::Welcome => {
            expect_len(kind, b.len(), WELCOME_LEN)?;
            Ok(Msg::Welcome {
                worker_id: get_u32(b, 4),
            })
        }
        Kind::Conn => {
            expect_len(kind, b.len(), CONN_LEN)?;
            Ok(Msg::Conn(get_record(b, 4, kind)?))
        }
        Kind::Conns | Kind::Park => {
            let record = if kind == Kind::Conns {
                RECORD
            } else {
                PARK_RECORD
            };
            let n = batch_count(kind, b, record)?;
            if fds != n {
                return Err(ProtoError::FdCount {
                    kind,
                    got: fds,
                    expected: n,
                });
            }
            if kind == Kind::Conns {
                let cs = (0..n)
                    .map(|i| get_record(b, 8 + RECORD * i, kind))
                    .collect::<Result<_, _>>()?;
                Ok(Msg::Conns(cs))
            } else {
                let ps = (0..n)
                    .map(|i| {
                        let at = 8 + PARK_RECORD * i;
                        Ok(Parked {
                            info: get_record(b, at, kind)?,
                            idle_ms: get_u32(b, at + RECORD),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Msg::Park(ps))
            }
        }
        Kind::Ack | Kind::Done => {
            if b.len() < 8 {
                return Err(ProtoError::Length {
                    kind,
                    len: b.len(),
                    expected: 8 + 8,
                });
            }
            let n = get_u16(b, 4) as usize;
            if n == 0 || n > MAX_IDS {
                return Err(ProtoError::Count { kind, count: n });
            }
            expect_len(kind, b.len(), 8 + 8 * n)?;
            if get_u16(b, 6) != 0 {
                return Err(ProtoError::Reserved { kind });
            }
            let ids = (0..n).map(|i| get_u64(b, 8 + 8 * i)).collect();
            Ok(if kind == Kind::Ack {
                Msg::Ack(ids)
            } else {
                Msg::Done(ids)
            })
        }
        Kind::Drain => {
            expect_len(kind, b.len(), DRAIN_LEN)?;
            Ok(Msg::Drain)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Msg) {
        let mut buf = [0u8; MAX_MSG];
        let n = encode(&m, &mut buf);
        assert_eq!(decode(&buf[..n], m.fd_count()), Ok(m.clone()));
        if m.kind().since() == 1 {
            let n = encode_v(&m, 1, &mut buf);
            assert_eq!(buf[0], 1);
            assert_eq!(decode(&buf[..n], m.fd_count()), Ok(m));
        }
    }

    fn info(id: u64) -> ConnInfo {
        ConnInfo {
            id,
            listener: 1,
            peer: "127.0.0.1:5555".parse().unwrap(),
            local: "[::1]:80".parse().unwrap(),
        }
    }

    #[test]
    fn version_2_batches_roundtrip_and_need_version_2() {
        roundtrip(Msg::Conns(vec![info(1)]));
        roundtrip(Msg::Conns((0..MAX_BATCH as u64).map(info).collect()));
        roundtrip(Msg::Park(vec![Parked {
            info: info(7),
            idle_ms: 59_000,
        }]));
        let full: Vec<Parked> = (0..MAX_BATCH as u64)
            .map(|i| Parked {
                info: info(i),
                idle_ms: 0,
            })
            .collect();
        let mut buf = [0u8; MAX_MSG];
        let n = encode(&Msg::Park(full), &mut buf);
        assert_eq!(n, MAX_MSG, "a full PARK is the largest message");
        // A version 1 header cannot carry a version 2 kind.
        let n = encode(&Msg::Conns(vec![info(1), info(2)]), &mut buf);
        assert_eq!(decode(&buf[..n], 2).map(|m| m.kind()), Ok(Kind::Conns));
        buf[0] = 1;
        assert!(matches!(
            decode(&buf[..n], 2),
            Err(ProtoError::KindVersion { .. })
        ));
        buf[0] = 2;
        // One fd per record, exactly.
        assert!(matches!(
            decode(&buf[..n], 1),
            Err(ProtoError::FdCount { expected: 2, .. })
        ));
        assert_eq!(kind_fd_count(&buf[..n]), 2);
        // The count must match the length.
        buf[4] = 3;
        assert!(matches!(
            decode(&buf[..n], 3),
            Err(ProtoError::Length { .. })
        ));
        buf[4] = 0;
        assert!(matches!(
            decode(&buf[..n], 0),
            Err(ProtoError::Count { .. })
        ));
        // Unknown versions are refused.
        buf[0] = 3;
        assert_eq!(decode(&buf[..n], 2), Err(ProtoError::Version(3)));
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Msg::Hello {
            pid: 4242,
            capacity: 7,
            flags: HelloFlags::NONE,
        });
        roundtrip(Msg::Hello {
            pid: 4242,
            capacity: 0,
            flags: HelloFlags::TLS,
        });
        roundtrip(Msg::Welcome { worker_id: 9 });
        roundtrip(Msg::Conn(ConnInfo {
            id: u64::MAX - 3,
            listener: 2,
            peer: "127.0.0.1:5555".parse().unwrap(),
            local: "[::1%3]:80".parse().unwrap(),
        }));
        roundtrip(Msg::Ack(vec![1, 2, 3]));
        roundtrip(Msg::Done((0..MAX_IDS as u64).collect()));
        roundtrip(Msg::Drain);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let mut buf = [0u8; MAX_MSG];
        let n = encode(&Msg::Ack(vec![5, 6]), &mut buf);
        assert_eq!(decode(&buf[..3], 0), Err(ProtoError::Short(3)));
        assert!(matches!(
            decode(&buf[..n - 1], 0),
            Err(ProtoError::Length { .. })
        ));
        assert!(matches!(
            decode(&buf[..n], 1),
            Err(ProtoError::FdCount { .. })
        ));
        let mut bad = buf;
        bad[0] = 9;
        assert_eq!(decode(&bad[..n], 0), Err(ProtoError::Version(9)));
        bad[0] = 0;
        assert_eq!(decode(&bad[..n], 0), Err(ProtoError::Version(0)));
        let mut bad = buf;
        bad[1] = 99;
        assert_eq!(decode(&bad[..n], 0), Err(ProtoError::UnknownKind(99)));
        let mut bad = buf;
        bad[2] = 1;
        assert!(matches!(
            decode(&bad[..n], 0),
            Err(ProtoError::Reserved { .. })
        ));
        let mut bad = buf;
        bad[4] = 0;
        bad[5] = 0;
        assert!(matches!(
            decode(&bad[..n], 0),
            Err(ProtoError::Count { .. })
        ));
        // A CONN with a dirty reserved byte in an address.
        let info = ConnInfo {
            id: 1,
            listener: 0,
            peer: "127.0.0.1:5".parse().unwrap(),
            local: "127.0.0.1:6".parse().unwrap(),
        };
        let n = encode(&Msg::Conn(info), &mut buf);
        assert!(decode(&buf[..n], 1).is_ok());
        let mut bad = buf;
        bad[16 + 1] = 1;
        assert!(matches!(
            decode(&bad[..n], 1),
            Err(ProtoError::Reserved { .. })
        ));
        let mut bad = buf;
        bad[16 + 20] = 1;
        assert!(matches!(
            decode(&bad[..n], 1),
            Err(ProtoError::Reserved { .. })
        ));
        // A CONN without its fd.
        let n = encode(&Msg::Drain, &mut buf);
        assert_eq!(decode(&buf[..n], 0), Ok(Msg::Drain));
        buf[1] = Kind::Conn as u8;
        assert!(matches!(
            decode(&buf[..n], 0),
            Err(ProtoError::FdCount { .. })
        ));
    }

    #[test]
    fn hello_flags_roundtrip_and_unknown_bits_are_refused() {
        let mut buf = [0u8; MAX_MSG];
        for (flags, bits) in [(HelloFlags::NONE, 0u32), (HelloFlags::TLS, 1)] {
            let m = Msg::Hello {
                pid: 7,
                capacity: 3,
                flags,
            };
            for version in [1, 2] {
                let n = encode_v(&m, version, &mut buf);
                assert_eq!(n, HELLO_LEN);
                assert_eq!(buf[12..16], bits.to_le_bytes(), "flags u32 @12");
                assert_eq!(decode(&buf[..n], 0), Ok(m.clone()));
            }
        }
        // What a worker written before the flags sends: 0, no TLS.
        let n = encode(
            &Msg::Hello {
                pid: 1,
                capacity: 0,
                flags: HelloFlags::default(),
            },
            &mut buf,
        );
        assert_eq!(buf[12..16], [0, 0, 0, 0]);
        match decode(&buf[..n], 0) {
            Ok(Msg::Hello { flags, .. }) => assert!(!flags.tls()),
            other => panic!("{other:?}"),
        }
        // Unknown bits, alone or with TLS, end the channel.
        for bits in [2u32, 1 << 31, 3, u32::MAX] {
            buf[12..16].copy_from_slice(&bits.to_le_bytes());
            assert_eq!(
                decode(&buf[..n], 0),
                Err(ProtoError::UnknownFlags(bits & !1)),
                "{bits:#x}"
            );
        }
        assert_eq!(HelloFlags::from_bits(2), None);
        assert_eq!(HelloFlags::from_bits(1), Some(HelloFlags::TLS));
        assert!(HelloFlags::TLS.tls() && !HelloFlags::NONE.tls());
        assert_eq!(HelloFlags::NONE.with_tls(true), HelloFlags::TLS);
        assert_eq!(HelloFlags::TLS.with_tls(false), HelloFlags::NONE);
    }

    #[test]
    fn id_batches_split_at_max() {
        let ids: Vec<u64> = (0..150).collect();
        let batches: Vec<Msg> = Msg::id_batches(&ids, true).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2], Msg::Done((128..150).collect()));
    }
}
