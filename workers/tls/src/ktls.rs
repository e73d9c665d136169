//! kTLS: detection, and the hand-off of a finished rustls session to the
//! kernel.
//!
//! With kTLS the kernel encrypts and decrypts TLS records itself once user
//! space has done the handshake and handed it the traffic keys, so
//! `sendfile(2)` keeps working on a TLS connection (baton-static's large
//! bodies).
//!
//! # Detection
//!
//! 1. `/proc/sys/net/ipv4/tcp_available_ulp` lists the ULPs registered
//!    now; `tls` there means yes.
//! 2. Otherwise the `tls` module may still be loadable (the kernel loads
//!    `tcp-ulp-tls` on demand for a process with `CAP_NET_ADMIN`), so
//!    [`probe`] tries `setsockopt(TCP_ULP, "tls")` on a connected loopback
//!    socket: only that says for sure. The probe costs a socket pair on
//!    127.0.0.1 and is meant for start-up, before any sandbox: the
//!    acceptor probes and tells the workers in the TLS bundle
//!    ([`crate::bundle`]); a sandboxed worker never probes.
//!
//! # Hand-off
//!
//! [`handoff`] (through [`crate::TlsConn::into_ktls`]), for one connection,
//! after its handshake, when rustls holds nothing (no received plaintext,
//! no partial received record, no TLS bytes to write: TLS 1.3 session
//! tickets already flushed) and the suite is one the kernel knows:
//!
//! 1. `setsockopt(SOL_TCP, TCP_ULP, "tls")`. If the kernel refuses,
//!    nothing is lost: the connection stays on rustls.
//! 2. `dangerous_extract_secrets` (which consumes the rustls session: from
//!    here there is no way back), each direction's keys and record
//!    sequence number into the kernel's `crypto_info` ([`CryptoInfo`],
//!    `linux/tls.h`), `setsockopt(SOL_TLS, TLS_TX)` then `TLS_RX`. If
//!    either fails the connection cannot go on: the caller closes it.
//!
//! Both directions go to the kernel: rustls's state is consumed by the
//! extraction, so a TX-only hand-off is not possible.
//!
//! After it the socket is read and written in plaintext (`recv`, `send`,
//! `sendfile`); the kernel frames, encrypts and decrypts. A record that is
//! not application data (an alert such as close_notify, a TLS 1.3
//! KeyUpdate or NewSessionTicket) makes a plain `recv` fail with `EIO` (the
//! kernel delivers it only to a `recvmsg` with a `TLS_GET_RECORD_TYPE`
//! control message buffer): baton treats that as the end of the
//! connection, and closes it. A client that rekeys with KeyUpdate is
//! therefore closed; one that never does (every browser and curl for the
//! sizes a static server sends) is not affected. Closing such a
//! connection sends no close_notify (that would take a `sendmsg` with a
//! `TLS_SET_RECORD_TYPE` control message, not done): baton's responses are
//! framed by `Content-Length`, so a client still knows a body is whole.
//!
//! # Keys and nonces per suite
//!
//! rustls gives each direction a key and a 12-byte IV, and its nonce for
//! record `n` is `IV XOR (0^4 || n as u64 BE)`.
//!
//! * **TLS 1.3** (all suites) and **TLS 1.2 ChaCha20-Poly1305**: the kernel
//!   builds the nonce the same way from `salt || iv` (AES-GCM: `salt` is
//!   the IV's first 4 bytes, `iv` its last 8; ChaCha20: `iv` is all 12 and
//!   there is no salt), XORed with `rec_seq`, which is rustls's sequence
//!   number. The same nonces, seamlessly continued.
//! * **TLS 1.2 AES-GCM**: the nonce is `salt || explicit`, where `salt` is
//!   the 4-byte implicit IV from the key block and the 8-byte explicit part
//!   travels in each record (the receiver reads it from the record, so any
//!   unique value works). rustls chooses `explicit = E XOR n` (E: the last
//!   8 bytes of its IV); the kernel instead sends `iv`, then `iv + 1`, ...
//!   (it increments the explicit part per record). Handing it `E` would
//!   reuse the nonce rustls already used for record 0 (the server's
//!   Finished): a catastrophic GCM nonce reuse. So [`CryptoInfo::new`]
//!   starts the kernel above every value rustls used: rustls used
//!   `E XOR k` for `k < n`, all inside the aligned block of `2^b >= n`
//!   values around `E`; the kernel starts at the next block,
//!   `(E | (2^b - 1)) + 1`. Its counter would have to wrap 2^64 before
//!   reaching that block again, and the kernel stops the connection when
//!   `rec_seq` wraps first. `rec_seq` itself (the AAD's sequence number)
//!   is rustls's `n`, continued.

use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// `linux/tls.h` and `bits/socket.h` numbers.
pub const SOL_TLS: libc::c_int = 282;
pub const TLS_TX: libc::c_int = 1;
pub const TLS_RX: libc::c_int = 2;
pub const TCP_ULP: libc::c_int = 31;
pub const TLS_1_2_VERSION: u16 = 0x0303;
pub const TLS_1_3_VERSION: u16 = 0x0304;
pub const TLS_CIPHER_AES_GCM_128: u16 = 51;
pub const TLS_CIPHER_AES_GCM_256: u16 = 52;
pub const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    /// `tls` is registered (listed in `tcp_available_ulp`).
    Available,
    /// Not listed, but `setsockopt(TCP_ULP, "tls")` worked: the module was
    /// loaded on demand.
    Loadable,
    /// The kernel refused: with the reason (errno of the probe, or that
    /// the list lacks it and probing was not asked for).
    Unavailable(String),
}

impl Ktls {
    pub fn is_available(&self) -> bool {
        matches!(self, Ktls::Available | Ktls::Loadable)
    }

    /// The record path a TLS worker takes given this: the text of the
    /// start-up log lines (acceptor and worker say the same).
    pub fn record_path(&self) -> String {
        match self {
            Ktls::Unavailable(why) => format!("userspace rustls (kernel has no kTLS: {why})"),
            ok => format!("kTLS ({ok}): keys handed to the kernel after each handshake, sendfile(2) for file bodies"),
        }
    }
}

impl fmt::Display for Ktls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ktls::Available => f.write_str("kTLS available (tcp_available_ulp lists tls)"),
            Ktls::Loadable => f.write_str("kTLS available (the tls module loaded on demand)"),
            Ktls::Unavailable(why) => write!(f, "kTLS unavailable: {why}"),
        }
    }
}

/// Parses the content of `tcp_available_ulp` (space-separated names).
pub fn ulp_list_has_tls(list: &str) -> bool {
    list.split_whitespace().any(|w| w == "tls")
}

/// Looks at `tcp_available_ulp` only (no socket).
pub fn listed() -> Ktls {
    match std::fs::read_to_string(AVAILABLE_ULP) {
        Ok(s) if ulp_list_has_tls(&s) => Ktls::Available,
        Ok(s) => Ktls::Unavailable(format!("{AVAILABLE_ULP} lists only \"{}\"", s.trim())),
        Err(e) => Ktls::Unavailable(format!("cannot read {AVAILABLE_ULP}: {e}")),
    }
}

/// The list, then a real `setsockopt(TCP_ULP, "tls")` on a loopback
/// connection when the list lacks it.
pub fn probe() -> Ktls {
    let listed = listed();
    if listed.is_available() {
        return listed;
    }
    match try_ulp() {
        Ok(()) => Ktls::Loadable,
        Err(e) => Ktls::Unavailable(format!("setsockopt(TCP_ULP, \"tls\") failed: {e}")),
    }
}

fn try_ulp() -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    System.set_ulp(client.as_raw_fd())
}

// ---- crypto_info --------------------------------------------------------

/// `struct tls_crypto_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsCryptoInfo {
    pub version: u16,
    pub cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_128` (also used for TLS 1.3).
#[repr(C)]
#[derive(Clone)]
pub struct AesGcm128 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 8],
    pub key: [u8; 16],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`.
#[repr(C)]
#[derive(Clone)]
pub struct AesGcm256 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 8],
    pub key: [u8; 32],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305`.
#[repr(C)]
#[derive(Clone)]
pub struct Chacha20Poly1305 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 12],
    pub key: [u8; 32],
    pub rec_seq: [u8; 8],
}

// The kernel's sizes (checked against linux/tls.h in the tests).
const _: () = assert!(std::mem::size_of::<AesGcm128>() == 40);
const _: () = assert!(std::mem::size_of::<AesGcm256>() == 56);
const _: () = assert!(std::mem::size_of::<Chacha20Poly1305>() == 56);

/// One direction's `crypto_info`, for `setsockopt(SOL_TLS, TLS_TX/TLS_RX)`.
/// Holds a traffic key: zeroed on drop, and its `Debug` shows none of it.
#[derive(Clone)]
pub enum CryptoInfo {
    AesGcm128(AesGcm128),
    AesGcm256(AesGcm256),
    Chacha20Poly1305(Chacha20Poly1305),
}

/// The AEAD of a session being handed off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// The protocol version of a session being handed off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn number(self) -> u16 {
        match self {
            Version::Tls12 => TLS_1_2_VERSION,
            Version::Tls13 => TLS_1_3_VERSION,
        }
    }
}

/// Why a session cannot be handed to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("the kernel has no kTLS for this suite ({0})")]
    Unsupported(String),
    #[error("the TLS version is not 1.2 or 1.3")]
    Version,
    #[error("{0} key of {1} bytes")]
    KeyLength(&'static str, usize),
    #[error("not ready for kTLS: {0}")]
    NotReady(&'static str),
    /// The kernel refused the ULP: the session is still rustls's.
    #[error("setsockopt(TCP_ULP, \"tls\"): {0}")]
    Ulp(io::Error),
    /// After extraction: the connection cannot go on.
    #[error("extracting the session keys: {0}")]
    Extract(rustls::Error),
    /// After extraction: the connection cannot go on.
    #[error("setsockopt(SOL_TLS, {dir}): {source}")]
    Crypto {
        dir: &'static str,
        source: io::Error,
    },
}

/// The explicit nonce the kernel starts from for TLS 1.2 AES-GCM, given
/// rustls's `e` (its IV's last 8 bytes) and `seq` records already sent
/// with nonces `e XOR k`, `k < seq` (see the module documentation).
pub fn tls12_gcm_explicit_start(e: u64, seq: u64) -> u64 {
    if seq == 0 {
        return e;
    }
    // Smallest b with 2^b >= seq.
    let b = 64 - (seq - 1).leading_zeros();
    let mask = if b >= 64 { u64::MAX } else { (1u64 << b) - 1 };
    (e | mask).wrapping_add(1)
}

impl CryptoInfo {
    /// One direction of rustls's extracted secrets, `seq` being its next
    /// record sequence number.
    pub fn new(
        version: Version,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<CryptoInfo, KtlsError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(KtlsError::Unsupported(
                    "a cipher this build does not know".into(),
                ))
            }
        };
        CryptoInfo::from_parts(version, seq, cipher, key.as_ref(), iv.as_ref())
    }

    /// [`CryptoInfo::new`] from the raw key and 12-byte IV.
    pub fn from_parts(
        version: Version,
        seq: u64,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8],
    ) -> Result<CryptoInfo, KtlsError> {
        let v = version.number();
        let rec_seq = seq.to_be_bytes();
        let iv = iv12(iv)?;
        let mut salt = [0u8; 4];
        let mut iv8 = [0u8; 8];
        salt.copy_from_slice(&iv[..4]);
        iv8.copy_from_slice(&iv[4..]);
        if version == Version::Tls12 {
            // AES-GCM in TLS 1.2: the kernel increments the explicit part;
            // start it above every nonce rustls used.
            iv8 = tls12_gcm_explicit_start(u64::from_be_bytes(iv8), seq).to_be_bytes();
        }
        let info = |cipher_type| TlsCryptoInfo {
            version: v,
            cipher_type,
        };
        Ok(match cipher {
            Cipher::Aes128Gcm => CryptoInfo::AesGcm128(AesGcm128 {
                info: info(TLS_CIPHER_AES_GCM_128),
                iv: iv8,
                key: key_bytes("AES-128-GCM", key)?,
                salt,
                rec_seq,
            }),
            Cipher::Aes256Gcm => CryptoInfo::AesGcm256(AesGcm256 {
                info: info(TLS_CIPHER_AES_GCM_256),
                iv: iv8,
                key: key_bytes("AES-256-GCM", key)?,
                salt,
                rec_seq,
            }),
            Cipher::Chacha20Poly1305 => CryptoInfo::Chacha20Poly1305(Chacha20Poly1305 {
                info: info(TLS_CIPHER_CHACHA20_POLY1305),
                iv,
                key: key_bytes("ChaCha20-Poly1305", key)?,
                rec_seq,
            }),
        })
    }

    pub fn info(&self) -> TlsCryptoInfo {
        match self {
            CryptoInfo::AesGcm128(c) => c.info,
            CryptoInfo::AesGcm256(c) => c.info,
            CryptoInfo::Chacha20Poly1305(c) => c.info,
        }
    }

    pub fn rec_seq(&self) -> u64 {
        u64::from_be_bytes(match self {
            CryptoInfo::AesGcm128(c) => c.rec_seq,
            CryptoInfo::AesGcm256(c) => c.rec_seq,
            CryptoInfo::Chacha20Poly1305(c) => c.rec_seq,
        })
    }

    /// The struct as the kernel reads it.
    pub fn as_bytes(&self) -> &[u8] {
        let (p, n): (*const u8, usize) = match self {
            CryptoInfo::AesGcm128(c) => ((c as *const AesGcm128).cast(), size_of_val(c)),
            CryptoInfo::AesGcm256(c) => ((c as *const AesGcm256).cast(), size_of_val(c)),
            CryptoInfo::Chacha20Poly1305(c) => {
                ((c as *const Chacha20Poly1305).cast(), size_of_val(c))
            }
        };
        // SAFETY: `p` points to a live `#[repr(C)]` struct of `n` bytes
        // borrowed from `self` for the returned lifetime; the structs are
        // a u16 pair then byte arrays only, so there is no padding (their
        // sizes are asserted at compile time) and every byte is
        // initialised.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        let (p, n): (*mut u8, usize) = match self {
            CryptoInfo::AesGcm128(c) => ((c as *mut AesGcm128).cast(), size_of_val(c)),
            CryptoInfo::AesGcm256(c) => ((c as *mut AesGcm256).cast(), size_of_val(c)),
            CryptoInfo::Chacha20Poly1305(c) => {
                ((c as *mut Chacha20Poly1305).cast(), size_of_val(c))
            }
        };
        for i in 0..n {
            // SAFETY: `p..p+n` is the struct exclusively borrowed through
            // `self` (no padding, see `as_bytes`); any byte value is valid
            // for its fields. Volatile so the zeroing is not elided.
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
    }
}

impl fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.info();
        f.debug_struct("CryptoInfo")
            .field("version", &format_args!("{:#06x}", i.version))
            .field("cipher_type", &i.cipher_type)
            .field("rec_seq", &self.rec_seq())
            .finish_non_exhaustive()
    }
}

fn iv12(iv: &[u8]) -> Result<[u8; 12], KtlsError> {
    iv.try_into()
        .map_err(|_| KtlsError::KeyLength("IV", iv.len()))
}

fn key_bytes<const N: usize>(what: &'static str, key: &[u8]) -> Result<[u8; N], KtlsError> {
    key.try_into()
        .map_err(|_| KtlsError::KeyLength(what, key.len()))
}

/// Both directions of an extraction.
#[derive(Debug)]
pub struct Keys {
    pub tx: CryptoInfo,
    pub rx: CryptoInfo,
}

impl Keys {
    pub fn new(version: Version, secrets: &ExtractedSecrets) -> Result<Keys, KtlsError> {
        Ok(Keys {
            tx: CryptoInfo::new(version, secrets.tx.0, &secrets.tx.1)?,
            rx: CryptoInfo::new(version, secrets.rx.0, &secrets.rx.1)?,
        })
    }
}

/// Whether the kernel takes this negotiated session (checked before the
/// ULP is attached, so that an unsupported one stays on rustls).
pub fn supported(
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::SupportedCipherSuite>,
) -> Result<Version, KtlsError> {
    use rustls::CipherSuite as S;
    let v = match version {
        Some(rustls::ProtocolVersion::TLSv1_2) => Version::Tls12,
        Some(rustls::ProtocolVersion::TLSv1_3) => Version::Tls13,
        _ => return Err(KtlsError::Version),
    };
    let Some(suite) = suite else {
        return Err(KtlsError::NotReady("no cipher suite negotiated"));
    };
    match suite.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS13_AES_256_GCM_SHA384
        | S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Ok(v),
        other => Err(KtlsError::Unsupported(format!("{other:?}"))),
    }
}

// ---- the kernel seam ----------------------------------------------------

/// Which direction a `crypto_info` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

/// The two `setsockopt` steps of a hand-off; [`System`] makes them, tests
/// substitute a fake that records what it was given.
pub trait Kernel {
    /// `setsockopt(fd, SOL_TCP, TCP_ULP, "tls")`.
    fn set_ulp(&mut self, fd: RawFd) -> io::Result<()>;
    /// `setsockopt(fd, SOL_TLS, TLS_TX or TLS_RX, info)`.
    fn set_crypto(&mut self, fd: RawFd, dir: Direction, info: &CryptoInfo) -> io::Result<()>;
}

/// The running kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: the value pointer and length describe the borrowed `value`
    // slice for the whole call; a bad `fd` makes the call fail (EBADF,
    // ENOTSOCK), nothing else.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Kernel for System {
    fn set_ulp(&mut self, fd: RawFd) -> io::Result<()> {
        setsockopt(fd, libc::SOL_TCP, TCP_ULP, b"tls")
    }
    fn set_crypto(&mut self, fd: RawFd, dir: Direction, info: &CryptoInfo) -> io::Result<()> {
        let name = match dir {
            Direction::Tx => TLS_TX,
            Direction::Rx => TLS_RX,
        };
        setsockopt(fd, SOL_TLS, name, info.as_bytes())
    }
}

/// Steps 2 and 3 of a hand-off, once the ULP is attached: `conn` must be
/// a finished session with nothing buffered (see
/// [`crate::TlsConn::into_ktls`], which checks that and does step 1).
/// Any error here is fatal for the connection.
pub fn install(
    kernel: &mut dyn Kernel,
    fd: RawFd,
    version: Version,
    conn: rustls::ServerConnection,
) -> Result<(), KtlsError> {
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(KtlsError::Extract)?;
    let keys = Keys::new(version, &secrets)?;
    drop(secrets);
    kernel
        .set_crypto(fd, Direction::Tx, &keys.tx)
        .map_err(|source| KtlsError::Crypto {
            dir: "TLS_TX",
            source,
        })?;
    kernel
        .set_crypto(fd, Direction::Rx, &keys.rx)
        .map_err(|source| KtlsError::Crypto {
            dir: "TLS_RX",
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn parses_the_list() {
        assert!(ulp_list_has_tls("espintcp mptcp tls\n"));
        assert!(!ulp_list_has_tls("espintcp mptcp\n"));
        assert!(!ulp_list_has_tls("tlsx"));
    }

    #[test]
    fn probe_gives_a_reason() {
        let k = probe();
        println!("{k}");
        if let Ktls::Unavailable(why) = &k {
            assert!(!why.is_empty());
            assert!(k
                .record_path()
                .starts_with("userspace rustls (kernel has no kTLS: "));
        } else {
            assert!(k.record_path().starts_with("kTLS"));
        }
    }

    /// The values of linux/tls.h (kernel 6.x), also compared with the
    /// header itself by `layout_matches_the_installed_header`.
    #[test]
    fn layout_is_the_kernels() {
        assert_eq!(size_of::<TlsCryptoInfo>(), 4);
        assert_eq!(
            (
                size_of::<AesGcm128>(),
                offset_of!(AesGcm128, iv),
                offset_of!(AesGcm128, key),
                offset_of!(AesGcm128, salt),
                offset_of!(AesGcm128, rec_seq)
            ),
            (40, 4, 12, 28, 32)
        );
        assert_eq!(
            (
                size_of::<AesGcm256>(),
                offset_of!(AesGcm256, iv),
                offset_of!(AesGcm256, key),
                offset_of!(AesGcm256, salt),
                offset_of!(AesGcm256, rec_seq)
            ),
            (56, 4, 12, 44, 48)
        );
        assert_eq!(
            (
                size_of::<Chacha20Poly1305>(),
                offset_of!(Chacha20Poly1305, iv),
                offset_of!(Chacha20Poly1305, key),
                offset_of!(Chacha20Poly1305, rec_seq)
            ),
            (56, 4, 16, 48)
        );
        assert_eq!(SOL_TLS, libc::SOL_TLS);
        assert_eq!(TCP_ULP, libc::TCP_ULP);
    }

    /// Compiles a C program against /usr/include/linux/tls.h (skipped when
    /// the header or a C compiler is missing) and compares.
    #[test]
    fn layout_matches_the_installed_header() {
        let header = std::path::Path::new("/usr/include/linux/tls.h");
        if !header.exists() {
            println!("skipping: no {}", header.display());
            return;
        }
        let dir = std::env::temp_dir().join(format!("baton-ktls-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let src = dir.join("l.c");
        std::fs::write(
            &src,
            r#"#include <stdio.h>
#include <stddef.h>
#include <linux/tls.h>
#define O(t, f) (int)offsetof(struct t, f)
int main(void) {
  printf("%d %d %d %d %d\n", (int)sizeof(struct tls12_crypto_info_aes_gcm_128), O(tls12_crypto_info_aes_gcm_128, iv), O(tls12_crypto_info_aes_gcm_128, key), O(tls12_crypto_info_aes_gcm_128, salt), O(tls12_crypto_info_aes_gcm_128, rec_seq));
  printf("%d %d %d %d %d\n", (int)sizeof(struct tls12_crypto_info_aes_gcm_256), O(tls12_crypto_info_aes_gcm_256, iv), O(tls12_crypto_info_aes_gcm_256, key), O(tls12_crypto_info_aes_gcm_256, salt), O(tls12_crypto_info_aes_gcm_256, rec_seq));
  printf("%d %d %d %d\n", (int)sizeof(struct tls12_crypto_info_chacha20_poly1305), O(tls12_crypto_info_chacha20_poly1305, iv), O(tls12_crypto_info_chacha20_poly1305, key), O(tls12_crypto_info_chacha20_poly1305, rec_seq));
  printf("%d %d %d %d %d %d %d %d\n", TLS_TX, TLS_RX, TLS_1_2_VERSION, TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128, TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305, TLS_GET_RECORD_TYPE);
  return 0;
}
"#,
        )
        .expect("write");
        let exe = dir.join("l");
        let cc = std::process::Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status();
        if !cc.is_ok_and(|s| s.success()) {
            println!("skipping: no C compiler");
            return;
        }
        let out = std::process::Command::new(&exe).output().expect("run");
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        let want = format!(
            "{} {} {} {} {}\n{} {} {} {} {}\n{} {} {} {}\n{} {} {} {} {} {} {} 2\n",
            size_of::<AesGcm128>(),
            offset_of!(AesGcm128, iv),
            offset_of!(AesGcm128, key),
            offset_of!(AesGcm128, salt),
            offset_of!(AesGcm128, rec_seq),
            size_of::<AesGcm256>(),
            offset_of!(AesGcm256, iv),
            offset_of!(AesGcm256, key),
            offset_of!(AesGcm256, salt),
            offset_of!(AesGcm256, rec_seq),
            size_of::<Chacha20Poly1305>(),
            offset_of!(Chacha20Poly1305, iv),
            offset_of!(Chacha20Poly1305, key),
            offset_of!(Chacha20Poly1305, rec_seq),
            TLS_TX,
            TLS_RX,
            TLS_1_2_VERSION,
            TLS_1_3_VERSION,
            TLS_CIPHER_AES_GCM_128,
            TLS_CIPHER_AES_GCM_256,
            TLS_CIPHER_CHACHA20_POLY1305,
        );
        assert_eq!(got, want);
    }

    const IV: [u8; 12] = [
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab,
    ];

    fn map(v: Version, seq: u64, c: Cipher) -> CryptoInfo {
        let n = if c == Cipher::Aes128Gcm { 16 } else { 32 };
        let key: Vec<u8> = (0..n).collect();
        CryptoInfo::from_parts(v, seq, c, &key, &IV).expect("map")
    }

    #[test]
    fn secrets_map_to_each_suites_struct() {
        // TLS 1.3 AES-128-GCM: salt = IV[..4], iv = IV[4..], seq as is.
        let c = map(Version::Tls13, 7, Cipher::Aes128Gcm);
        let CryptoInfo::AesGcm128(a) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(
            a.info,
            TlsCryptoInfo {
                version: 0x0304,
                cipher_type: 51
            }
        );
        assert_eq!(a.salt, [0xa0, 0xa1, 0xa2, 0xa3]);
        assert_eq!(a.iv, [0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab]);
        assert_eq!(a.key, std::array::from_fn::<u8, 16, _>(|i| i as u8));
        assert_eq!(a.rec_seq, [0, 0, 0, 0, 0, 0, 0, 7]);
        let b = c.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(
            &b[..4],
            &[0x04, 0x03, 51, 0],
            "u16s in native (little) endian"
        );
        assert_eq!(&b[4..12], &a.iv);
        assert_eq!(&b[28..32], &a.salt);
        assert_eq!(&b[32..], &a.rec_seq);

        // TLS 1.3 AES-256-GCM.
        let c = map(Version::Tls13, 0, Cipher::Aes256Gcm);
        let CryptoInfo::AesGcm256(a) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(
            a.info,
            TlsCryptoInfo {
                version: 0x0304,
                cipher_type: 52
            }
        );
        assert_eq!(a.salt, [0xa0, 0xa1, 0xa2, 0xa3]);
        assert_eq!(a.iv[0], 0xa4);
        assert_eq!(a.key[31], 31);
        assert_eq!(c.as_bytes().len(), 56);

        // ChaCha20-Poly1305 (1.2 and 1.3 alike): iv = all 12, no salt.
        for (v, n) in [(Version::Tls13, 0x0304), (Version::Tls12, 0x0303)] {
            let c = map(v, 3, Cipher::Chacha20Poly1305);
            let CryptoInfo::Chacha20Poly1305(a) = &c else {
                panic!("{c:?}")
            };
            assert_eq!(
                a.info,
                TlsCryptoInfo {
                    version: n,
                    cipher_type: 54
                }
            );
            assert_eq!(a.iv, std::array::from_fn::<u8, 12, _>(|i| 0xa0 + i as u8));
            assert_eq!(a.rec_seq, 3u64.to_be_bytes());
        }

        // TLS 1.2 AES-GCM: salt = implicit IV; the explicit part starts
        // above what rustls used (E XOR 0 for the Finished at seq 0).
        let c = map(Version::Tls12, 1, Cipher::Aes128Gcm);
        let CryptoInfo::AesGcm128(a) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(a.info.version, 0x0303);
        assert_eq!(a.salt, [0xa0, 0xa1, 0xa2, 0xa3]);
        let e = u64::from_be_bytes([0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab]);
        assert_eq!(u64::from_be_bytes(a.iv), e + 1);
        assert_eq!(a.rec_seq, 1u64.to_be_bytes());
        assert!(!format!("{c:?}").contains("key:"), "Debug shows no key");

        // A key of the wrong length is an error, not a panic.
        let k32 = [7u8; 32];
        assert!(matches!(
            CryptoInfo::from_parts(Version::Tls13, 0, Cipher::Aes128Gcm, &k32, &IV),
            Err(KtlsError::KeyLength(..))
        ));
        // What rustls hands out for AES-256 maps through `new`.
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from(k32),
            iv: rustls::crypto::cipher::Iv::new(IV),
        };
        let c = CryptoInfo::new(Version::Tls13, 9, &s).expect("new");
        assert_eq!((c.info().cipher_type, c.rec_seq()), (52, 9));
    }

    #[test]
    fn tls12_gcm_explicit_nonces_never_repeat_rustls_ones() {
        let es = [
            0u64,
            1,
            2,
            3,
            0xa4a5a6a7a8a9aaab,
            u64::MAX,
            u64::MAX - 1,
            0x8000_0000_0000_0000,
        ];
        for &e in &es {
            for seq in 0..70u64 {
                let used: std::collections::HashSet<u64> = (0..seq).map(|k| e ^ k).collect();
                let start = tls12_gcm_explicit_start(e, seq);
                for m in 0..200u64 {
                    let n = start.wrapping_add(m);
                    assert!(!used.contains(&n), "e={e:#x} seq={seq} m={m}");
                }
            }
        }
    }

    #[test]
    fn supported_suites() {
        use rustls::crypto::ring::cipher_suite as cs;
        for s in rustls::crypto::ring::DEFAULT_CIPHER_SUITES {
            let v = match s {
                rustls::SupportedCipherSuite::Tls13(_) => rustls::ProtocolVersion::TLSv1_3,
                rustls::SupportedCipherSuite::Tls12(_) => rustls::ProtocolVersion::TLSv1_2,
            };
            assert!(supported(Some(v), Some(*s)).is_ok(), "{s:?}");
        }
        assert!(matches!(
            supported(
                Some(rustls::ProtocolVersion::TLSv1_1),
                Some(cs::TLS13_AES_128_GCM_SHA256)
            ),
            Err(KtlsError::Version)
        ));
    }

    /// The fake kernel refusing the ULP is the "stay on rustls" case; a
    /// refused TX after extraction is fatal (covered in tests/ktls.rs).
    #[test]
    fn system_kernel_says_why_here() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        match System.set_ulp(c.as_raw_fd()) {
            Ok(()) => println!("this kernel has kTLS"),
            Err(e) => println!("set_ulp: {e}"),
        }
        assert!(System.set_ulp(-1).is_err());
    }
}
