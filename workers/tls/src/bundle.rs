//! What the acceptor gives a TLS worker, and how the worker reads it.
//!
//! The acceptor spawns each worker of a TLS pool with two inherited fds:
//!
//! * [`KEY_FD_ENV`]: the worker's end of its own key channel to the key
//!   process (see [`crate::keyd`]), registered with `ADD_PEER` for the
//!   pool's key ids only;
//! * [`BUNDLE_FD_ENV`]: the pool's **bundle**, a memory file with the public
//!   certificate chains (as DER: a chrooted worker cannot read the PEM
//!   files), the minimum TLS version and the session-ticket keys. The
//!   acceptor rewrites it when it rotates the ticket keys; a worker calls
//!   [`Watch::poll`] now and then and gives its ticketer the new keys.
//!
//! Neither is in the environment itself: `/proc/PID/environ` is readable by
//! processes of the same uid, and the ticket keys are secrets.
//!
//! # Bundle layout (version 2), little-endian
//!
//! ```text
//! "BTLS" | version u8 = 2 | generation u64 | length u32 | payload | generation u64
//! payload: min_version u8 (2 = TLS 1.2, 3 = TLS 1.3)
//!          | ticket keys: u16 length, TicketKeys::encode()
//!          | certificates: u16 count, each: id u32, u16 chain length, each DER: u32 length, bytes
//!          | kTLS (version 2 only): u8 (0 unavailable, 1 available, 2 loadable),
//!            u16 length, the reason it is unavailable (UTF-8)
//! ```
//!
//! The kTLS field is the acceptor's [`crate::ktls::probe`]: a sandboxed
//! worker cannot probe, and uses the kernel path only when it says so.
//! Version 1 (no such field) still decodes, as "unavailable".
//!
//! The generation is written before and after the payload (the trailing
//! copy last), so a reader that sees them differ, or a payload that does
//! not decode, read the file while it was being rewritten, and tries again
//! later.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use rustls::pki_types::CertificateDer;

use crate::ktls::Ktls;
use crate::load::{CertChain, LoadError};
use crate::ticket::{TicketKeyError, TicketKeys};
use crate::{MinVersion, TlsOptions, WorkerTls};

/// The worker's key channel (an inherited fd number).
pub const KEY_FD_ENV: &str = "BATON_TLS_KEY_FD";
/// The pool's bundle memory file (an inherited fd number).
pub const BUNDLE_FD_ENV: &str = "BATON_TLS_BUNDLE_FD";

const MAGIC: &[u8; 4] = b"BTLS";
const VERSION: u8 = 2;
/// Bundles larger than this are refused (a chain is a few KiB).
pub const MAX_BUNDLE: usize = 4 << 20;

/// Why a bundle or the worker's TLS set-up is unusable.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the TLS bundle is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("the TLS bundle is being rewritten")]
    Torn,
    #[error("TLS bundle version {0} (this worker reads 1 and 2)")]
    Version(u8),
    #[error("the TLS bundle's ticket keys: {0}")]
    Tickets(#[from] TicketKeyError),
    #[error("the TLS bundle's certificate {id}: {source}")]
    Cert { id: u32, source: LoadError },
    #[error("{env}={value:?}: {why}")]
    Env {
        env: &'static str,
        value: String,
        why: String,
    },
    #[error("reading the TLS bundle: {0}")]
    Io(#[from] std::io::Error),
    #[error("building the TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The contents of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub generation: u64,
    pub min_version: MinVersion,
    pub ticket_keys: Vec<u8>,
    /// Key id and DER chain (leaf first) of each certificate.
    pub certs: Vec<(u32, Vec<Vec<u8>>)>,
    /// What the acceptor's kTLS probe found.
    pub ktls: Ktls,
}

impl Bundle {
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.push(match self.min_version {
            MinVersion::Tls12 => 2,
            MinVersion::Tls13 => 3,
        });
        p.extend_from_slice(&(self.ticket_keys.len() as u16).to_le_bytes());
        p.extend_from_slice(&self.ticket_keys);
        p.extend_from_slice(&(self.certs.len() as u16).to_le_bytes());
        for (id, chain) in &self.certs {
            p.extend_from_slice(&id.to_le_bytes());
            p.extend_from_slice(&(chain.len() as u16).to_le_bytes());
            for der in chain {
                p.extend_from_slice(&(der.len() as u32).to_le_bytes());
                p.extend_from_slice(der);
            }
        }
        let (tag, why) = match &self.ktls {
            Ktls::Unavailable(why) => (0u8, why.as_bytes()),
            Ktls::Available => (1, &b""[..]),
            Ktls::Loadable => (2, &b""[..]),
        };
        let why = &why[..why.len().min(1024)];
        p.push(tag);
        p.extend_from_slice(&(why.len() as u16).to_le_bytes());
        p.extend_from_slice(why);
        let mut b = Vec::with_capacity(p.len() + 29);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(&p);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Bundle, BundleError> {
        let mut r = Reader(b);
        if r.take(4)? != MAGIC {
            return Err(BundleError::Malformed("magic"));
        }
        let version = r.u8()?;
        if version != 1 && version != VERSION {
            return Err(BundleError::Version(version));
        }
        let generation = r.u64()?;
        let len = r.u32()? as usize;
        let mut p = Reader(r.take(len)?);
        if r.u64()? != generation {
            return Err(BundleError::Torn);
        }
        let min_version = match p.u8()? {
            2 => MinVersion::Tls12,
            3 => MinVersion::Tls13,
            _ => return Err(BundleError::Malformed("min version")),
        };
        let n = p.u16()? as usize;
        let ticket_keys = p.take(n)?.to_vec();
        let count = p.u16()?;
        let mut certs = Vec::new();
        for _ in 0..count {
            let id = p.u32()?;
            let n = p.u16()?;
            let mut chain = Vec::new();
            for _ in 0..n {
                let len = p.u32()? as usize;
                chain.push(p.take(len)?.to_vec());
            }
            certs.push((id, chain));
        }
        let ktls = if version == 1 {
            Ktls::Unavailable("the acceptor's TLS bundle (version 1) does not say".into())
        } else {
            let tag = p.u8()?;
            let n = p.u16()? as usize;
            let why = String::from_utf8_lossy(p.take(n)?).into_owned();
            match tag {
                0 => Ktls::Unavailable(why),
                1 => Ktls::Available,
                2 => Ktls::Loadable,
                _ => return Err(BundleError::Malformed("kTLS")),
            }
        };
        if !p.0.is_empty() {
            return Err(BundleError::Malformed("trailing bytes"));
        }
        Ok(Bundle {
            generation,
            min_version,
            ticket_keys,
            certs,
            ktls,
        })
    }

    /// Replaces the contents of memory file `fd` with this bundle.
    pub fn write_to(&self, fd: &OwnedFd) -> std::io::Result<()> {
        let b = self.encode();
        let f = std::fs::File::from(fd.try_clone()?);
        use std::os::unix::fs::FileExt;
        f.set_len(b.len() as u64)?;
        // The trailing generation last: a reader that catches the write
        // half done sees the two differ.
        let tail = b.len() - 8;
        f.write_all_at(&b[..tail], 0)?;
        f.write_all_at(&b[tail..], tail as u64)?;
        Ok(())
    }

    /// Reads a bundle from memory file `fd`.
    pub fn read_from(fd: &OwnedFd) -> Result<Bundle, BundleError> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::from(fd.try_clone()?);
        let len = f.metadata()?.len() as usize;
        if len > MAX_BUNDLE {
            return Err(BundleError::Malformed("too large"));
        }
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, 0)?;
        Bundle::decode(&b)
    }

    /// The certificate chains as [`CertChain`]s.
    pub fn chains(&self) -> Result<Vec<(u32, CertChain)>, BundleError> {
        self.certs
            .iter()
            .map(|(id, chain)| {
                let ders: Vec<CertificateDer<'static>> = chain
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect();
                CertChain::from_der(ders, Path::new(&format!("certificate {id}")))
                    .map(|c| (*id, c))
                    .map_err(|source| BundleError::Cert { id: *id, source })
            })
            .collect()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BundleError> {
        if self.0.len() < n {
            return Err(BundleError::Malformed("short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BundleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BundleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, BundleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, BundleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Takes the fd named by `env` (and removes the variable).
fn take_fd(env: &'static str) -> Result<Option<OwnedFd>, BundleError> {
    let Some(v) = std::env::var_os(env) else {
        return Ok(None);
    };
    std::env::remove_var(env);
    let value = v.to_string_lossy().into_owned();
    let bad = |why: String| BundleError::Env {
        env,
        value: value.clone(),
        why,
    };
    let fd: RawFd = value
        .parse()
        .map_err(|_| bad("not an fd number".to_string()))?;
    if fd < 3 {
        return Err(bad("not an inherited fd".to_string()));
    }
    // SAFETY: fcntl(F_GETFD) on any number is harmless; it only tells
    // whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad("not open".to_string()));
    }
    // SAFETY: the acceptor passed this descriptor for this purpose (the
    // variable names it), it is open, and taking the variable out of the
    // environment means it is taken once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(Some(fd))
}

/// A worker's TLS, as the acceptor set it up.
pub struct FromEnv {
    pub tls: crate::BuiltTls,
    /// The acceptor's kTLS probe: sessions go to the kernel only if it
    /// is available (the config then allows secret extraction).
    pub ktls: Ktls,
    pub watch: Watch,
}

/// How often a worker looks at its pool's bundle for rotated ticket keys
/// ([`Watch::poll_due`]): rotations are hours apart, a look is one read of
/// a memory file.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Follows the pool's bundle for ticket-key rotations.
pub struct Watch {
    fd: OwnedFd,
    generation: u64,
    /// When [`Watch::poll_due`] looks next.
    next: std::time::Instant,
}

impl Watch {
    /// When the next look is due, for the worker's poll timeout.
    pub fn next_check(&self) -> std::time::Instant {
        self.next
    }

    /// [`Watch::poll`] once [`CHECK_EVERY`] has passed since the last look
    /// (`None` before that).
    pub fn poll_due(
        &mut self,
        now: std::time::Instant,
        tls: &crate::BuiltTls,
    ) -> Option<Result<bool, BundleError>> {
        if now < self.next {
            return None;
        }
        self.next = now + CHECK_EVERY;
        Some(self.poll(tls))
    }

    /// Gives `tls`'s ticketer the new keys if the bundle changed; returns
    /// whether it did. A bundle caught mid-rewrite is tried next time.
    pub fn poll(&mut self, tls: &crate::BuiltTls) -> Result<bool, BundleError> {
        let b = match Bundle::read_from(&self.fd) {
            Err(BundleError::Torn | BundleError::Malformed(_)) => return Ok(false),
            other => other?,
        };
        if b.generation == self.generation {
            return Ok(false);
        }
        self.generation = b.generation;
        if let Some(t) = &tls.ticketer {
            t.set_keys(&TicketKeys::decode(&b.ticket_keys)?);
        }
        Ok(true)
    }
}

/// The TLS set-up the acceptor gave this worker ([`KEY_FD_ENV`],
/// [`BUNDLE_FD_ENV`]), or None for a pool without TLS. Call it before the
/// sandbox (it reads inherited fds; both stay open for the worker's life,
/// and the acceptor lists them among the fds the sandbox keeps).
pub fn from_env() -> Result<Option<FromEnv>, BundleError> {
    from_env_for(false)
}

/// [`from_env`] for a worker that hands sessions to the kernel
/// (`handoff`: baton-static) when the bundle says kTLS is available: its
/// config then allows secret extraction ([`crate::TlsOptions::ktls`]).
pub fn from_env_for(handoff: bool) -> Result<Option<FromEnv>, BundleError> {
    let (Some(key), Some(bundle_fd)) = (take_fd(KEY_FD_ENV)?, take_fd(BUNDLE_FD_ENV)?) else {
        return Ok(None);
    };
    let b = Bundle::read_from(&bundle_fd)?;
    let tls = WorkerTls {
        certs: b.chains()?,
        key_channel: key,
        ticket_keys: Some(TicketKeys::decode(&b.ticket_keys)?),
        ticket_lifetime: 12 * 3600,
        options: TlsOptions {
            min_version: b.min_version,
            ktls: handoff && b.ktls.is_available(),
            ..TlsOptions::default()
        },
    }
    .build()?;
    Ok(Some(FromEnv {
        tls,
        ktls: b.ktls,
        watch: Watch {
            fd: bundle_fd,
            generation: b.generation,
            next: std::time::Instant::now() + CHECK_EVERY,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(generation: u64) -> Bundle {
        Bundle {
            generation,
            min_version: MinVersion::Tls13,
            ticket_keys: TicketKeys::generate().unwrap().encode(),
            certs: vec![(7, vec![vec![1, 2, 3], vec![4; 300]]), (9, vec![vec![5]])],
            ktls: Ktls::Unavailable("no tls ULP".into()),
        }
    }

    #[test]
    fn round_trips_through_a_memory_file() {
        let fd = nix::sys::memfd::memfd_create(
            c"bundle-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let b = sample(3);
        b.write_to(&fd).unwrap();
        assert_eq!(Bundle::read_from(&fd).unwrap(), b);
        let c = Bundle {
            certs: vec![],
            ktls: Ktls::Loadable,
            ..sample(4)
        };
        c.write_to(&fd).unwrap();
        assert_eq!(Bundle::read_from(&fd).unwrap(), c, "shorter rewrite");
    }

    /// A version-1 bundle (an older acceptor's) still decodes: no kTLS.
    #[test]
    fn version_1_still_decodes() {
        let b = Bundle {
            ktls: Ktls::Available,
            ..sample(6)
        };
        let v2 = b.encode();
        // Version 1 is version 2 without the kTLS field at the payload's
        // end (3 bytes for Available).
        let len = u32::from_le_bytes(v2[13..17].try_into().unwrap()) as usize;
        let payload = &v2[17..17 + len - 3];
        let mut v1 = b"BTLS\x01".to_vec();
        v1.extend_from_slice(&6u64.to_le_bytes());
        v1.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v1.extend_from_slice(payload);
        v1.extend_from_slice(&6u64.to_le_bytes());
        let d = Bundle::decode(&v1).unwrap();
        assert!(matches!(&d.ktls, Ktls::Unavailable(why) if why.contains("version 1")));
        assert_eq!(d.certs, b.certs);
        assert_eq!(Bundle::decode(&v2).unwrap(), b);
        let mut bad = v2.clone();
        bad[17 + len - 3] = 9;
        assert!(matches!(
            Bundle::decode(&bad),
            Err(BundleError::Malformed("kTLS"))
        ));
    }

    #[test]
    fn torn_and_malformed_bundles_are_refused() {
        let mut e = sample(5).encode();
        let n = e.len();
        e[n - 1] ^= 1;
        assert!(matches!(Bundle::decode(&e), Err(BundleError::Torn)));
        let good = sample(5).encode();
        for cut in 0..good.len() {
            assert!(Bundle::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = good.clone();
        v[4] = 9;
        assert!(matches!(Bundle::decode(&v), Err(BundleError::Version(9))));
    }
}
