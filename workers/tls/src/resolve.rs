//! Choosing a certificate by SNI.
//!
//! [`SniResolver`] holds several certificates (each a rustls
//! [`CertifiedKey`], whose key is usually a [`RemoteKey`](crate::signer::RemoteKey))
//! and picks one per handshake from the client's server name:
//!
//! 1. an exact DNS name from a certificate's subjectAltName;
//! 2. else a `*.` wildcard name matching exactly one leftmost label
//!    (`*.example.com` matches `a.example.com`, not `example.com` nor
//!    `a.b.example.com`, as RFC 6125 says);
//! 3. else the default certificate (the first added, unless
//!    [`SniResolver::set_default`] says otherwise), also used when the
//!    client sends no SNI. With no default, the handshake is refused.
//!
//! When two certificates claim a name, the first added keeps it (a log can
//! report [`SniResolver::add`]'s list of shadowed names). Names are compared
//! in ASCII lower case.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Certificates chosen by server name.
#[derive(Debug, Default)]
pub struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, usize>,
    default: Option<usize>,
}

impl SniResolver {
    pub fn new() -> SniResolver {
        SniResolver::default()
    }

    /// Adds a certificate served for `names` (normally
    /// `CertChain::leaf.dns_names`). Returns the names already claimed by
    /// an earlier certificate, which stay with it. The first certificate
    /// added becomes the default.
    pub fn add(&mut self, names: &[String], key: Arc<CertifiedKey>) -> Vec<String> {
        let index = self.certs.len();
        self.certs.push(key);
        if self.default.is_none() {
            self.default = Some(index);
        }
        let mut shadowed = Vec::new();
        for name in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let (map, key) = match name.strip_prefix("*.") {
                Some(suffix) => (&mut self.wildcard, suffix.to_string()),
                None => (&mut self.exact, name.clone()),
            };
            if key.is_empty() {
                continue;
            }
            match map.entry(key) {
                Entry::Vacant(e) => {
                    e.insert(index);
                }
                Entry::Occupied(_) => shadowed.push(name),
            }
        }
        shadowed
    }

    /// Makes the `index`-th certificate added (0-based) the default;
    /// `None` refuses clients whose name matches nothing.
    pub fn set_default(&mut self, index: Option<usize>) {
        self.default = index.filter(|&i| i < self.certs.len());
    }

    /// The certificate for a server name (`None`: no SNI).
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let index = server_name
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .or(self.default)?;
        self.certs.get(index).cloned()
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(client_hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    fn ck(tag: u8) -> Arc<CertifiedKey> {
        // Only the pointer identity matters here; the key is never used.
        let key = rustls::crypto::ring::sign::any_ecdsa_type(
            &rcgen::KeyPair::generate()
                .expect("keygen")
                .serialize_der()
                .try_into()
                .expect("pkcs8"),
        )
        .expect("ring key");
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![tag])],
            key,
        ))
    }

    fn tag(r: &SniResolver, name: Option<&str>) -> Option<u8> {
        r.lookup(name).map(|c| c.cert[0][0])
    }

    #[test]
    fn exact_wildcard_default() {
        let mut r = SniResolver::new();
        assert!(r.add(&["a.example".into()], ck(1)).is_empty());
        assert!(r
            .add(&["*.example.com".into(), "example.com".into()], ck(2))
            .is_empty());
        assert_eq!(
            r.add(&["A.example".into(), "b.example".into()], ck(3)),
            vec!["a.example"]
        );
        assert_eq!(tag(&r, Some("a.example")), Some(1));
        assert_eq!(tag(&r, Some("B.Example.")), Some(3));
        assert_eq!(tag(&r, Some("www.example.com")), Some(2));
        assert_eq!(tag(&r, Some("example.com")), Some(2));
        assert_eq!(tag(&r, Some("a.b.example.com")), Some(1), "one label only");
        assert_eq!(tag(&r, None), Some(1));
        r.set_default(Some(1));
        assert_eq!(tag(&r, Some("other.test")), Some(2));
        r.set_default(None);
        assert_eq!(tag(&r, Some("other.test")), None);
        assert_eq!(tag(&r, Some("a.example")), Some(1));
    }
}
