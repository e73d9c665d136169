//! A pool with TLS takes only workers that say, in HELLO (flag bit 0,
//! `FLAG_TLS`), that they terminate TLS with the bundle they were given:
//!
//! * spawned workers that do not (`-- baton-echo`) are refused with an
//!   ERROR naming the fix, killed and not restarted; with no worker left
//!   baton stops, and a TLS client never gets a plaintext answer;
//! * baton-static, which takes the bundle, says so and serves over TLS;
//! * a registered worker (`--worker-socket`) without the flag is refused
//!   too, and told so (its channel closed before WELCOME), while the
//!   pool's TLS workers keep serving.
//!
//! Certificates are made at test time with the `openssl` command (installed
//! by `scripts/install-deps`); without it each test says SKIPPED.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::{curl, have_openssl, pki};
use common::{bin, Baton, LogLine};

fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join("localhost.crt").display().to_string(),
        "--tls-key".into(),
        dir.join("localhost.key").display().to_string(),
    ]
}

/// The start of a TLS ClientHello record (what a TLS client sends first),
/// then an HTTP request line: an echo worker would send either back, a
/// plaintext HTTP worker would answer the second.
const TLS_CLIENT_BYTES: &[u8] =
    b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// What a TLS client gets back on the TLS port within `wait`: the bytes it
/// read (must be none) and how the connection ended.
fn tls_client_reads(addr: SocketAddr, wait: Duration) -> (Vec<u8>, String) {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return (Vec::new(), format!("connect: {e}")),
    };
    s.set_read_timeout(Some(wait)).expect("timeout");
    // Written before anything could answer; a reset here is an answer too.
    if let Err(e) = s.write_all(TLS_CLIENT_BYTES) {
        return (Vec::new(), format!("write: {e}"));
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, "closed".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (got, "held".into())
            }
            Err(e) => return (got, format!("read: {e}")),
        }
    }
}

fn is_refusal(l: &LogLine) -> bool {
    l.message().contains("did not say it terminates TLS")
}

const REFUSAL_TAIL: &str = "it would answer TLS clients in plaintext; refused";
const REFUSAL_FIX: &str =
    "Use a worker that terminates TLS (baton-static, baton-proxy) or remove --tls-cert";

#[test]
fn a_spawned_worker_that_does_not_terminate_tls_is_refused_and_not_restarted() {
    let test = "a_spawned_worker_that_does_not_terminate_tls_is_refused_and_not_restarted";
    if !have_openssl(test) {
        return;
    }
    let dir = pki(&["localhost"]);
    let echo = bin("baton-echo").display().to_string();
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--workers".into(),
        "2".into(),
    ];
    args.extend(tls_args(&dir));
    args.extend(["--".into(), echo]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = Baton::start(&a, 0);
    let addr = b.addr();
    // A TLS client on the TLS port, while the workers start.
    let client = std::thread::spawn(move || tls_client_reads(addr, Duration::from_secs(3)));

    // Both workers are refused, each with the reason and the fix (the
    // first may come before the "listening" line the harness waited for).
    while b.seen.iter().filter(|l| is_refusal(l)).count() < 2 {
        b.wait_until(Duration::from_secs(20), is_refusal)
            .expect("each worker's refusal is logged");
    }
    let st = b.wait_exit(Duration::from_secs(30));
    let refusals: Vec<&LogLine> = b.seen.iter().filter(|l| is_refusal(l)).collect();
    assert_eq!(refusals.len(), 2, "one refusal per worker");
    for l in &refusals {
        let m = l.message();
        assert_eq!(l.json["level"], "ERROR", "{}", l.raw);
        assert!(m.contains("of pool `default`"), "{m}");
        assert!(m.contains("but the pool has --tls-cert"), "{m}");
        assert!(m.contains(REFUSAL_TAIL), "{m}");
        assert!(m.contains("not restarting it"), "{m}");
        assert!(m.contains(REFUSAL_FIX), "{m}");
        let pid = l.field("pid").expect("pid field");
        let worker = l.field("worker").expect("worker field");
        assert!(
            m.starts_with(&format!("worker {worker} (pid {pid}) of pool")),
            "{m}"
        );
    }
    // Never welcomed, never restarted; with no worker left baton stops.
    assert_eq!(
        b.count("worker ready"),
        0,
        "a refused worker is never ready"
    );
    assert_eq!(
        b.count("worker started"),
        2,
        "no restart of a refused worker"
    );
    assert!(
        b.seen
            .iter()
            .any(|l| l.message() == "not restarting a worker that was given up"),
        "the slots are given up"
    );
    assert!(!st.success(), "baton stops with no worker left: {st:?}");
    assert!(
        b.seen.iter().any(|l| l.raw.contains("no worker left")),
        "the reason it stopped"
    );
    // The TLS client got not one byte: no plaintext echo, no HTTP answer.
    let (got, end) = client.join().expect("client thread");
    assert!(
        got.is_empty(),
        "a TLS client got plaintext back ({end}): {:?}",
        String::from_utf8_lossy(&got)
    );
    // What happens to it: it waits in the queue (no worker is ready) until
    // baton stops, and the kernel resets it, its bytes unread (or, had it
    // come later, its connect is refused). Never held past baton's exit.
    assert!(
        end == "closed" || end.contains("reset") || end.contains("refused"),
        "the TLS client's connection ended {end}"
    );
    // And after: nothing listens any more.
    let (got, end) = tls_client_reads(addr, Duration::from_secs(1));
    assert!(
        got.is_empty() && end.starts_with("connect"),
        "{end}: {got:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn baton_static_says_it_terminates_tls_and_serves_over_tls() {
    let test = "baton_static_says_it_terminates_tls_and_serves_over_tls";
    if !have_openssl(test) {
        return;
    }
    let dir = pki(&["localhost"]);
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--workers".into(),
        "2".into(),
    ];
    args.extend(tls_args(&dir));
    args.extend(["--root".into(), dir.join("public").display().to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = Baton::start(&a, 2);
    let ready: Vec<&LogLine> = b
        .seen
        .iter()
        .filter(|l| l.message() == "worker ready")
        .collect();
    assert_eq!(ready.len(), 2);
    for l in ready {
        assert_eq!(l.field("tls").as_deref(), Some("true"), "{}", l.raw);
    }
    for _ in 0..4 {
        assert_eq!(
            curl(&dir, "localhost", b.addr()),
            Ok("hello over tls\n".into())
        );
    }
    assert!(!b.seen.iter().any(is_refusal));
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_registered_worker_without_the_flag_is_refused_from_a_tls_pool() {
    let test = "a_registered_worker_without_the_flag_is_refused_from_a_tls_pool";
    if !have_openssl(test) {
        return;
    }
    let dir = pki(&["localhost"]);
    let sock = dir.join("workers.sock");
    let sock_s = sock.display().to_string();
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--workers".into(),
        "1".into(),
        "--worker-socket".into(),
        sock_s.clone(),
    ];
    args.extend(tls_args(&dir));
    args.extend(["--root".into(), dir.join("public").display().to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = Baton::start(&a, 1);

    // baton-echo, and baton-static started by hand (it has no bundle: it
    // was not spawned by baton, so it does not say it terminates TLS).
    let workers = [
        (bin("baton-echo"), vec!["--register", &sock_s]),
        (bin("baton-static"), vec!["--register", &sock_s, "--demo"]),
    ];
    for (exe, wargs) in &workers {
        let out = Command::new(exe)
            .args(wargs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker by hand");
        let pid = out.id();
        let out = wait_output(out, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {:?}", exe.display(), out.status);
        assert!(
            err.contains("closed the channel before WELCOME"),
            "{} says why it stops: {err}",
            exe.display()
        );
        let l = b
            .find(Duration::from_secs(20), |l| {
                is_refusal(l) && l.field("pid") == Some(pid.to_string())
            })
            .expect("the refusal is logged");
        let m = l.message();
        assert_eq!(l.json["level"], "ERROR", "{}", l.raw);
        assert!(m.contains(REFUSAL_TAIL) && m.contains(REFUSAL_FIX), "{m}");
        assert!(
            !m.contains("not restarting"),
            "a registered worker is not ours to restart: {m}"
        );
    }
    // Only the spawned baton-static was ever ready, and it serves TLS.
    assert_eq!(b.count("worker ready"), 1);
    for _ in 0..4 {
        assert_eq!(
            curl(&dir, "localhost", b.addr()),
            Ok("hello over tls\n".into())
        );
    }
    let rows = b.ctl_json(&["workers"]);
    let rows = rows.as_array().expect("workers is a list");
    assert_eq!(
        rows.len(),
        1,
        "the refused workers are not in the pool: {rows:?}"
    );
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `child`'s output, killing it if it runs longer than `timeout`.
fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                panic!("the registered worker was neither refused nor welcomed in {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
