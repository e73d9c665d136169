//! Proof that a worker holding only the remote signer has no private key
//! bytes in its memory: a child process (this test binary, re-executed)
//! does a full TLS handshake signed by the key process, then waits while
//! the parent reads every readable mapping of its memory through
//! `/proc/PID/mem` and searches for the key's PKCS#8 DER and its raw
//! private scalar. The same scan of a child that loaded the key itself
//! (the positive control) must find them, or the scan proves nothing.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use baton_tls::{load, SniResolver, TlsOptions};
use common::*;

const MODE: &str = "BATON_TLS_MEMORY_CHILD";

/// The child's body; a no-op in a normal test run.
#[test]
fn memory_child() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let config = if mode == "remote" {
        let fd: i32 = var("BATON_TLS_FD").parse().expect("fd");
        // SAFETY: the parent passed this fd, open and for us alone.
        let peer = unsafe { OwnedFd::from_raw_fd(fd) };
        let chain = baton_tls::CertChain::load(var("BATON_TLS_CERT")).expect("chain");
        baton_tls::WorkerTls {
            certs: vec![(1, chain)],
            key_channel: peer,
            ticket_keys: None,
            ticket_lifetime: 60,
            options: TlsOptions::default(),
        }
        .build()
        .expect("config")
        .config
    } else {
        let key = load::load_key(var("BATON_TLS_KEY")).expect("key");
        let ck = load::load_local(var("BATON_TLS_CERT"), var("BATON_TLS_KEY")).expect("pair");
        // Keep the DER alive, as a careless worker would.
        std::mem::forget(key);
        let mut r = SniResolver::new();
        r.add(&["localhost".into()], Arc::new(ck));
        baton_tls::server_config(Arc::new(r), None, &TlsOptions::default()).expect("config")
    };
    let ca_pem = std::fs::read(var("BATON_TLS_CA")).expect("ca");
    let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(&ca_pem).expect("ca der");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).expect("root");
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(baton_tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = std::thread::spawn(move || fetch(client, addr, "localhost").expect("fetch"));
    serve_one(config, &listener).expect("handshake");
    assert_eq!(h.join().expect("client").reply, b"pong\n");
    println!("READY");
    std::io::stdout().flush().expect("flush");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Searches every readable mapping of `pid` for each needle; returns which
/// were found.
fn scan(pid: u32, needles: &[&[u8]]) -> Vec<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut found = vec![false; needles.len()];
    let mut scanned = 0usize;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        scanned += buf.len();
        for (i, n) in needles.iter().enumerate() {
            found[i] |= find(&buf, n);
        }
    }
    assert!(scanned > 1 << 20, "scanned only {scanned} bytes");
    found
}

fn run_child(mode: &str, l: &Leaf, ca: &Ca, peer: Option<OwnedFd>) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args([
        "memory_child",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(MODE, mode)
    .env("BATON_TLS_CERT", &l.cert_path)
    .env("BATON_TLS_KEY", &l.key_path)
    .env("BATON_TLS_CA", &ca.pem_path)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    if let Some(p) = &peer {
        let raw = p.as_raw_fd();
        cmd.env("BATON_TLS_FD", raw.to_string());
        // SAFETY: only fcntl, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("spawn child");
    drop(peer);
    child
}

#[test]
fn worker_memory_has_no_key() {
    let dir = tempdir("memory");
    let ca = ca(&dir);
    let l = leaf(&dir, &ca, "site", &["localhost"], Alg::P256).expect("leaf");
    // The P-256 scalar: after `02 01 01 04 20` in the PKCS#8 DER.
    let at = l
        .key_der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("scalar in DER")
        + 5;
    let scalar = l.key_der[at..at + 32].to_vec();
    let needles: [&[u8]; 2] = [&l.key_der, &scalar];

    let mut keyd = Keyd::start(&[(1, &l)], 1);
    for (mode, peer) in [("remote", Some(keyd.take_peer())), ("local", None)] {
        let mut child = run_child(mode, &l, &ca, peer);
        let mut out = stdout_reader(&mut child);
        let mut line = read_line(&mut out);
        // libtest prints "test memory_child ... " before the child's line.
        while !line.is_empty() && !line.trim_end().ends_with("READY") {
            line = read_line(&mut out);
        }
        assert!(
            line.trim_end().ends_with("READY"),
            "{mode} child did not get ready"
        );
        let found = scan(child.id(), &needles);
        drop(child.stdin.take());
        let _ = child.wait();
        match mode {
            "remote" => assert_eq!(
                found,
                [false, false],
                "the worker with a remote key holds key bytes (DER, scalar)"
            ),
            _ => assert!(
                found[0],
                "positive control: the scan must find a held key's DER"
            ),
        }
    }
}
