//! The key process's wire format: one message per `SOCK_SEQPACKET` record,
//! little-endian, versioned.
//!
//! Every message starts with the same 6-byte header:
//!
//! | offset | size | field                                             |
//! |-------:|-----:|---------------------------------------------------|
//! | 0      | 1    | version, [`VERSION`] (1)                          |
//! | 1      | 1    | kind (below)                                      |
//! | 2      | 4    | request id, `u32`, chosen by the requester, echoed |
//!
//! Requests (worker or acceptor → key process):
//!
//! | kind | name     | body after the header                                  | fds |
//! |-----:|----------|--------------------------------------------------------|----:|
//! | 1    | SIGN     | key id `u32`, scheme `u16` (TLS code point), length `u32`, message | 0 |
//! | 2    | PING     | empty                                                  | 0   |
//! | 3    | ADD_PEER | access `u16` (0xffff: every key; else a count n ≤ [`MAX_ACCESS`]), n × key id `u32`; only on the acceptor's control channel | 1 |
//!
//! Replies (key process → requester), with the request's id:
//!
//! | kind | name      | body after the header                   |
//! |-----:|-----------|-----------------------------------------|
//! | 0x81 | SIGNATURE | length `u32`, signature bytes           |
//! | 0x82 | ERROR     | code `u16` ([`ErrorCode`])              |
//! | 0x83 | PONG      | empty                                   |
//!
//! Rules, checked by [`Request::decode`] and [`Reply::decode`]: the
//! version must be 1, the kind known, the length fields exactly what
//! follows (no trailing bytes), a SIGN message at most [`MAX_SIGN_INPUT`]
//! bytes (a TLS 1.3 CertificateVerify input is 130 bytes, a TLS 1.2
//! ServerKeyExchange well under 1 KiB), a signature at most
//! [`MAX_SIGNATURE`] bytes. A record longer than [`MAX_REQUEST`] is
//! refused as oversized (the key process sees it truncated, with
//! `MSG_TRUNC`). A request the key process refuses gets an ERROR reply
//! carrying its id when the header could be read, else id 0; the
//! connection stays open.
//!
//! A new version of this format gets a new version byte; a key process
//! answers a request of another version with ERROR `BadVersion` in
//! version 1, so an old peer learns why.

use rustls::SignatureScheme;

/// The version byte this code writes and accepts.
pub const VERSION: u8 = 1;
/// Header size.
pub const HEADER: usize = 6;
/// The largest message a SIGN request may carry.
pub const MAX_SIGN_INPUT: usize = 16 * 1024;
/// The largest signature (RSA-8192 is 1024 bytes).
pub const MAX_SIGNATURE: usize = 1024;
/// The largest request record.
pub const MAX_REQUEST: usize = HEADER + 4 + 2 + 4 + MAX_SIGN_INPUT;
/// The most key ids an ADD_PEER may list.
pub const MAX_ACCESS: usize = 1024;
/// ADD_PEER's access field for "every key".
const ACCESS_ALL: u16 = 0xffff;
/// The largest reply record.
pub const MAX_REPLY: usize = HEADER + 4 + MAX_SIGNATURE;

const SIGN: u8 = 1;
const PING: u8 = 2;
const ADD_PEER: u8 = 3;
const SIGNATURE: u8 = 0x81;
const ERROR: u8 = 0x82;
const PONG: u8 = 0x83;

/// A request to the key process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Sign {
        id: u32,
        key: u32,
        scheme: SignatureScheme,
        message: Vec<u8>,
    },
    Ping {
        id: u32,
    },
    /// Carries one fd: a new peer's end of a socketpair, and which keys
    /// that peer may sign with.
    AddPeer {
        id: u32,
        access: KeyAccess,
    },
}

/// Which keys a peer may sign with: a pool's workers only with the pool's
/// keys, when several pools share one key process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAccess {
    All,
    Only(Vec<u32>),
}

impl KeyAccess {
    pub fn allows(&self, key: u32) -> bool {
        match self {
            KeyAccess::All => true,
            KeyAccess::Only(keys) => keys.contains(&key),
        }
    }
}

/// A reply from the key process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Signature { id: u32, signature: Vec<u8> },
    Error { id: u32, code: ErrorCode },
    Pong { id: u32 },
}

/// Why the key process refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ErrorCode {
    #[error("no key with that id")]
    UnknownKey,
    #[error("the key does not sign with that scheme")]
    UnsupportedScheme,
    #[error("request too large")]
    TooLarge,
    #[error("malformed request")]
    Malformed,
    #[error("signing failed")]
    SignFailed,
    #[error("unsupported protocol version")]
    BadVersion,
    #[error("request not allowed on this channel")]
    NotAllowed,
    #[error("unknown error code {0}")]
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::UnknownKey => 1,
            ErrorCode::UnsupportedScheme => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::Malformed => 4,
            ErrorCode::SignFailed => 5,
            ErrorCode::BadVersion => 6,
            ErrorCode::NotAllowed => 7,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::UnknownKey,
            2 => ErrorCode::UnsupportedScheme,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::Malformed,
            5 => ErrorCode::SignFailed,
            6 => ErrorCode::BadVersion,
            7 => ErrorCode::NotAllowed,
            n => ErrorCode::Other(n),
        }
    }
}

/// Why a record could not be decoded. `id` is the request id when the
/// header was readable, for the ERROR reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{code} (request id {id})")]
pub struct DecodeError {
    pub id: u32,
    pub code: ErrorCode,
}

fn header(buf: &mut Vec<u8>, kind: u8, id: u32) {
    buf.push(VERSION);
    buf.push(kind);
    buf.extend_from_slice(&id.to_le_bytes());
}

/// A cursor that never reads past its slice.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl DecodeError {
    fn new(id: u32, code: ErrorCode) -> DecodeError {
        DecodeError { id, code }
    }
}

/// Reads and checks the header; returns the rest, the kind and the id.
fn open(buf: &[u8]) -> Result<(Rd<'_>, u8, u32), DecodeError> {
    let mut r = Rd(buf);
    let (Some(h), Some(id)) = (r.take(2), r.u32()) else {
        return Err(DecodeError::new(0, ErrorCode::Malformed));
    };
    if h[0] != VERSION {
        return Err(DecodeError::new(id, ErrorCode::BadVersion));
    }
    Ok((r, h[1], id))
}

impl Request {
    pub fn id(&self) -> u32 {
        match *self {
            Request::Sign { id, .. } | Request::Ping { id } | Request::AddPeer { id, .. } => id,
        }
    }

    /// How many fds a request of this kind carries.
    pub fn fds(&self) -> usize {
        match self {
            Request::AddPeer { .. } => 1,
            _ => 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 10);
        match self {
            Request::Sign {
                id,
                key,
                scheme,
                message,
            } => {
                header(&mut b, SIGN, *id);
                b.extend_from_slice(&key.to_le_bytes());
                b.extend_from_slice(&u16::from(*scheme).to_le_bytes());
                b.extend_from_slice(&(message.len() as u32).to_le_bytes());
                b.extend_from_slice(message);
            }
            Request::Ping { id } => header(&mut b, PING, *id),
            Request::AddPeer { id, access } => {
                header(&mut b, ADD_PEER, *id);
                match access {
                    KeyAccess::All => b.extend_from_slice(&ACCESS_ALL.to_le_bytes()),
                    KeyAccess::Only(keys) => {
                        b.extend_from_slice(&(keys.len() as u16).to_le_bytes());
                        for k in keys {
                            b.extend_from_slice(&k.to_le_bytes());
                        }
                    }
                }
            }
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let (mut r, kind, id) = open(buf)?;
        let malformed = |id| DecodeError::new(id, ErrorCode::Malformed);
        if buf.len() > MAX_REQUEST {
            return Err(DecodeError::new(id, ErrorCode::TooLarge));
        }
        let req = match kind {
            SIGN => {
                let key = r.u32().ok_or(malformed(id))?;
                let scheme = SignatureScheme::from(r.u16().ok_or(malformed(id))?);
                let len = r.u32().ok_or(malformed(id))? as usize;
                if len > MAX_SIGN_INPUT {
                    return Err(DecodeError::new(id, ErrorCode::TooLarge));
                }
                let message = r.take(len).ok_or(malformed(id))?.to_vec();
                Request::Sign {
                    id,
                    key,
                    scheme,
                    message,
                }
            }
            PING => Request::Ping { id },
            ADD_PEER => {
                let n = r.u16().ok_or(malformed(id))?;
                let access = if n == ACCESS_ALL {
                    KeyAccess::All
                } else {
                    if usize::from(n) > MAX_ACCESS {
                        return Err(DecodeError::new(id, ErrorCode::TooLarge));
                    }
                    let mut keys = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        keys.push(r.u32().ok_or(malformed(id))?);
                    }
                    KeyAccess::Only(keys)
                };
                Request::AddPeer { id, access }
            }
            _ => return Err(malformed(id)),
        };
        if !r.0.is_empty() {
            return Err(malformed(id));
        }
        Ok(req)
    }
}

impl Reply {
    pub fn id(&self) -> u32 {
        match *self {
            Reply::Signature { id, .. } | Reply::Error { id, .. } | Reply::Pong { id } => id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 8);
        match self {
            Reply::Signature { id, signature } => {
                header(&mut b, SIGNATURE, *id);
                b.extend_from_slice(&(signature.len() as u32).to_le_bytes());
                b.extend_from_slice(signature);
            }
            Reply::Error { id, code } => {
                header(&mut b, ERROR, *id);
                b.extend_from_slice(&code.to_u16().to_le_bytes());
            }
            Reply::Pong { id } => header(&mut b, PONG, *id),
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Reply, DecodeError> {
        let (mut r, kind, id) = open(buf)?;
        let malformed = |id| DecodeError::new(id, ErrorCode::Malformed);
        let reply = match kind {
            SIGNATURE => {
                let len = r.u32().ok_or(malformed(id))? as usize;
                if len > MAX_SIGNATURE {
                    return Err(DecodeError::new(id, ErrorCode::TooLarge));
                }
                let signature = r.take(len).ok_or(malformed(id))?.to_vec();
                Reply::Signature { id, signature }
            }
            ERROR => Reply::Error {
                id,
                code: ErrorCode::from_u16(r.u16().ok_or(malformed(id))?),
            },
            PONG => Reply::Pong { id },
            _ => return Err(malformed(id)),
        };
        if !r.0.is_empty() {
            return Err(malformed(id));
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scheme() -> impl Strategy<Value = SignatureScheme> {
        any::<u16>().prop_map(SignatureScheme::from)
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u32>(),
                scheme(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_SIGN_INPUT)
            )
                .prop_map(|(id, key, scheme, message)| Request::Sign {
                    id,
                    key,
                    scheme,
                    message
                }),
            any::<u32>().prop_map(|id| Request::Ping { id }),
            any::<u32>().prop_map(|id| Request::AddPeer {
                id,
                access: KeyAccess::All
            }),
            (
                any::<u32>(),
                proptest::collection::vec(any::<u32>(), 0..=MAX_ACCESS)
            )
                .prop_map(|(id, keys)| Request::AddPeer {
                    id,
                    access: KeyAccess::Only(keys)
                }),
        ]
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        any::<u16>().prop_map(ErrorCode::from_u16)
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_SIGNATURE)
            )
                .prop_map(|(id, signature)| Reply::Signature { id, signature }),
            (any::<u32>(), code()).prop_map(|(id, code)| Reply::Error { id, code }),
            any::<u32>().prop_map(|id| Reply::Pong { id }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn requests_round_trip(req in request()) {
            let bytes = req.encode();
            prop_assert!(bytes.len() <= MAX_REQUEST);
            prop_assert_eq!(Request::decode(&bytes), Ok(req));
        }

        #[test]
        fn replies_round_trip(rep in reply()) {
            let bytes = rep.encode();
            prop_assert!(bytes.len() <= MAX_REPLY);
            prop_assert_eq!(Reply::decode(&bytes), Ok(rep));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        #[test]
        fn truncated_or_extended_requests_are_refused(req in request(), cut in 1usize..8, extra in 1u8..) {
            let bytes = req.encode();
            if bytes.len() > HEADER {
                let short = &bytes[..bytes.len().saturating_sub(cut).max(HEADER)];
                if short.len() < bytes.len() {
                    prop_assert!(Request::decode(short).is_err());
                }
            }
            let mut long = bytes.clone();
            long.push(extra);
            let e = Request::decode(&long).expect_err("trailing byte");
            prop_assert_eq!(e.id, req.id());
        }
    }

    #[test]
    fn oversize_and_version() {
        let big = Request::Sign {
            id: 7,
            key: 0,
            scheme: SignatureScheme::ED25519,
            message: vec![0; MAX_SIGN_INPUT + 1],
        }
        .encode();
        assert_eq!(
            Request::decode(&big),
            Err(DecodeError {
                id: 7,
                code: ErrorCode::TooLarge
            })
        );
        let mut ping = Request::Ping { id: 9 }.encode();
        ping[0] = 2;
        assert_eq!(
            Request::decode(&ping),
            Err(DecodeError {
                id: 9,
                code: ErrorCode::BadVersion
            })
        );
        assert_eq!(Request::decode(&[1, 2, 3]).map_err(|e| e.id), Err(0));
        // A lying length field.
        let mut sign = Request::Sign {
            id: 3,
            key: 0,
            scheme: SignatureScheme::ED25519,
            message: vec![1, 2, 3],
        }
        .encode();
        sign[12] = 4;
        assert_eq!(
            Request::decode(&sign).map_err(|e| e.code),
            Err(ErrorCode::Malformed)
        );
    }
}
