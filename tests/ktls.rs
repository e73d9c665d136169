//! kTLS selection end to end: the acceptor probes the kernel once and
//! tells the TLS workers in the bundle; both log which record path is
//! used, and they agree. On a kernel without kTLS (this machine's: no `tls`
//! ULP) that is userspace rustls, and a file larger than the socket
//! buffers still arrives whole over TLS (read, encrypt, write). The kernel
//! path itself is tested against a fake kernel in workers/tls/tests/ktls.rs.
//!
//! Certificates are made with the `openssl` command; without it the test
//! says SKIPPED.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pki::{have_openssl, pki};
use common::Baton;

#[test]
fn record_path_is_logged_and_userspace_without_ktls() {
    if !have_openssl("record_path_is_logged_and_userspace_without_ktls") {
        return;
    }
    let dir = pki(&["localhost"]);
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("public").join("big.bin"), &big).expect("write");
    let args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--workers".into(),
        "1".into(),
        "--tls-cert".into(),
        dir.join("localhost.crt").display().to_string(),
        "--tls-key".into(),
        dir.join("localhost.key").display().to_string(),
        "--root".into(),
        dir.join("public").display().to_string(),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = Baton::start(&a, 1);
    let acceptor = b
        .find(Duration::from_secs(10), |l| {
            l.message().starts_with("TLS record path: ")
        })
        .expect("the acceptor's record-path line");
    let worker = b
        .find(Duration::from_secs(10), |l| {
            l.message()
                .starts_with("TLS: handshakes signed by baton's key process; TLS record path: ")
        })
        .expect("the worker's record-path line");
    let path = |m: &str| {
        m.split("TLS record path: ")
            .nth(1)
            .unwrap_or("")
            .to_string()
    };
    let (a_path, w_path) = (path(acceptor.message()), path(worker.message()));
    println!("acceptor: {a_path}\nworker:   {w_path}");
    assert_eq!(a_path, w_path, "the acceptor and the worker agree");
    let here = baton_tls::ktls::probe();
    if here.is_available() {
        assert!(a_path.starts_with("kTLS"), "{a_path}");
    } else {
        assert!(
            a_path.starts_with("userspace rustls (kernel has no kTLS: "),
            "{a_path}"
        );
    }

    let port = b.addr().port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dir.join("ca.crt"))
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/big.bin"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == big,
        "the whole file, {} bytes",
        out.stdout.len()
    );
    b.stop();
}
