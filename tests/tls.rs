//! TLS end to end: `baton --tls-cert --tls-key --root` served to curl, SNI,
//! plaintext on the TLS port, the key process killed and back (idle and
//! under load, with resumed sessions going on meanwhile), refused key
//! files, and (as root) a worker's memory searched for the private key.
//!
//! Certificates are made at test time with the `openssl` command (installed
//! by `scripts/install-deps`); without it each test says SKIPPED.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::{client_config, curl, have_openssl, issue, openssl, pki};
use common::{bin, is_root, Baton};

/// The key process's pid, from its "ready" line.
/// After the key process was killed: baton says so, restarts it, and has
/// replaced the pool's workers with ones that have a channel to the new one.
fn wait_key_process_back(b: &mut Baton) {
    b.wait_for(
        "key process exited: TLS full handshakes fail until it is back; restarting it",
        Duration::from_secs(10),
    );
    b.wait_for(
        "key process back: replacing the pool's workers",
        Duration::from_secs(10),
    );
    b.wait_for(
        "rolling restart finished: every worker replaced",
        Duration::from_secs(30),
    );
}

fn keyd_pid(b: &Baton) -> i32 {
    b.seen
        .iter()
        .find(|l| l.message().contains("key process ready"))
        .and_then(|l| l.field("pid"))
        .and_then(|p| p.parse().ok())
        .expect("the key process's pid")
}

fn start(dir: &Path, pairs: &[&str], workers: usize) -> Baton {
    let w = workers.to_string();
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--workers", &w]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in pairs {
        args.push("--tls-cert".into());
        args.push(dir.join(format!("{name}.crt")).display().to_string());
        args.push("--tls-key".into());
        args.push(dir.join(format!("{name}.key")).display().to_string());
    }
    args.push("--root".into());
    args.push(dir.join("public").display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Baton::start(&a, workers)
}

#[test]
fn curl_gets_the_site_over_tls_and_sni_picks_the_certificate() {
    if !have_openssl("curl_gets_the_site_over_tls_and_sni_picks_the_certificate") {
        return;
    }
    let dir = pki(&["localhost", "other.test"]);
    let mut b = start(&dir, &["localhost", "other.test"], 2);
    assert_eq!(
        curl(&dir, "localhost", b.addr()),
        Ok("hello over tls\n".into())
    );
    // The second certificate is chosen by SNI (curl checks its name).
    assert_eq!(
        curl(&dir, "other.test", b.addr()),
        Ok("hello over tls\n".into())
    );
    // A name neither certificate has: the default one is sent, and curl
    // refuses it for the wrong name.
    let e = curl(&dir, "nobody.test", b.addr()).expect_err("a certificate for another name");
    assert!(e.contains("certificate") || e.contains("SSL"), "{e}");
    assert!(b
        .seen
        .iter()
        .any(|l| l.message().contains("key process ready")));
    // Plain HTTP on the TLS port is told so, and logged.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/", b.addr().port()))
        .output()
        .expect("curl");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HTTPS"),
        "{out:?}"
    );
    b.find(Duration::from_secs(10), |l| {
        l.message() == "TLS connection closed"
            && l.field("kind").as_deref() == Some("plaintext-http")
    })
    .expect("the plaintext client is logged as such");
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_key_process_fails_handshakes_cleanly_and_comes_back() {
    if !have_openssl("a_killed_key_process_fails_handshakes_cleanly_and_comes_back") {
        return;
    }
    let dir = pki(&["localhost"]);
    let mut b = start(&dir, &["localhost"], 1);
    assert!(curl(&dir, "localhost", b.addr()).is_ok());
    let pid = keyd_pid(&b);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the key process");
    // It comes back, and the worker is replaced by one with a channel to it.
    wait_key_process_back(&mut b);
    let started = Instant::now();
    assert_eq!(
        curl(&dir, "localhost", b.addr()),
        Ok("hello over tls\n".into())
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_key_files_are_refused_at_start_with_the_file_named() {
    if !have_openssl("bad_key_files_are_refused_at_start_with_the_file_named") {
        return;
    }
    let dir = pki(&["localhost", "other.test"]);
    // An encrypted key.
    openssl(
        &dir,
        &[
            "pkey",
            "-in",
            "localhost.key",
            "-out",
            "locked.key",
            "-aes256",
            "-passout",
            "pass:secret",
        ],
    );
    let crt = dir.join("localhost.crt").display().to_string();
    let public = dir.join("public").display().to_string();
    let run = |sub: Option<&str>, key: &str| {
        let key = dir.join(key).display().to_string();
        let mut c = Command::new(bin("baton"));
        if let Some(s) = sub {
            c.arg(s);
        }
        let out = c
            .args(["--no-control", "--listen", "127.0.0.1:0", "--workers", "1"])
            .args(["--tls-cert", &crt, "--tls-key", &key, "--root", &public])
            .stdin(Stdio::null())
            .output()
            .expect("run baton");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for sub in [Some("check"), None] {
        let (ok, err) = run(sub, "other.test.key");
        assert!(
            !ok && err.contains("other.test.key") && err.contains("does not match"),
            "{sub:?}: {err}"
        );
        let (ok, err) = run(sub, "locked.key");
        assert!(
            !ok && err.contains("locked.key") && err.contains("encrypted keys are not supported"),
            "{sub:?}: {err}"
        );
    }
    let (ok, err) = run(Some("check"), "missing.key");
    assert!(!ok && err.contains("missing.key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The private scalar of a P-256 key file, from `openssl ec -text`.
fn private_scalar(dir: &Path, key: &str) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["ec", "-in", key, "-noout", "-text"])
        .output()
        .expect("openssl ec");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex: String = text
        .split("priv:")
        .nth(1)
        .and_then(|rest| rest.split("pub:").next())
        .expect("a priv: section")
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    let mut bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    // openssl prints a leading 00 when the top bit is set.
    while bytes.len() > 32 && bytes[0] == 0 {
        bytes.remove(0);
    }
    bytes
}

/// `d * 2^256 mod n` (n the order of P-256) as 32 little-endian bytes:
/// the form in which ring keeps an ECDSA P-256 private scalar.
fn montgomery_le(d_be: &[u8]) -> Vec<u8> {
    // Little-endian 64-bit limbs.
    let limbs = |be: &[u8]| -> [u64; 4] {
        let mut l = [0u64; 4];
        for (i, chunk) in be.rchunks(8).enumerate().take(4) {
            let mut w = [0u8; 8];
            w[8 - chunk.len()..].copy_from_slice(chunk);
            l[i] = u64::from_be_bytes(w);
        }
        l
    };
    let n = limbs(&[
        0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63,
        0x25, 0x51,
    ]);
    let ge = |a: &[u64; 4], b: &[u64; 4]| {
        for i in (0..4).rev() {
            if a[i] != b[i] {
                return a[i] > b[i];
            }
        }
        true
    };
    let sub = |a: &mut [u64; 4], b: &[u64; 4]| {
        let mut borrow = 0u64;
        for i in 0..4 {
            let (x, b1) = a[i].overflowing_sub(b[i]);
            let (y, b2) = x.overflowing_sub(borrow);
            a[i] = y;
            borrow = u64::from(b1 || b2);
        }
    };
    let mut x = limbs(d_be);
    // 256 modular doublings: x * 2^256 mod n.
    for _ in 0..256 {
        let carry = x[3] >> 63;
        for i in (1..4).rev() {
            x[i] = (x[i] << 1) | (x[i - 1] >> 63);
        }
        x[0] <<= 1;
        if carry == 1 || ge(&x, &n) {
            sub(&mut x, &n);
        }
    }
    x.iter().flat_map(|l| l.to_le_bytes()).collect()
}

/// The key as PKCS#8 DER.
fn pkcs8_der(dir: &Path, key: &str) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["pkey", "-in", key, "-outform", "DER"])
        .output()
        .expect("openssl pkey");
    assert!(out.status.success());
    out.stdout
}

/// Whether the writable memory of process `pid` contains `needle`.
fn memory_contains(pid: i32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
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
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[test]
fn after_handshakes_the_private_key_is_in_the_key_process_and_not_in_a_worker() {
    let test = "after_handshakes_the_private_key_is_in_the_key_process_and_not_in_a_worker";
    if !can_read_memory(test) {
        return;
    }
    let dir = pki(&["localhost"]);
    let b = start(&dir, &["localhost"], 1);
    key_is_only_in_the_key_process(b, &dir);
}

#[test]
fn a_proxy_worker_never_holds_the_private_key_either() {
    if !can_read_memory("a_proxy_worker_never_holds_the_private_key_either") {
        return;
    }
    let dir = pki(&["localhost"]);
    // An upstream that answers every request with a small page.
    let up = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let up_addr = up.local_addr().expect("its address").to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in up.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\nhello over tls\n");
        }
    });
    let proxy = bin("baton-proxy").display().to_string();
    let (cert, key) = (
        dir.join("localhost.crt").display().to_string(),
        dir.join("localhost.key").display().to_string(),
    );
    let b = Baton::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--",
            &proxy,
            "--upstream",
            &up_addr,
        ],
        1,
    );
    key_is_only_in_the_key_process(b, &dir);
}

/// Reading another user's `/proc/PID/mem` needs root, and the key is made
/// with openssl: whether `test` can run (else it says why it is skipped).
fn can_read_memory(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: reading another user's /proc/PID/mem needs root");
        return false;
    }
    have_openssl(test)
}

/// After a few handshakes through `b`, searches the memory of its key
/// process, its workers and the acceptor for every form of localhost.key:
/// only the key process may hold it.
fn key_is_only_in_the_key_process(mut b: Baton, dir: &Path) {
    let scalar = private_scalar(dir, "localhost.key");
    assert_eq!(scalar.len(), 32);
    for _ in 0..3 {
        assert_eq!(
            curl(dir, "localhost", b.addr()),
            Ok("hello over tls\n".into())
        );
    }
    let keyd = keyd_pid(&b);
    let workers: Vec<i32> = b.worker_pids().into_iter().filter(|p| *p != keyd).collect();
    assert!(!workers.is_empty());
    // What of the key a process could hold: the scalar (big-endian, as
    // little-endian limbs, and in the Montgomery form ring computes with),
    // the PKCS#8 DER, the PEM text.
    let der = pkcs8_der(dir, "localhost.key");
    let pem_line = std::fs::read_to_string(dir.join("localhost.key"))
        .expect("read key")
        .lines()
        .nth(1)
        .expect("a base64 line")
        .as_bytes()
        .to_vec();
    let reversed: Vec<u8> = scalar.iter().rev().copied().collect();
    let montgomery = montgomery_le(&scalar);
    let needles = [scalar, reversed, montgomery, der, pem_line];
    let holds = |pid: i32| needles.iter().any(|n| memory_contains(pid, n));
    // The positive control: the same search finds key bytes in the key
    // process, which loaded the file.
    assert!(
        holds(keyd),
        "the key process holds the key (or the search is broken)"
    );
    for w in workers {
        assert!(!holds(w), "worker {w} has the private key in its memory");
    }
    assert!(
        !holds(b.pid()),
        "the acceptor has the private key in its memory"
    );
    b.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn audit_proves_a_worker_cannot_read_the_key() {
    if !is_root() {
        eprintln!("SKIPPED audit_proves_a_worker_cannot_read_the_key: the audit runs its probe as another user only as root");
        return;
    }
    if !have_openssl("audit_proves_a_worker_cannot_read_the_key") {
        return;
    }
    let dir = pki(&["localhost"]);
    let key = dir.join("localhost.key");
    let audit = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = Command::new(bin("baton"))
            .args(["audit", "--json", "--tls-key"])
            .arg(&key)
            .output()
            .expect("run baton audit");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("the audit's JSON report");
        let rows = report["rows"].as_array().cloned().unwrap_or_default();
        let status = |property: &str| {
            rows.iter()
                .find(|r| r["property"] == property)
                .map(|r| r["status"].as_str().unwrap_or_default().to_string())
                .unwrap_or_else(|| panic!("no {property} row in {report}"))
        };
        (status("tls key fd"), status("tls key unreadable"))
    };
    assert_eq!(audit(0o600), ("pass".to_string(), "pass".to_string()));
    // A key the workers' user can read is reported.
    assert_eq!(audit(0o644).1, "fail");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One `openssl s_client` request with `Connection: close`, saving or
/// resuming the session in `sess`: its output.
fn s_client(dir: &Path, addr: SocketAddr, sess: &Path, resume: bool) -> String {
    use std::io::Write;
    let mut c = Command::new("openssl");
    c.current_dir(dir)
        .args([
            "s_client",
            "-ign_eof",
            "-servername",
            "localhost",
            "-alpn",
            "http/1.1",
        ])
        .args(["-CAfile", "ca.crt", "-connect"])
        .arg(addr.to_string())
        .arg(if resume { "-sess_in" } else { "-sess_out" })
        .arg(sess)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run openssl s_client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write the request");
    let out = child.wait_with_output().expect("s_client output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_session_resumes_on_any_worker_of_the_pool() {
    if !have_openssl("a_session_resumes_on_any_worker_of_the_pool") {
        return;
    }
    let dir = pki(&["localhost"]);
    let mut b = start(&dir, &["localhost"], 2);
    let sess = dir.join("session.pem");
    let first = s_client(&dir, b.addr(), &sess, false);
    assert!(
        first.contains("New, TLSv1.3")
            && first.contains("ALPN protocol: http/1.1")
            && first.contains("hello over tls"),
        "{first}"
    );
    for i in 0..6 {
        let again = s_client(&dir, b.addr(), &sess, true);
        assert!(
            again.contains("Reused, TLSv1.3") && again.contains("hello over tls"),
            "resumption {i}: {again}"
        );
    }
    // The access log says which workers served them: both did.
    let mut pids = std::collections::BTreeSet::new();
    while pids.len() < 2 {
        let l = b
            .find(Duration::from_secs(10), |l| {
                l.json["target"] == "access" && !pids.contains(&l.json["span"]["pid"].to_string())
            })
            .unwrap_or_else(|| panic!("access lines from only {pids:?}"));
        pids.insert(l.json["span"]["pid"].to_string());
    }
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The serial number of the certificate the server at `addr` sends.
fn served_serial(dir: &Path, addr: SocketAddr) -> String {
    let out = s_client(dir, addr, &dir.join("unused.sess"), false);
    let pem_start = out
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let pem_end = out.find("-----END CERTIFICATE-----").expect("its end") + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    use std::io::Write;
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(&out.as_bytes()[pem_start..pem_end])
        .expect("write pem");
    let o = x509.wait_with_output().expect("x509 output");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn certificates_reload_under_load_without_a_failed_request() {
    if !have_openssl("certificates_reload_under_load_without_a_failed_request") {
        return;
    }
    let dir = pki(&["localhost", "other.test"]);
    let file = dir.join("baton.toml");
    let config = |cert: &str, key: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\n[pool]\nworkers = 2\ndrain-timeout = \"20s\"\nroot = \"{}\"\ntls-cert = [\"{}\"]\ntls-key = [\"{}\"]\n",
            dir.join("public").display(),
            dir.join(cert).display(),
            dir.join(key).display()
        )
    };
    std::fs::write(&file, config("localhost.crt", "localhost.key")).expect("write");
    let file_s = file.display().to_string();
    let mut b = Baton::start(&["--config", &file_s], 2);
    let before = served_serial(&dir, b.addr());

    // A second certificate for the same name, with a new key.
    issue(&dir, "localhost", "renewed");

    // A mistake first: a key that is not the certificate's changes nothing.
    std::fs::write(&file, config("renewed.crt", "other.test.key")).expect("write");
    let (ok, _, err) = b.ctl(&["reload"]);
    assert!(
        !ok && err.contains("other.test.key") && err.contains("does not match"),
        "{err}"
    );
    assert_eq!(served_serial(&dir, b.addr()), before);

    // Clients keep coming while the certificate is reloaded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, dir, addr) = (stop.clone(), dir.clone(), b.addr());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match curl(&dir, "localhost", addr) {
                    Ok(body) if body == "hello over tls\n" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    std::fs::write(&file, config("renewed.crt", "renewed.key")).expect("write");
    let r = b.ctl_json(&["reload"]);
    assert!(
        r["changes"]
            .to_string()
            .contains("TLS certificates reloaded"),
        "{r}"
    );
    b.wait_for(
        "rolling restart finished: every worker replaced",
        Duration::from_secs(60),
    );
    b.wait_for(
        "the old key process is stopped: every TLS worker uses the new one",
        Duration::from_secs(30),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load thread");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 0);
    let after = served_serial(&dir, b.addr());
    assert_ne!(after, before, "the renewed certificate is served");
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One client request over TLS, as the load of the test below records it.
#[derive(Debug)]
struct Attempt {
    /// From a thread that resumes sessions.
    resuming: bool,
    start: Instant,
    took: Duration,
    /// The kind of handshake, or the error.
    result: Result<rustls::HandshakeKind, String>,
    /// Whether the handshake had finished when it failed.
    after_handshake: bool,
    /// Whether the error was a client-side timeout (a hang).
    timed_out: bool,
}

/// `GET /` with `Connection: close` over TLS to `localhost` at `addr`,
/// every socket operation bounded (10 s): what happened.
fn https_get(
    config: &std::sync::Arc<rustls::ClientConfig>,
    resuming: bool,
    addr: SocketAddr,
) -> Attempt {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut conn = rustls::ClientConnection::new(
        config.clone(),
        "localhost".try_into().expect("a server name"),
    )
    .expect("a client connection");
    let result = (|| -> std::io::Result<Vec<u8>> {
        let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response)?;
        Ok(response)
    })();
    let took = start.elapsed();
    let after_handshake = !conn.is_handshaking();
    let (result, timed_out) = match result {
        Ok(r) if r.starts_with(b"HTTP/1.1 200") && r.ends_with(b"\r\n\r\nhello over tls\n") => (
            conn.handshake_kind()
                .ok_or_else(|| "no handshake kind".to_string()),
            false,
        ),
        Ok(r) => (
            Err(format!(
                "unexpected response {:?}",
                String::from_utf8_lossy(&r)
            )),
            false,
        ),
        Err(e) => {
            let timed_out = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            (Err(format!("{:?}: {e}", e.kind())), timed_out)
        }
    };
    Attempt {
        resuming,
        start,
        took,
        result,
        after_handshake,
        timed_out,
    }
}

/// Issue 13, "key process killed during load": rustls clients doing full
/// and resumed handshakes in a loop while the key process is SIGKILLed.
/// Only full handshakes fail, cleanly and fast, only until the new key
/// process's workers replaced the old ones; resumed ones never fail.
#[test]
fn the_key_process_killed_under_load_fails_only_full_handshakes_and_nothing_hangs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    if !have_openssl(
        "the_key_process_killed_under_load_fails_only_full_handshakes_and_nothing_hangs",
    ) {
        return;
    }
    let dir = pki(&["localhost"]);
    let mut b = start(&dir, &["localhost"], 2);
    let addr = b.addr();

    // Two threads of full handshakes (no resumption) and two that resume
    // (each with its own session cache, its first handshake a full one),
    // in a loop until stopped; every attempt is reported as it ends.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Attempt>();
    let threads: Vec<_> = [false, false, true, true]
        .into_iter()
        .map(|resuming| {
            let (stop, tx, config) = (
                stop.clone(),
                tx.clone(),
                client_config(&dir, resuming, &[b"http/1.1"]),
            );
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if tx.send(https_get(&config, resuming, addr)).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut seen: Vec<Attempt> = Vec::new();
    // Receives attempts until `enough` says so (or 30 s pass).
    let collect = |seen: &mut Vec<Attempt>, what: &str, enough: &dyn Fn(&[Attempt]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !enough(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(a) => seen.push(a),
                Err(_) => panic!("{what}: not within 30 s; attempts: {seen:#?}"),
            }
        }
    };
    let ok = |a: &Attempt, kind: rustls::HandshakeKind| a.result.as_ref().ok() == Some(&kind);
    let count_since = |seen: &[Attempt], since: Instant, resuming: bool| {
        let kind = if resuming {
            rustls::HandshakeKind::Resumed
        } else {
            rustls::HandshakeKind::Full
        };
        seen.iter()
            .filter(|a| a.start >= since && a.resuming == resuming && ok(a, kind))
            .count()
    };

    // Load first, served normally.
    let began = Instant::now();
    collect(&mut seen, "successes before the kill", &|s| {
        count_since(s, began, false) >= 20 && count_since(s, began, true) >= 10
    });
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keyd_pid(&b)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the key process");
    wait_key_process_back(&mut b);
    let recovered_at = Instant::now();
    // Load again, after the recovery, with full handshakes signed by the
    // new key process.
    collect(&mut seen, "successes after the recovery", &|s| {
        count_since(s, recovered_at, false) >= 20 && count_since(s, recovered_at, true) >= 10
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    seen.extend(rx.try_iter());

    // Nothing hung: every attempt ended, each well within the bound.
    let max = seen.iter().map(|a| a.took).max().unwrap_or_default();
    assert!(
        seen.iter()
            .all(|a| !a.timed_out && a.took < Duration::from_secs(5)),
        "an attempt hung: {:#?}",
        seen.iter()
            .filter(|a| a.timed_out || a.took >= Duration::from_secs(5))
            .collect::<Vec<_>>()
    );
    // Failures: full handshakes only, in the handshake (a TLS alert or the
    // connection closed, not a broken response), and only in the outage.
    let failed: Vec<&Attempt> = seen.iter().filter(|a| a.result.is_err()).collect();
    for a in &failed {
        assert!(
            !a.resuming,
            "a resumed handshake failed while the key process was down: {a:#?}"
        );
        assert!(!a.after_handshake, "failed after its handshake: {a:#?}");
        // What the client sees of a signature that failed: the worker
        // closes (close_notify, a fatal alert in a handshake; rustls sends
        // no alert of its own for a signer's error) or resets (the
        // client's next flight unread).
        let e = a.result.as_ref().err().map(String::as_str).unwrap_or("");
        assert!(
            e.starts_with("InvalidData: received fatal alert")
                || e.starts_with("ConnectionReset")
                || e.starts_with("UnexpectedEof"),
            "not a clean TLS failure: {a:#?}"
        );
        assert!(
            a.start + a.took >= killed_at && a.start <= recovered_at,
            "failed outside the outage ({:?} after the kill, the recovery seen {:?} after it): {a:#?}",
            a.start.checked_duration_since(killed_at),
            recovered_at - killed_at,
        );
    }
    // The outage was exercised: full handshakes failed, resumed ones went on.
    assert!(
        !failed.is_empty(),
        "no full handshake failed while the key process was down"
    );
    let resumed_in_outage = seen
        .iter()
        .filter(|a| {
            a.resuming
                && a.start >= killed_at
                && a.start + a.took <= recovered_at
                && ok(a, rustls::HandshakeKind::Resumed)
        })
        .count();
    assert!(
        resumed_in_outage > 0,
        "no resumed handshake during the outage"
    );
    // The acceptor stayed up, and no worker crashed.
    assert!(
        b.child.try_wait().expect("try_wait").is_none(),
        "the acceptor exited"
    );
    let crashed: Vec<&str> = b
        .seen
        .iter()
        .filter(|l| l.message() == "worker exited" && l.json["level"] != "INFO")
        .map(|l| l.raw.as_str())
        .collect();
    assert!(crashed.is_empty(), "{crashed:#?}");
    let full_ok = seen
        .iter()
        .filter(|a| ok(a, rustls::HandshakeKind::Full))
        .count();
    let resumed_ok = seen
        .iter()
        .filter(|a| ok(a, rustls::HandshakeKind::Resumed))
        .count();
    let errors: std::collections::BTreeSet<&str> = failed
        .iter()
        .filter_map(|a| a.result.as_ref().err().map(String::as_str))
        .collect();
    eprintln!(
        "key process killed under load: {} attempts, {full_ok} full and {resumed_ok} resumed handshakes served ({resumed_in_outage} resumed during the outage), {} full handshakes failed cleanly ({errors:?}); outage seen for {:?}; slowest attempt {max:?}",
        seen.len(),
        failed.len(),
        recovered_at - killed_at,
    );
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
