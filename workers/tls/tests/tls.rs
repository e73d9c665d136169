//! End-to-end: a rustls client on loopback, a worker-like server whose
//! only key is a `RemoteKey`, and the real `baton-keyd` process.

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use baton_tls::wire::{self, ErrorCode, KeyAccess, Reply, Request};
use baton_tls::{KeyClient, MinVersion, SignError, TicketKeys, TlsError, TlsOptions};
use common::*;
use rustls::version::{TLS12, TLS13};

fn handshake(alg: Alg) {
    let dir = tempdir("hs");
    let ca = ca(&dir);
    let Some(l) = leaf(&dir, &ca, "site", &["localhost"], alg) else {
        println!("skipping {alg:?}: the openssl CLI is not installed (rcgen cannot make RSA keys)");
        return;
    };
    let mut keyd = Keyd::start(&[(1, &l)], 1);
    let tls = worker_config(&[(1, &l)], keyd.take_peer(), None, TlsOptions::default());
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let (got, served) = ok_exchange(&tls.config, client_config(&ca, versions), "localhost");
        assert_eq!(got.reply, b"pong\n");
        assert_eq!(got.peer_leaf.as_ref(), Some(&l.cert_der));
        assert_eq!(served.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(served.sni.as_deref(), Some("localhost"));
        assert_eq!(served.version, Some(versions[0].version));
        assert!(!served.resumed);
    }
}

#[test]
fn handshake_ecdsa_p256_with_key_process() {
    handshake(Alg::P256);
}

#[test]
fn handshake_rsa_2048_with_key_process() {
    handshake(Alg::Rsa2048);
}

#[test]
fn minimum_version_refuses_tls12() {
    let (_dir, ca, l) = site("minver");
    let mut keyd = Keyd::start(&[(1, &l)], 1);
    let opts = TlsOptions {
        min_version: MinVersion::Tls13,
        ..TlsOptions::default()
    };
    let tls = worker_config(&[(1, &l)], keyd.take_peer(), None, opts);
    let err = failed_exchange(&tls.config, client_config(&ca, &[&TLS12]), "localhost");
    assert_eq!(err.kind(), "tls", "{err}");
}

#[test]
fn resumption_across_workers_sharing_ticket_keys() {
    let (_dir, ca, l) = site("resume");
    // One key process, three "workers": two share ticket keys, one not.
    let mut keyd = Keyd::start(&[(1, &l)], 3);
    let shared = TicketKeys::generate().expect("keys");
    let a = worker_config(
        &[(1, &l)],
        keyd.take_peer(),
        Some(shared.clone()),
        TlsOptions::default(),
    );
    let b = worker_config(
        &[(1, &l)],
        keyd.take_peer(),
        Some(shared.clone()),
        TlsOptions::default(),
    );
    let other = TicketKeys::generate().expect("keys");
    let c = worker_config(
        &[(1, &l)],
        keyd.take_peer(),
        Some(other),
        TlsOptions::default(),
    );
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let client = client_config(&ca, versions);
        let run = |cfg: &baton_tls::BuiltTls| {
            let (got, served) = ok_exchange(&cfg.config, client.clone(), "localhost");
            assert_eq!(got.reply, b"pong\n");
            assert_eq!(got.resumed, served.resumed);
            served.resumed
        };
        assert!(!run(&a), "first connection is a full handshake");
        assert!(
            run(&b),
            "{versions:?}: resumed on another worker with the same ticket keys"
        );
        // Rotation: b gets a new current key, keeps the old one: still resumes.
        let mut rotated = shared.clone();
        rotated.rotate(2).expect("rotate");
        b.ticketer.as_ref().expect("ticketer").set_keys(&rotated);
        assert!(
            run(&b),
            "{versions:?}: resumes with the previous key after rotation"
        );
        b.ticketer.as_ref().expect("ticketer").set_keys(&shared);
        // A fresh client against c: full; c's tickets mean nothing to a.
        let fresh = client_config(&ca, versions);
        assert!(!ok_exchange(&c.config, fresh.clone(), "localhost").1.resumed);
        assert!(
            !ok_exchange(&a.config, fresh, "localhost").1.resumed,
            "{versions:?}: other ticket keys must not resume"
        );
    }
}

#[test]
fn sni_picks_the_certificate() {
    let dir = tempdir("sni");
    let ca = ca(&dir);
    let first = leaf(&dir, &ca, "first", &["default.test"], Alg::P256).expect("leaf");
    let exact = leaf(&dir, &ca, "exact", &["a.test"], Alg::P256).expect("leaf");
    let wild = leaf(&dir, &ca, "wild", &["*.b.test"], Alg::P256).expect("leaf");
    let keys = [(10, &first), (20, &exact), (30, &wild)];
    let mut keyd = Keyd::start(&keys, 1);
    let tls = worker_config(&keys, keyd.take_peer(), None, TlsOptions::default());
    let client = client_config(&ca, &[&TLS13, &TLS12]);
    for (name, want) in [
        ("a.test", &exact),
        ("x.b.test", &wild),
        ("default.test", &first),
    ] {
        let (got, served) = ok_exchange(&tls.config, client.clone(), name);
        assert_eq!(got.peer_leaf.as_ref(), Some(&want.cert_der), "{name}");
        assert_eq!(served.sni.as_deref(), Some(name));
    }
    // A name no certificate has: the default, which a verifying client
    // rejects (the server sees its alert) ...
    let err = failed_exchange(&tls.config, client.clone(), "c.b.a.test");
    assert_eq!(err.kind(), "alert", "{err}");
    // ... and a client that accepts any certificate gets the default.
    let (got, _) = ok_exchange(&tls.config, any_cert_client(), "nowhere.test");
    assert_eq!(got.peer_leaf.as_ref(), Some(&first.cert_der));
}

#[test]
fn killed_key_process_fails_the_handshake_at_once() {
    let (_dir, ca, l) = site("killed");
    let mut keyd = Keyd::start(&[(1, &l)], 1);
    let tls = worker_config(&[(1, &l)], keyd.take_peer(), None, TlsOptions::default());
    keyd.kill();
    let t = Instant::now();
    let err = failed_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(err, TlsError::KeyProcess(ref m) if m.contains("gone")),
        "{err}"
    );
    // A new key process, a new channel for the same worker config.
    let mut again = Keyd::start(&[(1, &l)], 1);
    tls.client
        .lock()
        .expect("lock")
        .set_channel(again.take_peer());
    ok_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
}

#[test]
fn hung_key_process_times_out() {
    let (_dir, ca, l) = site("hung");
    let mut keyd = Keyd::start(&[(1, &l)], 1);
    let tls = worker_config(&[(1, &l)], keyd.take_peer(), None, TlsOptions::default());
    // A first handshake works, then the key process stops answering.
    ok_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
    keyd.signal(nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    let err = failed_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert!(
        matches!(err, TlsError::KeyProcess(ref m) if m.contains("did not answer")),
        "{err}"
    );
    // Resumed again, the late reply to the timed-out request is skipped.
    keyd.signal(nix::sys::signal::Signal::SIGCONT);
    ok_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
}

fn raw_call(fd: &std::os::fd::OwnedFd, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> Reply {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let c: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd.as_raw_fd(), &iov, c, MsgFlags::empty(), None).expect("send");
    let mut buf = vec![0u8; wire::MAX_REPLY + 1];
    let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("recv");
    assert!(n > 0, "key process closed the channel");
    Reply::decode(&buf[..n]).expect("reply decodes")
}

#[test]
fn malformed_and_oversized_requests_are_refused_and_the_key_process_goes_on() {
    let (_dir, _ca, l) = site("malformed");
    let mut keyd = Keyd::start(&[(1, &l)], 2);
    let peer = keyd.take_peer();
    let err = |r: Reply| match r {
        Reply::Error { id, code } => (id, code),
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(err(raw_call(&peer, b"x", &[])), (0, ErrorCode::Malformed));
    assert_eq!(
        err(raw_call(&peer, &[2, 1, 9, 0, 0, 0], &[])),
        (9, ErrorCode::BadVersion)
    );
    assert_eq!(
        err(raw_call(&peer, &[1, 0x55, 4, 0, 0, 0], &[])),
        (4, ErrorCode::Malformed)
    );
    let mut huge = Request::Sign {
        id: 11,
        key: 1,
        scheme: rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
        message: vec![7; wire::MAX_SIGN_INPUT],
    }
    .encode();
    huge.extend_from_slice(&[0; 4096]);
    assert_eq!(err(raw_call(&peer, &huge, &[])), (11, ErrorCode::TooLarge));
    let sign = |id, key, scheme| {
        Request::Sign {
            id,
            key,
            scheme,
            message: b"transcript".to_vec(),
        }
        .encode()
    };
    use rustls::SignatureScheme as S;
    assert_eq!(
        err(raw_call(&peer, &sign(12, 2, S::ECDSA_NISTP256_SHA256), &[])),
        (12, ErrorCode::UnknownKey)
    );
    assert_eq!(
        err(raw_call(&peer, &sign(13, 1, S::RSA_PSS_SHA256), &[])),
        (13, ErrorCode::UnsupportedScheme)
    );
    // A peer may not add peers, nor attach fds.
    let (x, _y) = baton_tls::key_channel_pair().expect("pair");
    use std::os::fd::AsRawFd;
    let add = Request::AddPeer {
        id: 14,
        access: KeyAccess::All,
    }
    .encode();
    assert_eq!(
        err(raw_call(&peer, &add, &[x.as_raw_fd()])),
        (14, ErrorCode::NotAllowed)
    );
    let ping = Request::Ping { id: 15 }.encode();
    assert_eq!(
        err(raw_call(&peer, &ping, &[x.as_raw_fd()])),
        (15, ErrorCode::Malformed)
    );
    // Still serving: this peer and the other.
    assert_eq!(raw_call(&peer, &ping, &[]), Reply::Pong { id: 15 });
    assert!(matches!(
        raw_call(&peer, &sign(16, 1, S::ECDSA_NISTP256_SHA256), &[]),
        Reply::Signature { id: 16, .. }
    ));
    let mut other = KeyClient::new(keyd.take_peer());
    other.ping().expect("other peer");
    // The client refuses an oversized message before sending it.
    assert!(matches!(
        other.sign(
            1,
            S::ECDSA_NISTP256_SHA256,
            &vec![0; wire::MAX_SIGN_INPUT + 1]
        ),
        Err(SignError::TooLarge(_))
    ));
    // The acceptor adds a peer at run time over the control channel.
    let (mine, theirs) = baton_tls::key_channel_pair().expect("pair");
    baton_tls::add_peer(
        &keyd.control,
        &theirs,
        KeyAccess::All,
        Duration::from_secs(2),
    )
    .expect("add peer");
    drop(theirs);
    let mut added = KeyClient::new(mine);
    let sig = added
        .sign(1, S::ECDSA_NISTP256_SHA256, b"hello")
        .expect("signature from the added peer");
    assert!(!sig.is_empty());
    // A peer closing does not stop the others.
    drop(peer);
    added.ping().expect("still up");
    assert!(keyd.child.try_wait().expect("wait").is_none());
    // The control channel's end ends the key process, cleanly.
    let control = std::mem::replace(
        &mut keyd.control,
        baton_tls::key_channel_pair().expect("pair").0,
    );
    drop(control);
    let status = keyd.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let _ = added.ping().expect_err("gone");
    let _ = keyd.control.as_fd();
}

#[test]
fn sandboxed_key_process_is_confined() {
    let (_dir, _ca, l) = site("confined");
    let mut keyd = Keyd::start(&[(1, &l)], 1);
    let mut c = KeyClient::new(keyd.take_peer());
    c.ping().expect("ping");
    let status = std::fs::read_to_string(format!("/proc/{}/status", keyd.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    assert_eq!(field("Seccomp:"), "2", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    if nix::unistd::geteuid().is_root() {
        assert!(
            field("Uid:").starts_with("65534 65534 65534"),
            "{}",
            field("Uid:")
        );
    }
    // Not dumpable: /proc/PID/mem is root's only (and ptrace is refused).
    let meta = std::fs::metadata(format!("/proc/{}/mem", keyd.pid())).expect("mem");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        meta.uid(),
        0,
        "a non-dumpable process's /proc files belong to root"
    );
    // Only stdio and its two channels are open.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", keyd.pid()))
        .expect("fds")
        .count();
    assert_eq!(fds, 5, "stdio + control + one peer");
}

#[test]
fn key_process_with_a_bad_key_exits_naming_the_file() {
    let (dir, ca, l) = site("badkey");
    let other = leaf(&dir, &ca, "other", &["localhost"], Alg::P256).expect("leaf");
    let mismatched = Leaf {
        cert_path: l.cert_path.clone(),
        key_path: other.key_path.clone(),
        cert_der: l.cert_der.clone(),
        key_der: other.key_der.clone(),
    };
    let mut keyd = Keyd::start_with(&[(1, &mismatched)], 1, true).expect("spawn");
    let out = std::mem::replace(
        &mut keyd.child,
        std::process::Command::new("true").spawn().expect("true"),
    );
    let out = out.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(baton_tls::keyd::EXIT_LOAD));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*l.cert_path.to_string_lossy()), "{err}");
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn spawn_then_add_peers_at_run_time() {
    let (_dir, ca, l) = site("spawn");
    let files = [baton_tls::KeyFiles {
        id: 3,
        cert: l.cert_path.clone(),
        key: l.key_path.clone(),
    }];
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_baton-keyd"));
    let profile = keyd_profile();
    let mut k = baton_tls::keyd::spawn(exe, &[], &files, Some(&profile)).expect("spawn");
    // Two workers come and go; each gets its channel from the acceptor.
    for _ in 0..2 {
        let (mine, theirs) = baton_tls::key_channel_pair().expect("pair");
        baton_tls::add_peer(
            &k.control,
            &theirs,
            KeyAccess::Only(vec![3]),
            Duration::from_secs(2),
        )
        .expect("add");
        drop(theirs);
        let tls = worker_config(&[(3, &l)], mine, None, TlsOptions::default());
        let (got, _) = ok_exchange(&tls.config, client_config(&ca, &[&TLS13]), "localhost");
        assert_eq!(got.reply, b"pong\n");
    }
    // A worker of another pool may not sign with this pool's key.
    let (mine, theirs) = baton_tls::key_channel_pair().expect("pair");
    baton_tls::add_peer(
        &k.control,
        &theirs,
        KeyAccess::Only(vec![99]),
        Duration::from_secs(2),
    )
    .expect("add");
    let mut foreign = KeyClient::new(mine);
    let refused = foreign
        .sign(3, rustls::SignatureScheme::ECDSA_NISTP256_SHA256, b"x")
        .expect_err("not its key");
    assert!(
        matches!(refused, SignError::Refused(ErrorCode::NotAllowed)),
        "{refused}"
    );
    drop(k.control);
    assert_eq!(k.child.wait().expect("wait").code(), Some(0));
}

#[test]
fn spawned_key_process_that_cannot_load_reports_it() {
    let dir = tempdir("spawnbad");
    let files = [baton_tls::KeyFiles {
        id: 1,
        cert: dir.join("missing.crt"),
        key: dir.join("missing.key"),
    }];
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_baton-keyd"));
    let mut k = baton_tls::keyd::spawn(exe, &[], &files, None).expect("spawn");
    let (_mine, theirs) = baton_tls::key_channel_pair().expect("pair");
    let err = baton_tls::add_peer(
        &k.control,
        &theirs,
        KeyAccess::Only(vec![3]),
        Duration::from_secs(2),
    )
    .expect_err("gone");
    assert!(matches!(err, SignError::Closed | SignError::Io(_)), "{err}");
    assert_eq!(
        k.child.wait().expect("wait").code(),
        Some(baton_tls::keyd::EXIT_LOAD)
    );
}

#[test]
fn bad_command_line_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-keyd"))
        .args(["--key", "1:a:b", "--peer-fd", "9"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(baton_tls::keyd::EXIT_USAGE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fd 9 is not open"));
}
