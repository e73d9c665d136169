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
//! # Wire format (version 1)
//!
//! All integers are little-endian. Every message starts with a 4-byte header:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 1    | protocol version, [`VERSION`] (1)        |
//! | 1      | 1    | kind (table below)                      |
//! | 2      | 2    | reserved, must be 0                     |
//!
//! | kind | name    | direction         | length      | fds | body (offsets from 0)                                   |
//! |-----:|---------|-------------------|-------------|----:|---------------------------------------------------------|
//! | 1    | HELLO   | worker → acceptor | 16          | 0   | pid u32 @4, capacity u32 @8 (0: no limit of its own), flags u32 @12 (0) |
//! | 2    | WELCOME | acceptor → worker | 8           | 0   | worker id u32 @4                                        |
//! | 3    | CONN    | acceptor → worker | 64          | 1   | conn id u64 @4, listener index u16 @12, reserved u16 @14, peer addr @16, local addr @40 |
//! | 4    | ACK     | worker → acceptor | 8 + 8·n     | 0   | n u16 @4 (1..=64), reserved u16 @6, n × conn id u64 @8  |
//! | 5    | DONE    | worker → acceptor | 8 + 8·n     | 0   | same layout as ACK                                      |
//! | 6    | DRAIN   | acceptor → worker | 4           | 0   | none                                                    |
//!
//! A socket address is 24 bytes: family u8 (4 or 6) @0, reserved u8 @1
//! (0), port u16 @2, IPv6 scope id u32 @4 (0 for IPv4), address @8 (16
//! bytes; an IPv4 address uses the first 4 and the rest must be 0).
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

/// The protocol version this library speaks.
pub const VERSION: u8 = 1;
/// The environment variable naming the inherited channel fd of a spawned worker.
pub const CHANNEL_FD_ENV: &str = "BATON_CHANNEL_FD";
/// The environment variable naming the worker's id in the pool (informational).
pub const WORKER_ID_ENV: &str = "BATON_WORKER_ID";
/// The most connection ids one ACK or DONE message may carry.
pub const MAX_IDS: usize = 64;
/// The largest valid message, in bytes.
pub const MAX_MSG: usize = 8 + 8 * MAX_IDS;

const HDR: usize = 4;
const ADDR_LEN: usize = 24;
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
            _ => return None,
        })
    }

    /// How many file descriptors a message of this kind carries.
    pub fn fd_count(self) -> usize {
        match self {
            Kind::Conn => 1,
            _ => 0,
        }
    }
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
    Hello { pid: u32, capacity: u32 },
    Welcome { worker_id: u32 },
    Conn(ConnInfo),
    Ack(Vec<u64>),
    Done(Vec<u64>),
    Drain,
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
        }
    }
}

/// Why a message was refused. Any of these ends the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("message of {0} bytes is shorter than the 4-byte header")]
    Short(usize),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
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

/// Encodes `msg` into `buf` and returns the encoded length.
///
/// # Panics
///
/// If an ACK or DONE carries no id or more than [`MAX_IDS`]: that is a bug
/// in the caller, which must split its batches (see [`Msg::id_batches`]).
pub fn encode(msg: &Msg, buf: &mut [u8; MAX_MSG]) -> usize {
    buf[0] = VERSION;
    buf[1] = msg.kind() as u8;
    buf[2] = 0;
    buf[3] = 0;
    match msg {
        Msg::Hello { pid, capacity } => {
            put_u32(buf, 4, *pid);
            put_u32(buf, 8, *capacity);
            put_u32(buf, 12, 0);
            HELLO_LEN
        }
        Msg::Welcome { worker_id } => {
            put_u32(buf, 4, *worker_id);
            WELCOME_LEN
        }
        Msg::Conn(c) => {
            put_u64(buf, 4, c.id);
            put_u16(buf, 12, c.listener);
            put_u16(buf, 14, 0);
            put_addr(buf, 16, &c.peer);
            put_addr(buf, 40, &c.local);
            CONN_LEN
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

/// How many fds a message with this header should carry (0 for an unknown
/// kind, which [`decode`] refuses anyway). For a receiver that lost the fds
/// a message carried and wants to know what the message was.
pub fn kind_fd_count(b: &[u8]) -> usize {
    b.get(1)
        .and_then(|k| Kind::from_u8(*k))
        .map_or(0, Kind::fd_count)
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
    if b[0] != VERSION {
        return Err(ProtoError::Version(b[0]));
    }
    let kind = Kind::from_u8(b[1]).ok_or(ProtoError::UnknownKind(b[1]))?;
    if get_u16(b, 2) != 0 {
        return Err(ProtoError::Reserved { kind });
    }
    if fds != kind.fd_count() {
        return Err(ProtoError::FdCount {
            kind,
            got: fds,
            expected: kind.fd_count(),
        });
    }
    match kind {
        Kind::Hello => {
            expect_len(kind, b.len(), HELLO_LEN)?;
            if get_u32(b, 12) != 0 {
                return Err(ProtoError::Reserved { kind });
            }
            Ok(Msg::Hello {
                pid: get_u32(b, 4),
                capacity: get_u32(b, 8),
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
            if get_u16(b, 14) != 0 {
                return Err(ProtoError::Reserved { kind });
            }
            Ok(Msg::Conn(ConnInfo {
                id: get_u64(b, 4),
                listener: get_u16(b, 12),
                peer: get_addr(b, 16)?,
                local: get_addr(b, 40)?,
            }))
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
        assert_eq!(decode(&buf[..n], m.kind().fd_count()), Ok(m));
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Msg::Hello {
            pid: 4242,
            capacity: 7,
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
        bad[0] = 2;
        assert_eq!(decode(&bad[..n], 0), Err(ProtoError::Version(2)));
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
    fn id_batches_split_at_max() {
        let ids: Vec<u64> = (0..150).collect();
        let batches: Vec<Msg> = Msg::id_batches(&ids, true).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2], Msg::Done((128..150).collect()));
    }
}
