//! Loading certificate chains and private keys from PEM files.
//!
//! Every error is a [`LoadError`]: the file's path and a [`LoadReason`]
//! that says what is wrong in words an operator can act on ("no certificate
//! in it", "encrypted keys are not supported: decrypt with openssl pkey",
//! "does not match its key").
//!
//! * [`CertChain::load`] reads a chain (leaf first), parses the leaf for
//!   its public key and SAN names, and refuses a key type ring cannot sign
//!   with. This part is public: workers hold it.
//! * [`load_key`] reads one private key (PKCS#8, PKCS#1 RSA or SEC1 EC) and
//!   checks ring can use it. Only the key process calls it; the buffer the
//!   file was read into is zeroed afterwards (best effort: the DER itself
//!   lives on in the returned value, which the key process keeps).
//! * [`check_pair`] proves a key belongs to a chain by comparing the
//!   key's public key with the leaf's SubjectPublicKeyInfo.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, SectionKind};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use rustls::sign::{CertifiedKey, SigningKey};

use crate::der::{self, CertInfo, DerError, KeyType};

/// A PEM file bigger than this is refused unread (a chain is a few KiB).
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// A file that could not be loaded, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct LoadError {
    pub path: PathBuf,
    pub reason: LoadReason,
}

/// Why a certificate or key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadReason {
    #[error("no such file")]
    Missing,
    #[error("cannot read it: {0}")]
    Read(io::Error),
    #[error("larger than {MAX_PEM_FILE} bytes: not a certificate or key file")]
    TooLarge,
    #[error("not valid PEM: {0}")]
    Pem(String),
    #[error("no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" section)")]
    NoCertificate,
    #[error(
        "no private key in it (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" \
         or \"BEGIN EC PRIVATE KEY\" section)"
    )]
    NoKey,
    #[error("more than one private key in it: keep one key per file")]
    SeveralKeys,
    #[error("encrypted keys are not supported: decrypt with openssl pkey")]
    EncryptedKey,
    #[error("unsupported key type: {0}")]
    UnsupportedKey(String),
    #[error("the certificate is malformed: {0}")]
    BadCertificate(DerError),
    #[error("the certificate's public key is of an unsupported type (RSA, ECDSA P-256/P-384 and Ed25519 are)")]
    UnsupportedCertKey,
    #[error("the certificate does not match the key in {}: their public keys differ", key.display())]
    Mismatch { key: PathBuf },
    #[error("cannot compare the certificate with the key in {}: {why}", key.display())]
    CannotCompare { key: PathBuf, why: String },
}

fn err(path: &Path, reason: LoadReason) -> LoadError {
    LoadError {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads a whole file, bounded by [`MAX_PEM_FILE`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, LoadError> {
    let file = File::open(path).map_err(|e| {
        let reason = if e.kind() == io::ErrorKind::NotFound {
            LoadReason::Missing
        } else {
            LoadReason::Read(e)
        };
        err(path, reason)
    })?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(path, LoadReason::Read(e)))?;
    if buf.len() as u64 > MAX_PEM_FILE {
        zero(&mut buf);
        return Err(err(path, LoadReason::TooLarge));
    }
    Ok(buf)
}

/// Overwrites a buffer that held key material.
fn zero(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a byte;
        // the volatile write only keeps the compiler from eliding it.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// Every PEM section of a buffer, in order (unknown labels skipped).
fn sections(buf: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    let mut rd: &[u8] = buf;
    let mut out = Vec::new();
    loop {
        match pem::from_buf(&mut rd) {
            Ok(Some(s)) => out.push(s),
            Ok(None) => return Ok(out),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A certificate chain, leaf first, with what baton reads from the leaf.
/// Holds no secret: this is what a worker keeps.
#[derive(Debug, Clone)]
pub struct CertChain {
    pub chain: Vec<CertificateDer<'static>>,
    pub leaf: CertInfo,
    pub key_type: KeyType,
    /// The file it was read from (for logs).
    pub path: PathBuf,
}

impl CertChain {
    /// Loads a PEM chain, leaf first.
    pub fn load(path: impl AsRef<Path>) -> Result<CertChain, LoadError> {
        let path = path.as_ref();
        let buf = read_bounded(path)?;
        let chain: Vec<CertificateDer<'static>> = sections(&buf)
            .map_err(|e| err(path, LoadReason::Pem(e)))?
            .into_iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der))
            .collect();
        if chain.is_empty() {
            return Err(err(path, LoadReason::NoCertificate));
        }
        Self::from_der(chain, path)
    }

    /// A chain already in DER, leaf first; `path` names it in errors.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        path: impl AsRef<Path>,
    ) -> Result<CertChain, LoadError> {
        let path = path.as_ref();
        let leaf_der = chain
            .first()
            .ok_or_else(|| err(path, LoadReason::NoCertificate))?;
        let leaf =
            der::parse_cert(leaf_der).map_err(|e| err(path, LoadReason::BadCertificate(e)))?;
        let key_type = KeyType::from_spki(&leaf.spki)
            .ok_or_else(|| err(path, LoadReason::UnsupportedCertKey))?;
        Ok(CertChain {
            chain,
            leaf,
            key_type,
            path: path.to_path_buf(),
        })
    }
}

/// Loads the one private key of a PEM file. For the key process only.
pub fn load_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, LoadError> {
    let path = path.as_ref();
    let mut buf = read_bounded(path)?;
    let result = parse_key(path, &buf);
    zero(&mut buf);
    result
}

fn parse_key(path: &Path, buf: &[u8]) -> Result<PrivateKeyDer<'static>, LoadError> {
    // pem skips labels it does not know, such as ENCRYPTED PRIVATE KEY
    // (PKCS#8 encrypted) or a legacy OpenSSL key with a Proc-Type header
    // (which also fails to decode as base64): look for both first, so the
    // operator is told why rather than "no key".
    if contains(buf, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(buf, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(err(path, LoadReason::EncryptedKey));
    }
    let mut sections = sections(buf).map_err(|e| err(path, LoadReason::Pem(e)))?;
    let mut keys = Vec::new();
    for (kind, der) in sections.drain(..) {
        let key = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
            _ => continue,
        };
        keys.push(key);
    }
    if keys.len() > 1 {
        return Err(err(path, LoadReason::SeveralKeys));
    }
    let key = keys.pop().ok_or_else(|| err(path, LoadReason::NoKey))?;
    signing_key(&key).map_err(|why| err(path, LoadReason::UnsupportedKey(why)))?;
    Ok(key)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A ring signing key for a private key, or why ring refuses it.
pub fn signing_key(key: &PrivateKeyDer<'_>) -> Result<Arc<dyn SigningKey>, String> {
    rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| match e {
        rustls::Error::General(s) => s,
        other => other.to_string(),
    })
}

/// Checks that `key` (read from `key_path`) is the private half of the
/// leaf of `chain`; returns its signing key. The error names the
/// certificate file.
pub fn check_pair(
    chain: &CertChain,
    key: &PrivateKeyDer<'_>,
    key_path: impl AsRef<Path>,
) -> Result<Arc<dyn SigningKey>, LoadError> {
    let key_path = key_path.as_ref();
    let signing = signing_key(key).map_err(|why| err(key_path, LoadReason::UnsupportedKey(why)))?;
    let ck = CertifiedKey::new(chain.chain.clone(), signing.clone());
    match ck.keys_match() {
        Ok(()) => Ok(signing),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(err(
            &chain.path,
            LoadReason::Mismatch {
                key: key_path.to_path_buf(),
            },
        )),
        Err(e) => Err(err(
            &chain.path,
            LoadReason::CannotCompare {
                key: key_path.to_path_buf(),
                why: e.to_string(),
            },
        )),
    }
}

/// Loads a chain and its key and checks they match: a [`CertifiedKey`]
/// that signs in this process. For tests and for a setup without a key
/// process; baton's workers use [`crate::signer`] instead.
pub fn load_local(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> Result<CertifiedKey, LoadError> {
    let chain = CertChain::load(cert_path)?;
    let key = load_key(&key_path)?;
    let signing = check_pair(&chain, &key, &key_path)?;
    Ok(CertifiedKey::new(chain.chain, signing))
}
