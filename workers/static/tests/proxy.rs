//! `baton-static --accept-proxy`: every connection starts with a PROXY v1
//! or v2 header, whose client address is the access log's; a connection
//! without one, or with a malformed one, is closed with a log line and no
//! answer. Driven by the fake acceptor (`support/fake.rs`).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_sdk::proxy_protocol::{encode_v1, encode_v2, encode_v2_local};
use support::client::{request_bytes, Client};
use support::fake::Fake;
use support::TestRoot;

const WAIT: Duration = Duration::from_secs(20);

fn client_addr() -> SocketAddr {
    "203.0.113.7:4242".parse().unwrap()
}

fn start(root: &TestRoot, extra: &[&str]) -> Fake {
    let mut args = vec!["--root", root.www(), "--accept-proxy"];
    args.extend_from_slice(extra);
    Fake::start(&args)
}

#[test]
fn a_v2_header_gives_the_access_log_the_client_address_for_every_request() {
    let root = TestRoot::new("proxy-v2");
    let mut w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    c.send(&encode_v2(client_addr(), w.addr));
    let r = c.get("/hello.txt");
    assert_eq!((r.status, r.text().as_str()), (200, "hello, world\n"));
    // Keep-alive: the header came once, the second request is plain HTTP.
    let r = c.get("/style.css");
    assert_eq!(r.status, 200);
    for path in ["/hello.txt", "/style.css"] {
        let l = w
            .wait_log(&format!("path={path}"), WAIT)
            .expect("access line");
        assert!(l.contains("peer=203.0.113.7:4242"), "{l}");
    }
}

#[test]
fn a_v1_header_sent_with_the_request_or_split_across_writes_works() {
    let root = TestRoot::new("proxy-v1");
    let mut w = start(&root, &[]);
    // Header and request in one write.
    let mut c = Client::connect(w.addr);
    let mut bytes = encode_v1("198.51.100.9:5555".parse().unwrap(), w.addr).into_bytes();
    bytes.extend(request_bytes("GET", "/hello.txt?one", &[]));
    c.send(&bytes);
    assert_eq!(c.read(false).expect("response").status, 200);
    let l = w.wait_log("path=/hello.txt?one", WAIT).expect("access");
    assert!(l.contains("peer=198.51.100.9:5555"), "{l}");
    // A v2 header dribbled out a few bytes at a time.
    let mut c = Client::connect(w.addr);
    let header = encode_v2(client_addr(), w.addr);
    for chunk in header.chunks(5) {
        c.send(chunk);
        std::thread::sleep(Duration::from_millis(5));
    }
    c.send(&request_bytes("GET", "/hello.txt?two", &[]));
    assert_eq!(c.read(false).expect("response").status, 200);
    let l = w.wait_log("path=/hello.txt?two", WAIT).expect("access");
    assert!(l.contains("peer=203.0.113.7:4242"), "{l}");
}

#[test]
fn no_header_or_a_malformed_one_is_closed_unanswered_and_logged() {
    let root = TestRoot::new("proxy-bad");
    let mut w = start(&root, &[]);
    let cases: [&[u8]; 3] = [
        b"GET /hello.txt HTTP/1.1\r\nHost: test\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\nGET / HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x99\x11\x00\x0cxxxxxxxxxxxx",
    ];
    for bytes in cases {
        let mut c = Client::connect(w.addr);
        c.send(bytes);
        let got = c.read_to_eof().expect("closed, not timed out");
        assert!(
            got.is_empty(),
            "answered: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let l = w
        .wait_log("does not start with a valid PROXY header", WAIT)
        .expect("log line");
    assert!(l.contains("peer=127.0.0.1:"), "{l}");
    assert!(w.wait_record(WAIT, |r| r.done.len() >= 3));
    assert!(!w.collect_logs().iter().any(|l| l.contains("status=")));
}

#[test]
fn a_connection_that_sends_no_header_in_time_is_closed() {
    let root = TestRoot::new("proxy-slow");
    let mut w = start(&root, &["--accept-proxy-timeout", "300ms"]);
    let started = Instant::now();
    let mut c = Client::connect(w.addr);
    c.send(b"PROXY TCP4 ");
    let got = c.read_to_eof().expect("closed, not timed out");
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(w
        .wait_log("no whole PROXY header within --accept-proxy-timeout", WAIT)
        .is_some());
}

#[test]
fn a_local_header_keeps_the_socket_address() {
    // HAProxy's own checks send LOCAL: the connection's addresses stand.
    let root = TestRoot::new("proxy-local");
    let mut w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    c.send(&encode_v2_local());
    assert_eq!(c.get("/hello.txt").status, 200);
    let l = w.wait_log("path=/hello.txt", WAIT).expect("access");
    assert!(l.contains("peer=127.0.0.1:"), "{l}");
}

#[test]
fn a_connection_back_from_parking_owes_no_second_header() {
    // The acceptor gives a parked connection back with the address its
    // worker reported (the header's), not the socket's peer.
    let root = TestRoot::new("proxy-unpark");
    let mut w = start(&root, &[]);
    w.claim_peer(Some(client_addr()));
    let mut c = Client::connect(w.addr);
    assert_eq!(c.get("/hello.txt").status, 200);
    let l = w.wait_log("path=/hello.txt", WAIT).expect("access");
    assert!(l.contains("peer=203.0.113.7:4242"), "{l}");
}
