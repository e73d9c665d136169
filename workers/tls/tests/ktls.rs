//! The kTLS hand-off against a fake kernel: after a real handshake (a
//! rustls client here, the worker's `TlsConn` with baton's
//! `server_config`), `TlsConn::into_ktls` gives the fake kernel the
//! `crypto_info` of each direction; this test then does the kernel's job
//! itself with ring, from those bytes only: it encrypts a record the way
//! the kernel would (TX) and checks that the real rustls client reads it
//! as application data, and decrypts a record the client sent (RX). That
//! proves the keys, IVs/salts and sequence numbers handed over are right,
//! for every suite baton offers, on a kernel without kTLS.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_tls::ktls::{CryptoInfo, Direction, Kernel, KtlsError};
use baton_tls::{load, Handoff, SniResolver, TlsConn, TlsOptions};
use common::*;
use ring::aead;
use rustls::crypto::ring::cipher_suite as cs;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, SupportedCipherSuite};

/// Records what it is given; can refuse a step.
#[derive(Default)]
struct FakeKernel {
    ulp: Option<RawFd>,
    tx: Option<CryptoInfo>,
    rx: Option<CryptoInfo>,
    refuse_ulp: bool,
    refuse_tx: bool,
}

impl Kernel for FakeKernel {
    fn set_ulp(&mut self, fd: RawFd) -> std::io::Result<()> {
        if self.refuse_ulp {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        self.ulp = Some(fd);
        Ok(())
    }
    fn set_crypto(&mut self, fd: RawFd, dir: Direction, info: &CryptoInfo) -> std::io::Result<()> {
        assert_eq!(
            Some(fd),
            self.ulp,
            "the ULP comes first, on the same socket"
        );
        match dir {
            Direction::Tx if self.refuse_tx => {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            }
            Direction::Tx => {
                assert!(self.tx.is_none() && self.rx.is_none(), "TX first, once");
                self.tx = Some(info.clone());
            }
            Direction::Rx => {
                assert!(self.tx.is_some() && self.rx.is_none(), "then RX, once");
                self.rx = Some(info.clone());
            }
        }
        Ok(())
    }
}

/// A connected pair: the rustls client, the worker's TlsConn, both
/// non-blocking, handshake done and everything flushed.
struct Pair {
    client: ClientConnection,
    csock: TcpStream,
    server: TlsConn<TcpStream>,
    _ca: Ca,
}

fn pair(suite: SupportedCipherSuite, tls12: bool) -> Pair {
    let dir = tempdir("ktls");
    let ca = ca(&dir);
    let l = leaf(&dir, &ca, "site", &["localhost"], Alg::P256).expect("leaf");
    let ck = load::load_local(&l.cert_path, &l.key_path).expect("pair");
    let mut r = SniResolver::new();
    r.add(&["localhost".into()], Arc::new(ck));
    let opts = TlsOptions {
        ktls: true,
        ..TlsOptions::default()
    };
    let config = baton_tls::server_config(Arc::new(r), None, &opts).expect("config");

    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots(&ca))
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = ClientConnection::new(
        Arc::new(cc),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let csock = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (ssock, _) = listener.accept().expect("accept");
    for s in [&csock, &ssock] {
        s.set_nonblocking(true).expect("nb");
        // Small writes must not wait for delayed ACKs (Nagle).
        s.set_nodelay(true).expect("nodelay");
    }
    let server = TlsConn::new(config, ssock).expect("server");
    let mut p = Pair {
        client,
        csock,
        server,
        _ca: ca,
    };
    p.pump_until(|p| !p.client.is_handshaking() && !p.server.is_handshaking());
    // Let the session tickets (TLS 1.3) reach the client too.
    p.pump_until(|p| !p.server.connection().wants_write());
    p.pump();
    let got = p.client.negotiated_cipher_suite().expect("suite").suite();
    assert_eq!(got, suite.suite());
    p
}

impl Pair {
    /// One round of moving bytes both ways.
    fn pump(&mut self) {
        while self.client.wants_write() {
            match self.client.write_tls(&mut self.csock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client write: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(2));
        self.server.on_readable().expect("server");
        self.server.flush_tls().expect("server flush");
        std::thread::sleep(Duration::from_millis(2));
        self.client_read();
    }

    fn client_read(&mut self) {
        client_read(&mut self.client, &mut self.csock)
    }

    fn pump_until(&mut self, done: impl Fn(&Pair) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < until, "stuck");
            self.pump();
        }
    }

    fn client_plaintext(&mut self) -> Vec<u8> {
        plaintext(&mut self.client)
    }
}

fn client_read(client: &mut ClientConnection, sock: &mut TcpStream) {
    loop {
        match client.read_tls(sock) {
            Ok(0) => break,
            Ok(_) => {
                client.process_new_packets().expect("client process");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("client read: {e}"),
        }
    }
}

/// Client plaintext available now.
fn plaintext(client: &mut ClientConnection) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("client plaintext: {e}"),
        }
    }
    v
}

fn aead_alg(c: &CryptoInfo) -> &'static aead::Algorithm {
    match c {
        CryptoInfo::AesGcm128(_) => &aead::AES_128_GCM,
        CryptoInfo::AesGcm256(_) => &aead::AES_256_GCM,
        CryptoInfo::Chacha20Poly1305(_) => &aead::CHACHA20_POLY1305,
    }
}

/// (key, salt||iv as the kernel keeps it (12 bytes), rec_seq, is TLS 1.2
/// AES-GCM (explicit nonce)), read from the struct's kernel bytes.
fn parts(c: &CryptoInfo) -> (Vec<u8>, [u8; 12], u64, bool) {
    let b = c.as_bytes();
    let version = u16::from_ne_bytes([b[0], b[1]]);
    let mut nonce = [0u8; 12];
    let (key, seq, explicit) = match c {
        CryptoInfo::AesGcm128(_) => {
            nonce[..4].copy_from_slice(&b[28..32]);
            nonce[4..].copy_from_slice(&b[4..12]);
            (b[12..28].to_vec(), &b[32..40], version == 0x0303)
        }
        CryptoInfo::AesGcm256(_) => {
            nonce[..4].copy_from_slice(&b[44..48]);
            nonce[4..].copy_from_slice(&b[4..12]);
            (b[12..44].to_vec(), &b[48..56], version == 0x0303)
        }
        CryptoInfo::Chacha20Poly1305(_) => {
            nonce.copy_from_slice(&b[4..16]);
            (b[16..48].to_vec(), &b[48..56], false)
        }
    };
    let seq = u64::from_be_bytes(seq.try_into().expect("8"));
    (key, nonce, seq, explicit)
}

fn xor_seq(mut n: [u8; 12], seq: u64) -> [u8; 12] {
    for (a, b) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *a ^= b;
    }
    n
}

/// One application-data record as the kernel's TX would make it, the
/// `m`-th since the hand-off.
fn kernel_seal(c: &CryptoInfo, m: u64, data: &[u8]) -> Vec<u8> {
    let (key, base, seq0, explicit) = parts(c);
    let seq = seq0 + m;
    let tls13 = c.info().version == 0x0304;
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(aead_alg(c), &key).expect("key"));
    let mut rec = Vec::new();
    if tls13 {
        let mut body = data.to_vec();
        body.push(0x17); // inner content type
        let len = (body.len() + 16) as u16;
        let hdr = [0x17, 3, 3, (len >> 8) as u8, len as u8];
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(xor_seq(base, seq)),
            aead::Aad::from(hdr),
            &mut body,
        )
        .expect("seal");
        rec.extend_from_slice(&hdr);
        rec.extend_from_slice(&body);
        return rec;
    }
    let mut aad = seq.to_be_bytes().to_vec();
    aad.extend_from_slice(&[0x17, 3, 3]);
    aad.extend_from_slice(&(data.len() as u16).to_be_bytes());
    let mut body = data.to_vec();
    let nonce = if explicit {
        // The kernel sends salt || iv, iv incremented per record.
        let mut n = base;
        let e = u64::from_be_bytes(n[4..].try_into().expect("8")).wrapping_add(m);
        n[4..].copy_from_slice(&e.to_be_bytes());
        n
    } else {
        xor_seq(base, seq)
    };
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad),
        &mut body,
    )
    .expect("seal");
    let explicit_len = if explicit { 8 } else { 0 };
    let len = (explicit_len + body.len()) as u16;
    rec.extend_from_slice(&[0x17, 3, 3, (len >> 8) as u8, len as u8]);
    if explicit {
        rec.extend_from_slice(&nonce[4..]);
    }
    rec.extend_from_slice(&body);
    rec
}

/// Decrypts the first record of `wire` as the kernel's RX would, being the
/// `m`-th since the hand-off: (content type, plaintext).
fn kernel_open(c: &CryptoInfo, m: u64, wire: &[u8]) -> (u8, Vec<u8>) {
    let (key, base, seq0, explicit) = parts(c);
    let seq = seq0 + m;
    let tls13 = c.info().version == 0x0304;
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(aead_alg(c), &key).expect("key"));
    let hdr: [u8; 5] = wire[..5].try_into().expect("header");
    let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
    let mut body = wire[5..5 + len].to_vec();
    if tls13 {
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(xor_seq(base, seq)),
                aead::Aad::from(hdr),
                &mut body,
            )
            .expect("RX keys open the client's record");
        let end = plain.iter().rposition(|&b| b != 0).expect("content type");
        return (plain[end], plain[..end].to_vec());
    }
    let nonce = if explicit {
        let mut n = base;
        n[4..].copy_from_slice(&body[..8]);
        body.drain(..8);
        n
    } else {
        xor_seq(base, seq)
    };
    let mut aad = seq.to_be_bytes().to_vec();
    aad.extend_from_slice(&hdr[..3]);
    aad.extend_from_slice(&((body.len() - 16) as u16).to_be_bytes());
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            &mut body,
        )
        .expect("RX keys open the client's record");
    (hdr[0], plain.to_vec())
}

fn read_raw(s: &mut TcpStream) -> Vec<u8> {
    let until = Instant::now() + Duration::from_secs(5);
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                v.extend_from_slice(&buf[..n]);
                if v.len() >= 5 && v.len() >= 5 + usize::from(u16::from_be_bytes([v[3], v[4]])) {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < until, "no record");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("raw read: {e}"),
        }
    }
    v
}

fn hand_off(suite: SupportedCipherSuite, tls12: bool) {
    let mut p = pair(suite, tls12);
    // Some traffic under rustls first, so that both sequence numbers have
    // moved on: a request, and a reply in two records.
    p.client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .expect("w");
    p.pump();
    p.server.write_all(b"HTTP/1.1 200 OK\r\n").expect("w");
    p.server.flush_tls().expect("flush");

    // Not yet: the request's plaintext is still in rustls.
    let mut fake = FakeKernel::default();
    let server = match p.server.into_ktls(&mut fake) {
        Err(Handoff::Kept(s, KtlsError::NotReady(why))) => {
            assert!(why.contains("plaintext"), "{why}");
            *s
        }
        other => panic!("handed off with plaintext buffered: {other:?}"),
    };
    assert!(fake.ulp.is_none(), "nothing done to the socket");
    p.server = server;
    let mut req = [0u8; 64];
    let n = p.server.read(&mut req).expect("request");
    assert_eq!(&req[..n], b"GET / HTTP/1.1\r\n\r\n");
    p.server.write_all(b"Content-Length: 5\r\n\r\n").expect("w");
    p.server.flush_tls().expect("flush");
    p.pump();
    assert_eq!(
        p.client_plaintext(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    );

    let Pair {
        mut client,
        mut csock,
        server,
        _ca,
    } = p;
    let mut sock = server.into_ktls(&mut fake).expect("hand-off");
    let tx = fake.tx.as_ref().expect("TX set");
    let rx = fake.rx.as_ref().expect("RX set");
    let tls13 = !tls12;
    // rustls's sequence numbers carried over: TX after the 2 reply records
    // (+ the session-ticket record(s) in TLS 1.3, + Finished in 1.2), RX
    // after the request (+ the client's Finished in 1.2). A wrong one
    // would fail the decryptions below (it is in the nonce and, in 1.2,
    // the AAD).
    if tls13 {
        assert!(tx.rec_seq() >= 3, "{tx:?}");
        assert_eq!(rx.rec_seq(), 1, "{rx:?}");
    } else {
        assert_eq!((tx.rec_seq(), rx.rec_seq()), (3, 2), "{tx:?} {rx:?}");
    }

    // TX: records the kernel would send; the client reads them.
    sock.write_all(&kernel_seal(tx, 0, b"hel")).expect("w");
    sock.write_all(&kernel_seal(tx, 1, b"lo")).expect("w");
    std::thread::sleep(Duration::from_millis(20));
    client_read(&mut client, &mut csock);
    assert_eq!(
        plaintext(&mut client),
        b"hello",
        "the client decrypts the kernel's records"
    );

    // RX: the client's next records, opened with the RX keys.
    for (m, msg) in [&b"second request"[..], b"third"].iter().enumerate() {
        client.writer().write_all(msg).expect("w");
        while client.wants_write() {
            client.write_tls(&mut csock).expect("client write");
        }
        let wire = read_raw(&mut sock);
        assert_eq!(kernel_open(rx, m as u64, &wire), (0x17, msg.to_vec()));
    }
}

#[test]
fn tls13_aes128_gcm() {
    hand_off(cs::TLS13_AES_128_GCM_SHA256, false);
}

#[test]
fn tls13_aes256_gcm() {
    hand_off(cs::TLS13_AES_256_GCM_SHA384, false);
}

#[test]
fn tls13_chacha20_poly1305() {
    hand_off(cs::TLS13_CHACHA20_POLY1305_SHA256, false);
}

#[test]
fn tls12_aes128_gcm() {
    hand_off(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, true);
}

#[test]
fn tls12_aes256_gcm() {
    hand_off(cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, true);
}

#[test]
fn tls12_chacha20_poly1305() {
    hand_off(cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, true);
}

/// The kernel refuses the ULP (this machine's case): the session stays
/// rustls's and goes on working.
#[test]
fn refused_ulp_keeps_the_session() {
    let mut p = pair(cs::TLS13_AES_128_GCM_SHA256, false);
    let mut fake = FakeKernel {
        refuse_ulp: true,
        ..FakeKernel::default()
    };
    match p.server.into_ktls(&mut fake) {
        Err(Handoff::Kept(s, KtlsError::Ulp(e))) => {
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
            p.server = *s;
        }
        other => panic!("{other:?}"),
    }
    assert!(fake.tx.is_none());
    p.server.write_all(b"still rustls").expect("w");
    p.server.flush_tls().expect("flush");
    p.pump();
    assert_eq!(p.client_plaintext(), b"still rustls");
}

/// The kernel takes the ULP, then refuses TX: the keys are gone from
/// rustls, the caller must close.
#[test]
fn refused_tx_is_fatal() {
    let p = pair(cs::TLS13_AES_128_GCM_SHA256, false);
    let mut fake = FakeKernel {
        refuse_tx: true,
        ..FakeKernel::default()
    };
    match p.server.into_ktls(&mut fake) {
        Err(Handoff::Failed(_sock, KtlsError::Crypto { dir, .. })) => assert_eq!(dir, "TLS_TX"),
        other => panic!("{other:?}"),
    }
}

/// The real kernel here: refused or taken, never a panic; on a kernel
/// without kTLS it is `Kept` (nothing lost).
#[test]
fn system_kernel() {
    let p = pair(cs::TLS13_AES_128_GCM_SHA256, false);
    match p.server.into_ktls(&mut baton_tls::ktls::System) {
        Ok(_) => println!("this kernel has kTLS: handed off"),
        Err(Handoff::Kept(_, e)) => {
            println!("kept: {e}");
            assert!(!baton_tls::ktls::probe().is_available());
        }
        Err(Handoff::Failed(_, e)) => panic!("the kernel took the ULP and refused the keys: {e}"),
    }
}
