//! # baton-tls: TLS termination for baton workers, keys kept apart
//!
//! baton's workers parse untrusted bytes; with TLS they must also do the
//! handshake. This crate lets them do it **without ever holding a private
//! key**, the way OpenBSD relayd's "ca" process does: a small key process
//! holds the keys and signs on request; workers hold certificate chains
//! and a channel to it.
//!
//! ```text
//!   acceptor (baton) ── control channel ──► key process (keyd): keys, sandboxed
//!        │  spawns, gives each worker                ▲
//!        │  one socketpair end ──────────────────────┘ SIGN / PING over SEQPACKET
//!        ▼
//!   worker: rustls ServerConnection on the handed TCP socket,
//!           SniResolver → CertifiedKey { public chain, RemoteKey }
//! ```
//!
//! The pieces:
//!
//! * [`load`]: PEM certificate chains and keys, with errors naming the
//!   file and the reason; [`load::check_pair`] compares public keys.
//! * [`resolve`]: [`SniResolver`], certificates chosen by SNI (exact SAN
//!   names, `*.` wildcards, a default).
//! * [`keyd`]: the key process: load, confine, serve; [`keyd_seccomp`]
//!   its seccomp filter.
//! * [`wire`]: its versioned request/reply format.
//! * [`signer`]: [`RemoteKey`], a rustls `SigningKey` that asks the key
//!   process, with a timeout.
//! * [`ticket`]: [`Ticketer`], session tickets with keys given by baton
//!   and shared by every worker, rotated at run time.
//! * [`conn`]: [`TlsConn`], a non-blocking server connection for a mio
//!   loop, with a handshake deadline and classified errors.
//! * [`ktls`]: whether the kernel offers kTLS, and the hand-off of a
//!   finished session's keys to it ([`TlsConn::into_ktls`]).
//! * [`server_config`]: the rustls `ServerConfig` baton uses.
//!
//! # Crypto provider: ring
//!
//! rustls's default provider is aws-lc-rs, whose build wants cmake (and
//! NASM or a Go toolchain for some configurations) and takes minutes of a
//! two-core machine. ring builds with the C compiler alone (`cc`), which
//! is what this machine and CI have, in about ten seconds, and offers all
//! baton needs: TLS 1.2 and 1.3, ECDHE on X25519/P-256/P-384, AES-GCM and
//! ChaCha20-Poly1305, RSA (PKCS#1 and PSS), ECDSA P-256/P-384 and Ed25519
//! signing, and the AEAD the ticketer uses. What ring lacks (post-quantum
//! key exchange, FIPS) baton does not promise. The workspace enables
//! rustls with `default-features = false` and `ring`, `std`, `tls12` only.
//!
//! # Threat model, in short
//!
//! * A compromised **worker** can read and forge traffic of the
//!   connections it serves, and can ask the key process to sign (an
//!   oracle while it lives), but cannot obtain a private key: the key
//!   bytes never exist in its memory (the integration test
//!   `worker_memory_has_no_key` searches a worker's memory for them).
//!   It does hold the session-ticket keys (inherent to stateless
//!   resumption; they are rotated, see [`ticket`]).
//! * The **key process** parses only the fixed request format, bounded,
//!   and is sandboxed after loading its keys (see [`keyd`]).
//! * A **dead or hung key process** fails the handshakes that need a
//!   signature within the signer's timeout (1 s); resumed handshakes, which
//!   need none, keep working.

pub mod bundle;
pub mod conn;
pub mod der;
pub mod keyd;
pub mod keyd_seccomp;
pub mod ktls;
pub mod load;
pub mod resolve;
pub mod signer;
mod sock;
pub mod ticket;
pub mod wire;

pub use conn::{FdIo, Handoff, Interest, TlsConn, TlsError, PLAINTEXT_HTTP_RESPONSE};
pub use der::KeyType;
pub use keyd::{KeyFiles, KeyStore};
pub use load::{CertChain, LoadError, LoadReason};
pub use resolve::SniResolver;
pub use signer::{certified_key, KeyClient, RemoteKey, SharedClient, SignError};
pub use ticket::{TicketKey, TicketKeys, Ticketer};

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ResolvesServerCert};
use rustls::ServerConfig;

/// The lowest TLS version a server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3 (the default: what every current client speaks).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl std::str::FromStr for MinVersion {
    type Err = String;
    /// `1.2` or `1.3`, as a `--tls-min-version` flag would take them.
    fn from_str(s: &str) -> Result<MinVersion, String> {
        match s {
            "1.2" => Ok(MinVersion::Tls12),
            "1.3" => Ok(MinVersion::Tls13),
            _ => Err(format!(
                "unsupported TLS version {s:?} (expected 1.2 or 1.3)"
            )),
        }
    }
}

/// How [`server_config`] sets a server up.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub min_version: MinVersion,
    /// ALPN protocols offered, most preferred first (default `http/1.1`).
    /// A client that offers ALPN but none of these is refused, as RFC 7301
    /// says.
    pub alpn: Vec<Vec<u8>>,
    /// TLS 1.3 tickets sent after each full handshake (rustls's default 2;
    /// 0 disables TLS 1.3 resumption).
    pub tls13_tickets: usize,
    /// Let sessions be handed to the kernel (kTLS) after the handshake:
    /// sets rustls's `enable_secret_extraction`, which
    /// [`TlsConn::into_ktls`] needs. Off unless the acceptor found kTLS.
    pub ktls: bool,
}

impl Default for TlsOptions {
    fn default() -> TlsOptions {
        TlsOptions {
            min_version: MinVersion::Tls12,
            alpn: vec![b"http/1.1".to_vec()],
            tls13_tickets: 2,
            ktls: false,
        }
    }
}

/// The crypto provider: ring, with rustls's default (modern) cipher
/// suites and key exchange groups.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config over `resolver` (usually an [`SniResolver`] of remote
/// keys), with session tickets from `ticketer` when given (else
/// resumption is only within this process, by session id), no client
/// authentication and no 0-RTT data (replayable).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    ticketer: Option<Arc<dyn ProducesTickets>>,
    options: &TlsOptions,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match options.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = options.alpn.clone();
    config.send_tls13_tickets = options.tls13_tickets;
    config.max_early_data_size = 0;
    config.enable_secret_extraction = options.ktls;
    if let Some(t) = ticketer {
        config.ticketer = t;
    }
    Ok(Arc::new(config))
}

/// What a worker is given to build its TLS side: for each key id, its
/// public chain; the channel to the key process; the ticket keys.
/// [`WorkerTls::build`] turns it into a `ServerConfig`.
#[derive(Debug)]
pub struct WorkerTls {
    pub certs: Vec<(u32, CertChain)>,
    pub key_channel: OwnedFd,
    pub ticket_keys: Option<TicketKeys>,
    /// Ticket lifetime told to clients, seconds.
    pub ticket_lifetime: u32,
    pub options: TlsOptions,
}

/// What [`WorkerTls::build`] returns: the config, and the ticketer to
/// update on rotation.
#[derive(Debug, Clone)]
pub struct BuiltTls {
    pub config: Arc<ServerConfig>,
    pub ticketer: Option<Arc<Ticketer>>,
    pub client: SharedClient,
    /// Names claimed by two certificates (kept by the first): log them.
    pub shadowed: Vec<String>,
}

impl WorkerTls {
    /// The worker's `ServerConfig`: an [`SniResolver`] over remote keys
    /// (the first certificate is the default), the shared ticketer.
    pub fn build(self) -> Result<BuiltTls, rustls::Error> {
        let client = KeyClient::new(self.key_channel).shared();
        let mut resolver = SniResolver::new();
        let mut shadowed = Vec::new();
        for (id, chain) in &self.certs {
            let ck = Arc::new(certified_key(*id, chain, client.clone()));
            shadowed.extend(resolver.add(&chain.leaf.dns_names, ck));
        }
        let ticketer = self
            .ticket_keys
            .as_ref()
            .map(|k| Ticketer::new(k, self.ticket_lifetime));
        let config = server_config(
            Arc::new(resolver),
            ticketer.clone().map(|t| t as Arc<dyn ProducesTickets>),
            &self.options,
        )?;
        Ok(BuiltTls {
            config,
            ticketer,
            client,
            shadowed,
        })
    }
}

/// A connected pair for a key channel (`SOCK_SEQPACKET`, close-on-exec):
/// one end for the key process, one for a worker.
pub fn key_channel_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    sock::pair()
}

/// Gives the key process a new peer over its control channel (`ADD_PEER`
/// with `peer` attached), allowed to sign with the keys of `access`, and
/// waits up to `timeout` for the acknowledgement (the key process answers
/// at once: the wait is a round trip). The acceptor calls this for each
/// worker it spawns, then passes the other end of the pair to the worker.
pub fn add_peer(
    control: &OwnedFd,
    peer: &OwnedFd,
    access: wire::KeyAccess,
    timeout: std::time::Duration,
) -> Result<(), SignError> {
    use std::os::fd::{AsFd, AsRawFd};
    let req = wire::Request::AddPeer { id: 1, access };
    sock::send(control.as_fd(), &req.encode(), &[peer.as_raw_fd()]).map_err(SignError::Io)?;
    if !sock::wait_readable(control.as_fd(), timeout).map_err(SignError::Io)? {
        return Err(SignError::Timeout(timeout));
    }
    let mut buf = vec![0u8; wire::MAX_REPLY + 1];
    let rec = sock::recv(control.as_fd(), &mut buf, true).map_err(SignError::Io)?;
    if rec.len == 0 {
        return Err(SignError::Closed);
    }
    match wire::Reply::decode(&buf[..rec.len]).map_err(SignError::BadReply)? {
        wire::Reply::Pong { .. } => Ok(()),
        wire::Reply::Error { code, .. } => Err(SignError::Refused(code)),
        wire::Reply::Signature { .. } => Err(SignError::Unexpected),
    }
}
