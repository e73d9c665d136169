//! `TlsConn`'s error classification and clean close, against raw and
//! rustls clients on loopback (keys local here: the key process is tested
//! in tls.rs).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_tls::{load, SniResolver, TlsError, TlsOptions};
use common::*;

fn local_config() -> (Ca, Arc<rustls::ServerConfig>) {
    let dir = tempdir("conn");
    let ca = ca(&dir);
    let l = leaf(&dir, &ca, "site", &["localhost"], Alg::P256).expect("leaf");
    let ck = load::load_local(&l.cert_path, &l.key_path).expect("pair");
    let mut r = SniResolver::new();
    r.add(&["localhost".into()], Arc::new(ck));
    let config =
        baton_tls::server_config(Arc::new(r), None, &TlsOptions::default()).expect("config");
    (ca, config)
}

/// Runs the server on one connection while `client` acts on a raw socket.
fn against(
    deadline: Duration,
    client: impl FnOnce(TcpStream) -> Vec<u8> + Send + 'static,
) -> (Result<Served, TlsError>, Vec<u8>, Duration) {
    let (_ca, config) = local_config();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client(s)
    });
    let start = Instant::now();
    let served = serve_one_within(config, &listener, deadline);
    let took = start.elapsed();
    (served, h.join().expect("client thread"), took)
}

fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

#[test]
fn plaintext_http_is_its_own_error_and_gets_no_tls_alert() {
    let (served, reply, _) = against(Duration::from_secs(5), |mut s| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        read_all(s)
    });
    let err = served.expect_err("plaintext");
    assert!(
        matches!(err, TlsError::PlaintextHttp(ref m) if m == "GET"),
        "{err}"
    );
    assert_eq!(err.kind(), "plaintext-http");
    assert!(
        reply.is_empty(),
        "no TLS alert to a plaintext client: {reply:?}"
    );
    assert!(baton_tls::PLAINTEXT_HTTP_RESPONSE.starts_with(b"HTTP/1.1 400"));
}

#[test]
fn garbage_is_not_tls() {
    let (served, _, _) = against(Duration::from_secs(5), |mut s| {
        s.write_all(&[0x00, 0xff, 0x13, 0x37, 1, 2, 3, 4, 5, 6])
            .expect("write");
        read_all(s)
    });
    let err = served.expect_err("garbage");
    assert!(matches!(err, TlsError::NotTls(0)), "{err}");
}

#[test]
fn a_broken_handshake_record_is_a_tls_error_with_an_alert() {
    let (served, reply, _) = against(Duration::from_secs(5), |mut s| {
        // A handshake record whose ClientHello is nonsense.
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0xff])
            .expect("write");
        read_all(s)
    });
    let err = served.expect_err("bad hello");
    assert_eq!(err.kind(), "tls", "{err}");
    assert_eq!(
        reply.first(),
        Some(&0x15),
        "an alert record went out: {reply:?}"
    );
}

#[test]
fn silent_client_hits_the_handshake_deadline() {
    let (served, _, took) = against(Duration::from_millis(300), |s| {
        std::thread::sleep(Duration::from_millis(1500));
        drop(s);
        Vec::new()
    });
    let err = served.expect_err("timeout");
    assert!(matches!(err, TlsError::HandshakeTimeout(_)), "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1400),
        "{took:?}"
    );
}

#[test]
fn eof_during_the_handshake() {
    let (served, _, _) = against(Duration::from_secs(5), |mut s| {
        s.write_all(&[0x16, 0x03, 0x01]).expect("write");
        drop(s);
        Vec::new()
    });
    let err = served.expect_err("eof");
    assert!(matches!(err, TlsError::EofInHandshake), "{err}");
}

#[test]
fn close_notify_reaches_the_client() {
    let (ca, config) = local_config();
    let (addr, server) = spawn_server(config);
    // `fetch` reads to the end: rustls's reader returns Ok(0) only after
    // close_notify (an EOF without it is an UnexpectedEof error).
    let got = fetch(
        client_config(&ca, &[&rustls::version::TLS13]),
        addr,
        "localhost",
    )
    .expect("client");
    assert_eq!(got.reply, b"pong\n");
    server.join().expect("thread").expect("server");
}
