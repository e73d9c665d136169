//! Every way a certificate or key file can be wrong, each error naming the
//! file and the reason.

mod common;

use std::path::Path;

use baton_tls::load::{self, CertChain, LoadReason};
use baton_tls::{KeyType, LoadError};
use common::*;

fn names(e: &LoadError, path: &Path, words: &str) {
    let s = e.to_string();
    assert!(
        s.contains(&*path.to_string_lossy()),
        "{s:?} does not name {}",
        path.display()
    );
    assert!(s.contains(words), "{s:?} does not say {words:?}");
}

#[test]
fn missing_empty_and_wrong_files() {
    let dir = tempdir("load");
    let ca = ca(&dir);
    let l = leaf(
        &dir,
        &ca,
        "site",
        &["localhost", "*.example.test"],
        Alg::P256,
    )
    .expect("leaf");

    let missing = dir.join("nope.crt");
    let e = CertChain::load(&missing).expect_err("missing");
    assert!(matches!(e.reason, LoadReason::Missing));
    names(&e, &missing, "no such file");
    let e = load::load_key(&missing).expect_err("missing");
    names(&e, &missing, "no such file");

    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let e = CertChain::load(&empty).expect_err("empty");
    assert!(matches!(e.reason, LoadReason::NoCertificate));
    names(&e, &empty, "no certificate");

    // The key file given as the certificate, and the other way round.
    let e = CertChain::load(&l.key_path).expect_err("key as cert");
    names(&e, &l.key_path, "no certificate");
    let e = load::load_key(&l.cert_path).expect_err("cert as key");
    assert!(matches!(e.reason, LoadReason::NoKey));
    names(&e, &l.cert_path, "no private key");

    // Two keys in one file.
    let two = dir.join("two.key");
    let k = std::fs::read_to_string(&l.key_path).expect("read");
    std::fs::write(&two, format!("{k}{k}")).expect("write");
    names(
        &load::load_key(&two).expect_err("two"),
        &two,
        "more than one private key",
    );

    // Broken base64 inside a PEM section.
    let broken = dir.join("broken.crt");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    names(
        &CertChain::load(&broken).expect_err("broken"),
        &broken,
        "PEM",
    );

    // A PEM certificate whose DER is garbage.
    let garbage = dir.join("garbage.crt");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    names(
        &CertChain::load(&garbage).expect_err("garbage"),
        &garbage,
        "malformed",
    );

    // Too big to be a key file.
    let big = dir.join("big.pem");
    std::fs::write(&big, vec![b'a'; (load::MAX_PEM_FILE + 1) as usize]).expect("write");
    names(&load::load_key(&big).expect_err("big"), &big, "larger than");

    // A directory.
    let e = load::load_key(&dir).expect_err("dir");
    names(&e, &dir, "cannot read");
}

#[test]
fn good_chain_and_pair() {
    let dir = tempdir("good");
    let ca = ca(&dir);
    let l = leaf(
        &dir,
        &ca,
        "site",
        &["localhost", "*.Example.test"],
        Alg::P256,
    )
    .expect("leaf");
    // A chain file with the CA after the leaf.
    let chain_path = dir.join("chain.crt");
    let leaf_pem = std::fs::read_to_string(&l.cert_path).expect("read");
    let ca_pem = std::fs::read_to_string(&ca.pem_path).expect("read");
    std::fs::write(&chain_path, format!("{leaf_pem}{ca_pem}")).expect("write");
    let chain = CertChain::load(&chain_path).expect("chain");
    assert_eq!(chain.chain.len(), 2);
    assert_eq!(chain.chain[0], l.cert_der);
    assert_eq!(chain.key_type, KeyType::EcdsaP256);
    assert_eq!(chain.leaf.dns_names, vec!["localhost", "*.example.test"]);
    let key = load::load_key(&l.key_path).expect("key");
    load::check_pair(&chain, &key, &l.key_path).expect("match");
    load::load_local(&chain_path, &l.key_path).expect("local");
}

#[test]
fn mismatched_pair_names_both_files() {
    let dir = tempdir("mismatch");
    let ca = ca(&dir);
    let a = leaf(&dir, &ca, "a", &["a.test"], Alg::P256).expect("leaf");
    let b = leaf(&dir, &ca, "b", &["b.test"], Alg::P256).expect("leaf");
    let e = load::load_local(&a.cert_path, &b.key_path).expect_err("mismatch");
    assert!(matches!(e.reason, LoadReason::Mismatch { .. }));
    names(&e, &a.cert_path, "does not match");
    names(&e, &b.key_path, "their public keys differ");
    // Other key types too, when openssl can make them.
    if let Some(rsa) = leaf(&dir, &ca, "rsa", &["rsa.test"], Alg::Rsa2048) {
        let e = load::load_local(&rsa.cert_path, &a.key_path).expect_err("mismatch");
        names(&e, &rsa.cert_path, "does not match");
        assert_eq!(
            CertChain::load(&rsa.cert_path).expect("rsa").key_type,
            KeyType::Rsa
        );
        load::load_local(&rsa.cert_path, &rsa.key_path).expect("rsa pair");
    }
}

#[test]
fn encrypted_and_unsupported_keys() {
    if !have_openssl() {
        println!("skipping: the openssl CLI is not installed (needed to make encrypted, P-521 and Ed448 keys)");
        return;
    }
    let dir = tempdir("enc");
    let ca = ca(&dir);
    let l = leaf(&dir, &ca, "site", &["localhost"], Alg::P256).expect("leaf");
    let p = |name: &str| dir.join(name);
    let s = |path: &Path| path.to_str().expect("utf8").to_string();

    // PKCS#8 encrypted.
    let enc = p("enc.key");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-in",
        &s(&l.key_path),
        "-out",
        &s(&enc),
        "-v2",
        "aes-256-cbc",
        "-passout",
        "pass:secret",
    ]);
    let e = load::load_key(&enc).expect_err("encrypted");
    assert!(matches!(e.reason, LoadReason::EncryptedKey));
    names(
        &e,
        &enc,
        "encrypted keys are not supported: decrypt with openssl pkey",
    );

    // Legacy OpenSSL encryption (Proc-Type header).
    let legacy = p("legacy.key");
    openssl(&[
        "ec",
        "-in",
        &s(&l.key_path),
        "-out",
        &s(&legacy),
        "-aes256",
        "-passout",
        "pass:secret",
    ]);
    let e = load::load_key(&legacy).expect_err("legacy");
    names(&e, &legacy, "encrypted keys are not supported");

    // SEC1 ("EC PRIVATE KEY") unencrypted is fine.
    let sec1 = p("sec1.key");
    openssl(&["ec", "-in", &s(&l.key_path), "-out", &s(&sec1)]);
    load::load_local(&l.cert_path, &sec1).expect("sec1 key");

    // Ed448: a key ring cannot use.
    let ed448 = p("ed448.key");
    openssl(&["genpkey", "-algorithm", "ED448", "-out", &s(&ed448)]);
    let e = load::load_key(&ed448).expect_err("ed448");
    assert!(matches!(e.reason, LoadReason::UnsupportedKey(_)), "{e}");
    names(&e, &ed448, "unsupported key type");

    // A P-521 certificate: its public key type is refused on the cert.
    let k521 = p("p521.key");
    let c521 = p("p521.crt");
    openssl(&[
        "ecparam",
        "-name",
        "secp521r1",
        "-genkey",
        "-noout",
        "-out",
        &s(&k521),
    ]);
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        &s(&k521),
        "-out",
        &s(&c521),
        "-subj",
        "/CN=p521.test",
        "-days",
        "1",
    ]);
    let e = CertChain::load(&c521).expect_err("p521 cert");
    assert!(matches!(e.reason, LoadReason::UnsupportedCertKey), "{e}");
    names(&e, &c521, "unsupported type");
    let e = load::load_key(&k521).expect_err("p521 key");
    names(&e, &k521, "unsupported key type");
}
