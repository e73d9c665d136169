//! Just enough DER to read what baton needs from a certificate: the
//! subject's public key (its algorithm, to know which signature schemes a
//! remote key offers) and the DNS names of the subjectAltName extension (to
//! choose a certificate by SNI).
//!
//! rustls and webpki parse certificates fully but expose neither the SAN
//! list nor the key algorithm; a general X.509 crate would bring a parser
//! stack for two fields. This walker reads definite-length DER only, checks
//! every length against what is left, and never panics on any input (the
//! codec's property test feeds it garbage).

use rustls::pki_types::alg_id;

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed certificate: {0}")]
pub struct DerError(pub &'static str);

/// A DER element: its tag, contents, and whatever follows it.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    /// The whole element, header included.
    whole: &'a [u8],
    rest: &'a [u8],
}

fn tlv(input: &[u8]) -> Result<Tlv<'_>, DerError> {
    let (&tag, after_tag) = input.split_first().ok_or(DerError("truncated"))?;
    if tag & 0x1f == 0x1f {
        return Err(DerError("multi-byte tags are not used in certificates"));
    }
    let (&first, mut after_len) = after_tag.split_first().ok_or(DerError("truncated"))?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(DerError("unsupported length encoding"));
        }
        if after_len.len() < n {
            return Err(DerError("truncated length"));
        }
        let mut len = 0usize;
        for &b in &after_len[..n] {
            len = (len << 8) | usize::from(b);
        }
        after_len = &after_len[n..];
        len
    };
    if after_len.len() < len {
        return Err(DerError("element longer than its container"));
    }
    let header = input.len() - after_len.len();
    Ok(Tlv {
        tag,
        body: &after_len[..len],
        whole: &input[..header + len],
        rest: &after_len[len..],
    })
}

fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<Tlv<'a>, DerError> {
    let t = tlv(input)?;
    if t.tag != tag {
        return Err(DerError(what));
    }
    Ok(t)
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[0] EXPLICIT` version.
const CTX0: u8 = 0xa0;
/// `[3] EXPLICIT` extensions.
const CTX3: u8 = 0xa3;
/// `dNSName [2] IMPLICIT IA5String` in a GeneralName.
const DNS_NAME: u8 = 0x82;
/// 2.5.29.17, subjectAltName.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// What [`parse_cert`] reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The dNSName entries of subjectAltName, lower-cased, as written
    /// (wildcards included).
    pub dns_names: Vec<String>,
}

/// Reads the public key and the SAN DNS names of a DER certificate.
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, DerError> {
    let cert = expect(der, SEQUENCE, "not a SEQUENCE")?;
    let tbs = expect(cert.body, SEQUENCE, "no tbsCertificate")?;
    let mut p = tbs.body;
    // version [0] is optional (v1 certificates omit it).
    let first = tlv(p)?;
    if first.tag == CTX0 {
        p = first.rest;
    }
    // serialNumber, signature, issuer, validity, subject.
    for what in ["serial", "signature", "issuer", "validity", "subject"] {
        let t = tlv(p).map_err(|_| DerError(what))?;
        p = t.rest;
    }
    let spki = expect(p, SEQUENCE, "no subjectPublicKeyInfo")?;
    p = spki.rest;
    let mut dns_names = Vec::new();
    while !p.is_empty() {
        let t = tlv(p)?;
        p = t.rest;
        if t.tag != CTX3 {
            continue; // issuerUniqueID [1], subjectUniqueID [2]
        }
        let exts = expect(t.body, SEQUENCE, "extensions not a SEQUENCE")?;
        let mut e = exts.body;
        while !e.is_empty() {
            let ext = expect(e, SEQUENCE, "extension not a SEQUENCE")?;
            e = ext.rest;
            let oid = expect(ext.body, OID, "extension without OID")?;
            if oid.body != SAN_OID {
                continue;
            }
            let mut v = tlv(oid.rest)?;
            if v.tag == BOOLEAN {
                v = tlv(v.rest)?;
            }
            if v.tag != OCTET_STRING {
                return Err(DerError("extension value not an OCTET STRING"));
            }
            let names = expect(v.body, SEQUENCE, "subjectAltName not a SEQUENCE")?;
            let mut n = names.body;
            while !n.is_empty() {
                let name = tlv(n)?;
                n = name.rest;
                if name.tag == DNS_NAME {
                    let s = std::str::from_utf8(name.body)
                        .map_err(|_| DerError("dNSName not ASCII"))?;
                    if !s.is_ascii() {
                        return Err(DerError("dNSName not ASCII"));
                    }
                    dns_names.push(s.to_ascii_lowercase());
                }
            }
        }
    }
    Ok(CertInfo {
        spki: spki.whole.to_vec(),
        dns_names,
    })
}

/// The kinds of public key baton can sign with (what ring signs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyType {
    /// The key's algorithm from a SubjectPublicKeyInfo DER; `None` for one
    /// that is not supported (P-521, Ed448, DSA, ...).
    pub fn from_spki(spki: &[u8]) -> Option<KeyType> {
        let outer = expect(spki, SEQUENCE, "").ok()?;
        let alg = expect(outer.body, SEQUENCE, "").ok()?;
        let body = alg.body;
        if body == &*alg_id::RSA_ENCRYPTION {
            Some(KeyType::Rsa)
        } else if body == &*alg_id::ECDSA_P256 {
            Some(KeyType::EcdsaP256)
        } else if body == &*alg_id::ECDSA_P384 {
            Some(KeyType::EcdsaP384)
        } else if body == &*alg_id::ED25519 {
            Some(KeyType::Ed25519)
        } else {
            None
        }
    }

    /// The TLS signature schemes a key of this type signs, most preferred
    /// first: what ring's signing keys in rustls offer for the same type.
    pub fn schemes(self) -> &'static [rustls::SignatureScheme] {
        use rustls::SignatureScheme as S;
        match self {
            KeyType::Rsa => &[
                S::RSA_PSS_SHA512,
                S::RSA_PSS_SHA384,
                S::RSA_PSS_SHA256,
                S::RSA_PKCS1_SHA512,
                S::RSA_PKCS1_SHA384,
                S::RSA_PKCS1_SHA256,
            ],
            KeyType::EcdsaP256 => &[S::ECDSA_NISTP256_SHA256],
            KeyType::EcdsaP384 => &[S::ECDSA_NISTP384_SHA384],
            KeyType::Ed25519 => &[S::ED25519],
        }
    }

    /// The rustls signature algorithm of this key type.
    pub fn algorithm(self) -> rustls::SignatureAlgorithm {
        match self {
            KeyType::Rsa => rustls::SignatureAlgorithm::RSA,
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => rustls::SignatureAlgorithm::ECDSA,
            KeyType::Ed25519 => rustls::SignatureAlgorithm::ED25519,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::EcdsaP256 => "ECDSA P-256",
            KeyType::EcdsaP384 => "ECDSA P-384",
            KeyType::Ed25519 => "Ed25519",
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_and_bad_lengths_are_errors() {
        assert!(parse_cert(&[]).is_err());
        assert!(parse_cert(&[0x30]).is_err());
        assert!(parse_cert(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
        assert!(parse_cert(&[0x30, 0x05, 0x30]).is_err());
        assert!(KeyType::from_spki(&[0x30, 0x00]).is_none());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_cert(&bytes);
            let _ = KeyType::from_spki(&bytes);
        }
    }
}
