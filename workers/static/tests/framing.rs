//! baton-static's request framing and strictness (through `baton-http`),
//! driven through a real `baton-static` process and a fake acceptor (see
//! `support/fake.rs`): request bodies read and discarded, chunked or not;
//! `Transfer-Encoding` and `Content-Length` rules; versions; `Host`; the
//! header-field limit; bytes that must never be in a field value. Where a
//! test needs to know what the worker did (not just what it answered), it
//! waits for the worker's access-log line.

mod support;

use std::time::Duration;

use support::client::{self, request_bytes, Client};
use support::fake::Fake;
use support::TestRoot;

const WAIT: Duration = Duration::from_secs(20);

fn start(root: &TestRoot, extra: &[&str]) -> Fake {
    let mut args = vec!["--root", root.www()];
    args.extend_from_slice(extra);
    Fake::start(&args)
}

/// Sends `raw` on a fresh connection: the one response, and whether the
/// worker closed the connection after it (EOF, nothing more).
fn answer_and_close(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, bool) {
    let mut c = Client::connect(addr);
    c.send(raw);
    let r = c.read(false).expect("response");
    let closed = r.closes() && c.read_to_eof().expect("eof").is_empty();
    (r.status, closed)
}

/// Fix 1: a chunked request body is decoded and discarded, and the
/// connection answers the next request, however the body is split.
#[test]
fn chunked_request_bodies_are_read_and_discarded() {
    let root = TestRoot::new("chunked");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    c.send(
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n0\r\nTrailer: t\r\n\r\n\
          GET /style.css HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(c.read(false).unwrap().text(), "hello, world\n");
    assert_eq!(c.read(false).unwrap().text(), "body { color: red }\n");
    // The same body in pieces, each written after the previous answer
    // arrived: the worker holds its place in the chunked body between
    // reads.
    c.send(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1");
    assert_eq!(c.read(false).unwrap().status, 200);
    for piece in [&b"0\r\n0123"[..], b"456789abcdef\r", b"\n0\r", b"\n\r\n"] {
        c.send(piece);
    }
    assert_eq!(c.get("/style.css").text(), "body { color: red }\n");
    // A body that breaks the chunked grammar ends the connection.
    c.send(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n");
    assert_eq!(c.read(false).unwrap().status, 200);
    assert!(c.read_to_eof().unwrap().is_empty());
}

/// Fix 1: bodies larger than `--max-body-bytes` are answered 413 (with
/// `Content-Length`) or cut off (chunked), and the connection closes.
#[test]
fn request_bodies_over_the_limit_close_the_connection() {
    let root = TestRoot::new("bodylimit");
    let mut w = start(&root, &["--max-body-bytes", "10"]);
    let big = request_bytes("GET", "/hello.txt", &["Content-Length: 11"]);
    assert_eq!(answer_and_close(w.addr, &big), (413, true));
    assert!(w.wait_log("status=413", WAIT).is_some());
    // Within the limit: discarded, the connection goes on.
    let mut c = Client::connect(w.addr);
    let mut batch = request_bytes("GET", "/hello.txt", &["Content-Length: 10"]);
    batch.extend_from_slice(b"0123456789");
    batch.extend(request_bytes("GET", "/style.css", &[]));
    c.send(&batch);
    assert_eq!(c.read(false).unwrap().status, 200);
    assert_eq!(c.read(false).unwrap().status, 200);
    // A chunked body found too large once its head was answered: the
    // answer stands, then the connection closes.
    let mut c = Client::connect(w.addr);
    let mut batch = request_bytes("GET", "/hello.txt", &["Transfer-Encoding: chunked"]);
    batch.extend_from_slice(b"6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n");
    batch.extend(request_bytes("GET", "/style.css", &[]));
    c.send(&batch);
    assert_eq!(c.read(false).unwrap().status, 200);
    assert!(c.read_to_eof().unwrap().is_empty());
}

/// Fix 2: `Content-Length` with `Transfer-Encoding`, or `chunked` not the
/// final coding, is 400 and closes; an unknown coding is 501 and closes.
#[test]
fn transfer_encoding_rules() {
    let root = TestRoot::new("te");
    let w = start(&root, &[]);
    let req = |fields: &[&str]| request_bytes("GET", "/hello.txt", fields);
    for (fields, status) in [
        (
            &["Content-Length: 5", "Transfer-Encoding: chunked"][..],
            400,
        ),
        (&["Transfer-Encoding: chunked", "Content-Length: 0"], 400),
        (&["Transfer-Encoding: chunked, gzip"], 400),
        (&["Transfer-Encoding: gzip"], 400),
        (
            &["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
            400,
        ),
        (&["Transfer-Encoding: foo"], 501),
        (&["Transfer-Encoding: foo, chunked"], 501),
    ] {
        assert_eq!(
            answer_and_close(w.addr, &req(fields)),
            (status, true),
            "{fields:?}"
        );
    }
    // HTTP/1.0 with Transfer-Encoding: faulty framing (RFC 9112 §6.1).
    let r = answer_and_close(
        w.addr,
        b"GET /hello.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(r, (400, true));
    // gzip before the final chunked frames the body like chunked alone.
    let mut c = Client::connect(w.addr);
    let mut batch = req(&["Transfer-Encoding: gzip, chunked"]);
    batch.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
    batch.extend(request_bytes("GET", "/style.css", &[]));
    c.send(&batch);
    assert_eq!(c.read(false).unwrap().status, 200);
    assert_eq!(c.read(false).unwrap().status, 200);
}

/// Fix 3: a regular file asked for as a directory is not the file.
#[test]
fn a_file_with_a_trailing_slash_is_not_found() {
    let root = TestRoot::new("slash");
    let w = start(&root, &[]);
    for target in [
        "/hello.txt/",
        "/sub/data.json/",
        "/hello.txt%2f",
        "/sub/index.html/",
    ] {
        let r = client::get(w.addr, target, &[]);
        assert_eq!(r.status, 404, "{target}");
    }
    assert_eq!(client::get(w.addr, "/sub/", &[]).status, 200);
    let demo = Fake::start(&["--demo"]);
    assert_eq!(client::get(demo.addr, "/index.html/", &[]).status, 404);
    assert_eq!(client::get(demo.addr, "/index.html", &[]).status, 200);
}

/// Fix 4: a raw space inside the request target is 400, not 505.
#[test]
fn a_raw_space_in_the_target_is_a_bad_request() {
    let root = TestRoot::new("space");
    let w = start(&root, &[]);
    for raw in [
        &b"GET /with space.txt HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /hello.txt  HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /hello.txt HTTP/1.1 \r\nHost: x\r\n\r\n",
        b"GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        assert_eq!(
            answer_and_close(w.addr, raw),
            (400, true),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

/// Fix 5: HTTP/1.x with x > 1 is served as 1.1; other majors and
/// version-less (0.9-style) request lines are 505.
#[test]
fn versions() {
    let root = TestRoot::new("versions");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    for minor in [2, 9] {
        c.send(format!("GET /hello.txt HTTP/1.{minor}\r\nHost: x\r\n\r\n").as_bytes());
        let r = c.read(false).unwrap();
        assert_eq!((r.status, r.version.as_str()), (200, "HTTP/1.1"));
        assert!(!r.closes(), "1.{minor} keeps alive as 1.1 does");
    }
    for raw in [
        &b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"[..],
        b"GET / HTTP/3.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/0.9\r\n\r\n",
        b"GET /hello.txt\r\n\r\n",
    ] {
        assert_eq!(
            answer_and_close(w.addr, raw),
            (505, true),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(
        answer_and_close(w.addr, b"GET / HTTP/1.10\r\nHost: x\r\n\r\n").0,
        400
    );
}

/// Fix 6: Host missing (HTTP/1.1), doubled or invalid is 400.
#[test]
fn host_must_be_one_valid_value() {
    let root = TestRoot::new("host");
    let w = start(&root, &[]);
    for raw in [
        &b"GET /hello.txt HTTP/1.1\r\n\r\n"[..],
        b"GET /hello.txt HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: a/b\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: user@a\r\n\r\n",
        b"GET /hello.txt HTTP/1.1\r\nHost: a:http\r\n\r\n",
        b"GET /hello.txt HTTP/1.0\r\nHost: [::1\r\n\r\n",
    ] {
        assert_eq!(
            answer_and_close(w.addr, raw),
            (400, true),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    for host in ["example.com:8080", "[::1]:80", "127.0.0.1", ""] {
        let raw = format!("GET /hello.txt HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_eq!(client::raw(w.addr, raw.as_bytes()).status, 200, "{host:?}");
    }
}

/// Fix 7: a 405 whose body was read keeps the connection, and the next
/// pipelined request is answered.
#[test]
fn a_405_with_a_body_keeps_the_connection() {
    let root = TestRoot::new("405");
    let w = start(&root, &[]);
    let mut c = Client::connect(w.addr);
    let mut batch = request_bytes("POST", "/hello.txt", &["Content-Length: 3"]);
    batch.extend_from_slice(b"abc");
    batch.extend(request_bytes("PUT", "/x", &["Transfer-Encoding: chunked"]));
    batch.extend_from_slice(b"2\r\nab\r\n0\r\n\r\n");
    batch.extend(request_bytes("DELETE", "/x", &[]));
    batch.extend(request_bytes("GET", "/hello.txt", &[]));
    c.send(&batch);
    for i in 0..3 {
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 405, "response {i}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert!(!r.closes(), "response {i}");
    }
    assert_eq!(c.read(false).unwrap().text(), "hello, world\n");
    // With Expect: 100-continue the client may hold the body back until
    // it hears 100, which it never does: the 405 closes instead of
    // waiting for a body that may not come.
    let raw = request_bytes("POST", "/x", &["Content-Length: 3", "Expect: 100-continue"]);
    assert_eq!(answer_and_close(w.addr, &raw), (405, true));
}

/// Fix 8: the number of header fields is an option (default 100).
#[test]
fn the_header_field_limit_is_an_option() {
    let root = TestRoot::new("fields");
    let w = start(&root, &[]);
    let fields = |n: usize| -> Vec<String> { (0..n).map(|i| format!("X-F{i}: v")).collect() };
    let req = |n: usize| {
        let f = fields(n);
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        request_bytes("GET", "/hello.txt", &f)
    };
    // Host plus 99: 100 fields.
    assert_eq!(client::raw(w.addr, &req(99)).status, 200);
    assert_eq!(answer_and_close(w.addr, &req(100)), (431, true));
    let few = start(&root, &["--max-header-fields", "5"]);
    assert_eq!(client::raw(few.addr, &req(4)).status, 200);
    assert_eq!(answer_and_close(few.addr, &req(5)), (431, true));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-static"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-header-fields"));
}

/// Fix 9: identical Content-Length values, in two fields or one list, are
/// one length; different ones are 400.
#[test]
fn repeated_content_lengths() {
    let root = TestRoot::new("cl");
    let w = start(&root, &[]);
    for fields in [
        &["Content-Length: 5", "Content-Length: 5"][..],
        &["Content-Length: 5, 5"],
    ] {
        let mut c = Client::connect(w.addr);
        let mut batch = request_bytes("GET", "/hello.txt", fields);
        batch.extend_from_slice(b"ABCDE");
        batch.extend(request_bytes("GET", "/style.css", &[]));
        c.send(&batch);
        assert_eq!(
            c.read(false).unwrap().text(),
            "hello, world\n",
            "{fields:?}"
        );
        assert_eq!(
            c.read(false).unwrap().text(),
            "body { color: red }\n",
            "{fields:?}"
        );
    }
    for fields in [
        &["Content-Length: 5, 6"][..],
        &["Content-Length: 5", "Content-Length: 6"],
    ] {
        let raw = request_bytes("GET", "/hello.txt", fields);
        assert_eq!(answer_and_close(w.addr, &raw), (400, true), "{fields:?}");
    }
}

/// Fix 10: CR, LF (folding) and NUL inside a field value are 400.
#[test]
fn control_bytes_in_field_values_are_refused() {
    let root = TestRoot::new("ctl");
    let w = start(&root, &[]);
    for field in [
        &b"X: a\rb"[..],
        b"X: a\0b",
        b"X: a\r\n b",
        b"X: a\r\n\tb",
        b"Host : x",
        b"X: \x01",
    ] {
        let mut raw = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n".to_vec();
        raw.extend_from_slice(field);
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            answer_and_close(w.addr, &raw),
            (400, true),
            "{}",
            String::from_utf8_lossy(field)
        );
    }
    // A lone LF ends a line here (RFC 9112 §2.2 allows it; nginx too).
    let r = client::raw(w.addr, b"GET /hello.txt HTTP/1.1\nHost: x\n\n");
    assert_eq!(r.status, 200);
    // The request line (parsed by baton-http itself, not httparse).
    for raw in [
        &b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /a\0b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\r\nHost: x\r\n\r\n",
        b"GET\0/ HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let r = answer_and_close(w.addr, raw);
        assert_eq!(r, (400, true), "{}", String::from_utf8_lossy(raw));
    }
}
