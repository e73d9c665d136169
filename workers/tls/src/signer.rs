//! The worker side of the key process: a rustls signing key that holds no
//! private key, only the public key and a channel.
//!
//! * [`KeyClient`] is the worker's end of its key channel: one blocking
//!   request at a time, each with a fresh request id, waiting at most its
//!   timeout ([`DEFAULT_TIMEOUT`], 1 s) for the reply with that id. A reply
//!   with another id (the late answer to a request that timed out) is
//!   discarded. A dead key process is seen at once (end of file, `EPIPE`);
//!   a hung one after the timeout: either way the handshake fails cleanly
//!   with a [`SignError`] inside `rustls::Error::Other`, and the worker
//!   goes on serving other connections.
//! * [`RemoteKey`] implements `rustls::sign::SigningKey` for a key id: its
//!   signature schemes come from the certificate's public key type
//!   ([`KeyType::schemes`]), so scheme negotiation happens in the worker
//!   and only the chosen scheme travels.
//! * [`certified_key`] makes the `CertifiedKey` a worker serves: the
//!   public chain plus a [`RemoteKey`].
//!
//! A worker is single-threaded, so the client sits behind a `Mutex` only
//! because rustls wants `Send + Sync`; it is never contended there. The
//! signing call blocks the worker's loop for one round trip to the key
//! process (tens of microseconds for ECDSA, about a millisecond for
//! RSA-2048), once per full handshake; resumed handshakes do not sign.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::der::KeyType;
use crate::load::CertChain;
use crate::sock;
use crate::wire::{self, DecodeError, ErrorCode, Reply, Request};

/// How long a signing request may take before the handshake fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a request to the key process failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the key process did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the key process is gone (its channel is closed)")]
    Closed,
    #[error("the key process channel failed: {0}")]
    Io(io::Error),
    #[error("the key process refused the request: {0}")]
    Refused(ErrorCode),
    #[error("the key process sent a malformed reply: {0}")]
    BadReply(DecodeError),
    #[error("the key process sent an unexpected reply")]
    Unexpected,
    #[error("a message of {0} bytes is more than the key process signs")]
    TooLarge(usize),
    #[error("the key client's lock is poisoned")]
    Poisoned,
}

impl SignError {
    fn from_io(e: io::Error) -> SignError {
        match e.raw_os_error() {
            Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => SignError::Closed,
            _ => SignError::Io(e),
        }
    }
}

/// The worker's end of a key channel.
#[derive(Debug)]
pub struct KeyClient {
    fd: OwnedFd,
    next_id: u32,
    timeout: Duration,
    buf: Vec<u8>,
}

impl KeyClient {
    /// A client on a connected `SOCK_SEQPACKET` socket, with
    /// [`DEFAULT_TIMEOUT`].
    pub fn new(fd: OwnedFd) -> KeyClient {
        KeyClient {
            fd,
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            buf: vec![0; wire::MAX_REPLY + 1],
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> KeyClient {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Switches to a new channel (the key process was restarted and the
    /// acceptor sent this worker a fresh one); every [`RemoteKey`] sharing
    /// this client uses it from the next handshake on.
    pub fn set_channel(&mut self, fd: OwnedFd) {
        self.fd = fd;
    }

    /// Wraps this client for sharing by several [`RemoteKey`]s.
    pub fn shared(self) -> SharedClient {
        Arc::new(Mutex::new(self))
    }

    /// Signs `message` with key `key` in `scheme`.
    pub fn sign(
        &mut self,
        key: u32,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, SignError> {
        if message.len() > wire::MAX_SIGN_INPUT {
            return Err(SignError::TooLarge(message.len()));
        }
        let id = self.fresh_id();
        let req = Request::Sign {
            id,
            key,
            scheme,
            message: message.to_vec(),
        };
        match self.call(&req)? {
            Reply::Signature { signature, .. } => Ok(signature),
            Reply::Error { code, .. } => Err(SignError::Refused(code)),
            Reply::Pong { .. } => Err(SignError::Unexpected),
        }
    }

    /// A round trip: is the key process alive and answering?
    pub fn ping(&mut self) -> Result<(), SignError> {
        let id = self.fresh_id();
        match self.call(&Request::Ping { id })? {
            Reply::Pong { .. } => Ok(()),
            Reply::Error { code, .. } => Err(SignError::Refused(code)),
            Reply::Signature { .. } => Err(SignError::Unexpected),
        }
    }

    fn fresh_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn call(&mut self, req: &Request) -> Result<Reply, SignError> {
        let deadline = Instant::now() + self.timeout;
        // Replies left from requests that timed out are stale: drop them.
        self.drain_stale()?;
        match sock::send_nonblocking(self.fd.as_fd(), &req.encode()) {
            Ok(()) => {}
            // The key process's queue is full: it is not reading.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(SignError::Timeout(self.timeout))
            }
            Err(e) => return Err(SignError::from_io(e)),
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SignError::Timeout(self.timeout));
            }
            if !sock::wait_readable(self.fd.as_fd(), left).map_err(SignError::Io)? {
                return Err(SignError::Timeout(self.timeout));
            }
            let rec = match sock::recv(self.fd.as_fd(), &mut self.buf, true) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SignError::from_io(e)),
            };
            if rec.len == 0 && !rec.truncated {
                return Err(SignError::Closed);
            }
            if rec.truncated {
                return Err(SignError::BadReply(DecodeError {
                    id: 0,
                    code: ErrorCode::TooLarge,
                }));
            }
            let reply = Reply::decode(&self.buf[..rec.len]).map_err(SignError::BadReply)?;
            if reply.id() == req.id() {
                return Ok(reply);
            }
        }
    }

    fn drain_stale(&mut self) -> Result<(), SignError> {
        loop {
            match sock::recv(self.fd.as_fd(), &mut self.buf, true) {
                Ok(r) if r.len == 0 && !r.truncated => return Err(SignError::Closed),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(SignError::from_io(e)),
            }
        }
    }
}

/// A [`KeyClient`] shared by the [`RemoteKey`]s of one worker.
pub type SharedClient = Arc<Mutex<KeyClient>>;

/// A signing key that lives in the key process.
#[derive(Debug, Clone)]
pub struct RemoteKey {
    id: u32,
    key_type: KeyType,
    spki: Vec<u8>,
    client: SharedClient,
}

impl RemoteKey {
    /// The key `id` of the key process, whose public half is the leaf of
    /// `chain`.
    pub fn new(id: u32, chain: &CertChain, client: SharedClient) -> RemoteKey {
        RemoteKey {
            id,
            key_type: chain.key_type,
            spki: chain.leaf.spki.clone(),
            client,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self
            .key_type
            .schemes()
            .iter()
            .find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            key: self.id,
            scheme: *scheme,
            client: self.client.clone(),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.key_type.algorithm()
    }
}

/// One scheme of a [`RemoteKey`], as rustls uses it for one handshake.
#[derive(Debug)]
struct RemoteSigner {
    key: u32,
    scheme: SignatureScheme,
    client: SharedClient,
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let result = match self.client.lock() {
            Ok(mut c) => c.sign(self.key, self.scheme, message),
            Err(_) => Err(SignError::Poisoned),
        };
        result.map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// The `CertifiedKey` a worker serves for key `id`: the public chain and a
/// [`RemoteKey`] on `client`.
pub fn certified_key(id: u32, chain: &CertChain, client: SharedClient) -> CertifiedKey {
    CertifiedKey::new(
        chain.chain.clone(),
        Arc::new(RemoteKey::new(id, chain, client)),
    )
}
