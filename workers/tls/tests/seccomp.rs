//! The key process's filter, from inside: a child (this test binary,
//! re-executed, so the filter never touches the test harness) installs it,
//! then must fail to open a file or make a socket, and must still sign
//! with ECDSA and RSA keys.

mod common;

use std::process::Command;

use baton_tls::{keyd::KeyStore, load};
use common::*;

const MODE: &str = "BATON_TLS_FILTER_CHILD";

#[test]
fn filter_child() {
    let Ok(keys) = std::env::var(MODE) else {
        return;
    };
    // Load before confinement, as the key process does.
    let mut loaded = Vec::new();
    for (i, path) in keys.split(',').enumerate() {
        let der = load::load_key(path).expect("key");
        loaded.push((i as u32, load::signing_key(&der).expect("ring")));
    }
    let store = KeyStore::from_keys(loaded);
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointer.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        0
    );
    baton_tls::keyd_seccomp::install().expect("install");
    let open = std::fs::File::open("/etc/hostname").expect_err("open must be refused");
    assert_eq!(open.raw_os_error(), Some(libc::EPERM), "{open}");
    let sock = std::net::TcpListener::bind("127.0.0.1:0").expect_err("socket must be refused");
    assert_eq!(sock.raw_os_error(), Some(libc::EPERM), "{sock}");
    use rustls::SignatureScheme as S;
    let ecdsa = store
        .sign(0, S::ECDSA_NISTP256_SHA256, b"message")
        .expect("ecdsa");
    assert!(!ecdsa.is_empty());
    if store.len() > 1 {
        for scheme in [S::RSA_PSS_SHA256, S::RSA_PKCS1_SHA256] {
            assert_eq!(store.sign(1, scheme, b"message").expect("rsa").len(), 256);
        }
    }
    println!("FILTER-OK");
}

#[test]
#[cfg(target_arch = "x86_64")]
fn key_process_filter_refuses_files_and_still_signs() {
    let dir = tempdir("filter");
    let ca = ca(&dir);
    let ec = leaf(&dir, &ca, "ec", &["localhost"], Alg::P256).expect("leaf");
    let mut keys = vec![ec.key_path.display().to_string()];
    match leaf(&dir, &ca, "rsa", &["localhost"], Alg::Rsa2048) {
        Some(rsa) => keys.push(rsa.key_path.display().to_string()),
        None => println!("RSA part skipped: the openssl CLI is not installed"),
    }
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "filter_child",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(MODE, keys.join(","))
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("FILTER-OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
